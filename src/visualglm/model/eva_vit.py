"""EVA-CLIP ViT-g/14 as VisualGLM uses it: CLS + learned positions, pre-LN blocks, no final LN, ln_vision."""

from __future__ import annotations

import torch
from torch import nn

from ..config import VisionConfig
from .layers import MLP, SelfAttention


class ViTLayer(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x)); exact GELU."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attention = SelfAttention(cfg.hidden_size, cfg.num_heads)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class EvaViT(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, cfg.hidden_size))
        self.pos_embed = nn.Parameter(torch.empty(cfg.num_positions, cfg.hidden_size))
        self.layers = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.num_layers))
        self.ln_vision = nn.LayerNorm(cfg.hidden_size, eps=cfg.ln_vision_eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, 224, 224) -> vision tokens (B, 1 + patches, C) after ln_vision."""
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (B, P, C)
        cls = self.cls_token.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + P, C)
        for layer in self.layers:
            x = layer(x)
        return self.ln_vision(x)
