"""ChatGLM-6B as VisualGLM uses it (sat semantics).

Per layer: x1 = LN(x); h = alpha*x1 + Attn(x1); x2 = LN(h); out = alpha*x2 + MLP(x2), alpha = sqrt(2*layers).
Attention: fused per-head [q_h | k_h | v_h] projection, 2-D rotary (first half of each head rotated by the
position, second half by the block position), prefix-LM mask (the context is seen bidirectionally,
``<sop>`` and generated tokens causally).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GLMConfig
from .kv_cache import KVCache


def prefix_lm_mask(query_pos: torch.Tensor, key_len: int, start: torch.Tensor, context: torch.Tensor
                   ) -> torch.Tensor:
    """(B, 1, T, K) bool, True = may attend.

    ``query_pos`` (B, T) are absolute cache indices of the queries; row b's tokens live in
    ``[start_b, ...)`` (left padding before it) and its context (everything before ``<sop>``) ends at
    ``context_b``. Key j is visible to query i when ``start <= j`` and (``j < context`` or ``j <= i``).
    A query always sees itself, so padded rows never produce an all-masked (NaN) softmax.
    """
    j = torch.arange(key_len, device=query_pos.device)[None, None, :]  # (1, 1, K)
    i = query_pos[:, :, None]  # (B, T, 1)
    ok = (j >= start[:, None, None]) & ((j < context[:, None, None]) | (j <= i))
    return (ok | (j == i)).unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rotary2D(nn.Module):
    """cos/sin tables for the two position rows, computed in float32 as sat does."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.dim = head_dim // 2  # each half of a head gets its own rotary of this size
        self.base = base
        self.register_buffer("inv_freq", self.inv_freq_init(), persistent=False)

    def inv_freq_init(self, device: torch.device | str | None = None) -> torch.Tensor:
        """float32 always (rounding them to fp16 as the HF code does moves logits by ~1e-3)."""
        steps = torch.arange(0, self.dim, 2, dtype=torch.float32, device=device)
        return 1.0 / (self.base ** (steps / self.dim))

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, 2, T) -> cos, sin (B, 2, 1, T, head_dim/2) in float32."""
        angles = position_ids.float()[..., None] * self.inv_freq  # (B, 2, T, dim/2)
        emb = torch.cat((angles, angles), dim=-1).unsqueeze(2)  # (B, 2, 1, T, dim)
        return emb.cos(), emb.sin()


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hd): first half by row 0 (positions), second half by row 1 (block positions)."""
    halves = x.float().chunk(2, dim=-1)
    out = [h * cos[:, r] + rotate_half(h) * sin[:, r] for r, h in enumerate(halves)]
    return torch.cat(out, dim=-1).to(x.dtype)


class GLMAttention(nn.Module):
    def __init__(self, cfg: GLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        # Rows are per head [q_h | k_h | v_h] (the HF layout), so contiguous row blocks hold whole heads.
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None, cache_pos: torch.Tensor | None, slots: torch.Tensor | None,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, -1, 3, self.head_dim)  # (B, T, nh, 3, hd)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)  # each (B, nh, T, hd)
        q, k = apply_rotary_2d(q, *rope), apply_rotary_2d(k, *rope)
        if cache is not None:
            cache.write(self.layer_idx, k, v, cache_pos, slots)
            k, v = cache.read(self.layer_idx, mask.shape[-1], b, slots)
        if prefix is not None:  # P-tuning v2: learned keys/values seen by every query
            pk, pv = (p.to(k.dtype).expand(b, -1, -1, -1) for p in prefix)
            k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
            mask = torch.cat((mask.new_ones(*mask.shape[:-1], pk.shape[2]), mask), dim=-1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hd)
        return self.dense(y.transpose(1, 2).reshape(b, t, -1))


class GLMMLP(nn.Module):
    def __init__(self, cfg: GLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.dense_4h_to_h = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, cfg: GLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.alpha = math.sqrt(2 * cfg.num_layers)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.attention = GLMAttention(cfg, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.mlp = GLMMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVCache | None = None, cache_pos: torch.Tensor | None = None,
                slots: torch.Tensor | None = None, prefix: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        x1 = self.input_layernorm(x)
        h = self.alpha * x1 + self.attention(x1, rope, mask, cache, cache_pos, slots, prefix)
        x2 = self.post_attention_layernorm(h)
        return self.alpha * x2 + self.mlp(x2)


class ChatGLM(nn.Module):
    """Embeddings in, final-LN hidden states out; ``lm_head`` is applied by the caller where needed."""

    def __init__(self, cfg: GLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = Rotary2D(cfg.head_dim, cfg.rotary_base)
        self.layers = nn.ModuleList(GLMBlock(cfg, i) for i in range(cfg.num_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.word_embeddings.weight
        self.prefix_encoder: nn.Module | None = None  # set by P-tuning v2 (visualglm.peft)
        self.gradient_checkpointing = False

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, cache_pos: torch.Tensor | None = None,
                slots: torch.Tensor | None = None) -> torch.Tensor:
        """embeds (B, T, C), position_ids (B, 2, T), mask (B, 1, T, K) -> hidden (B, T, C)."""
        rope = self.rotary(position_ids)
        prefixes = self.prefix_encoder(embeds.shape[0]) if self.prefix_encoder is not None else None
        x = embeds
        for i, layer in enumerate(self.layers):
            prefix = prefixes[i] if prefixes is not None else None
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, cache, cache_pos, slots, prefix,
                                                      use_reentrant=False)
            else:
                x = layer(x, rope, mask, cache, cache_pos, slots, prefix)
        return self.final_layernorm(x)
