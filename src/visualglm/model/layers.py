"""Building blocks shared by the ViT and the Q-Former (sat-style names, so checkpoints map 1:1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, t, c = x.shape
    return x.view(b, t, num_heads, c // num_heads).transpose(1, 2)  # (B, nh, T, hd)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, nh, t, hd = x.shape
    return x.transpose(1, 2).reshape(b, t, nh * hd)  # (B, T, C)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with a fused, contiguous [Q | K | V] projection."""

    def __init__(self, hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query_key_value(x).chunk(3, dim=-1)
        q, k, v = (split_heads(t, self.num_heads) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.dense(merge_heads(y))


class CrossAttention(nn.Module):
    """Queries from the Q-Former stream, keys/values ([K | V] fused) from the vision tokens."""

    def __init__(self, hidden: int, encoder_hidden: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key_value = nn.Linear(encoder_hidden, 2 * hidden)
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, encoder_out: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.query(x), self.num_heads)
        k, v = (split_heads(t, self.num_heads) for t in self.key_value(encoder_out).chunk(2, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.dense(merge_heads(y))


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate
        self.dense_h_to_4h = nn.Linear(hidden, inner)
        self.dense_4h_to_h = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))
