"""P-tuning v2: learned keys and values, ``pre_seq_len`` of them per GLM layer, seen by every query.

The GLM calls ``model.glm.prefix_encoder(batch)`` and prepends the returned keys/values to each layer's own
(after rotary, so the prefix has no position). One table row per virtual token holds, for every layer, its key
and its value ((layers * 2 * hidden) numbers) in PEFT's prefix-tuning order, so the table is exactly PEFT's
``prompt_embeddings``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PTuningConfig:
    pre_seq_len: int = 8

    def __post_init__(self) -> None:
        if self.pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be >= 1, got {self.pre_seq_len}")


class PrefixEncoder(nn.Module):
    def __init__(self, num_layers: int, num_heads: int, head_dim: int, pre_seq_len: int, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.num_layers, self.num_heads, self.head_dim = num_layers, num_heads, head_dim
        self.pre_seq_len = pre_seq_len
        self.embedding = nn.Embedding(pre_seq_len, num_layers * 2 * num_heads * head_dim, device=device,
                                      dtype=dtype)

    def adapter_params(self) -> list[str]:
        return ["embedding.weight"]

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """N(0, 1), as nn.Embedding (and ChatGLM's own prefix encoder) starts."""
        w = self.embedding.weight
        w.copy_(torch.randn(w.shape, generator=generator, dtype=torch.float32))

    def forward(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """-> per layer (k, v), each (batch, heads, pre_seq_len, head_dim)."""
        p = self.pre_seq_len
        table = self.embedding.weight.view(p, 2 * self.num_layers, self.num_heads, self.head_dim)
        kv = table.permute(1, 2, 0, 3)  # (2L, nh, P, hd)
        return [(kv[2 * i][None].expand(batch, -1, -1, -1), kv[2 * i + 1][None].expand(batch, -1, -1, -1))
                for i in range(self.num_layers)]


def apply_ptuning(model: nn.Module, cfg: PTuningConfig, *, seed: int = 0,
                  dtype: torch.dtype | None = torch.float32) -> PrefixEncoder:
    """Attach a fresh prefix encoder to ``model.glm`` (the hook the GLM already calls)."""
    glm = model.glm
    if glm.prefix_encoder is not None:
        raise ValueError("the model already has a P-tuning prefix encoder")
    g = glm.cfg
    enc = PrefixEncoder(g.num_layers, glm.layers[0].attention.num_heads, g.head_dim, cfg.pre_seq_len,
                        device=model.glm.word_embeddings.weight.device, dtype=dtype)
    enc.reset_parameters(torch.Generator().manual_seed(seed))
    glm.prefix_encoder = enc
    return enc
