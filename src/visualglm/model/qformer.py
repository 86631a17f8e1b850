"""BLIP-2 Q-Former: 32 learned queries, post-LN, cross-attention into the ViT tokens on chosen layers.

sat writes BERT's post-LN as "LN at the start of each layer + a final LN"; the two are the same network.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import QFormerConfig
from .layers import MLP, CrossAttention, SelfAttention


class QFormerLayer(nn.Module):
    def __init__(self, cfg: QFormerConfig, cross: bool) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layernorm_eps
        self.input_layernorm = nn.LayerNorm(h, eps=eps)
        self.attention = SelfAttention(h, cfg.num_heads)
        self.post_attention_layernorm = nn.LayerNorm(h, eps=eps)
        if cross:
            self.cross_attention = CrossAttention(h, cfg.encoder_hidden_size, cfg.num_heads)
            self.post_cross_attention_layernorm = nn.LayerNorm(h, eps=eps)
        else:
            self.cross_attention = None
        self.mlp = MLP(h, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        x = self.input_layernorm(x)
        x = self.post_attention_layernorm(x + self.attention(x))
        if self.cross_attention is not None:
            x = self.post_cross_attention_layernorm(x + self.cross_attention(x, vision))
        return x + self.mlp(x)


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.empty(cfg.num_query_tokens, cfg.hidden_size))
        self.layers = nn.ModuleList(QFormerLayer(cfg, cross) for cross in cfg.cross_attention_layers)
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)

    def forward(self, vision: torch.Tensor) -> torch.Tensor:
        """vision tokens (B, N, Cv) -> query outputs (B, Q, C)."""
        x = self.query_tokens.unsqueeze(0).expand(vision.shape[0], -1, -1)
        for layer in self.layers:
            x = layer(x, vision)
        return self.final_layernorm(x)
