"""Static key/value cache: one buffer pair per GLM layer, rows are independent sequences ("slots").

Rows are addressed either as the first ``B`` rows (views, no copy: batched generation) or through an index
tensor (gathers: the server's scheduler picks arbitrary slots). The capacity grows in chunks in eager mode so
a 2048-token ``max_length`` does not pin 2048 positions of memory for a 40-token answer; ``reserve`` fixes it
up front for compiled decoding, where shapes must not change.
"""

from __future__ import annotations

import torch

GROW_CHUNK = 256


class KVCache:
    def __init__(self, num_layers: int, batch: int, num_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        shape = (batch, num_heads, capacity, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions (rounded up to a chunk); existing entries are kept."""
        if length <= self.capacity:
            return
        new = -(-length // GROW_CHUNK) * GROW_CHUNK
        for buf in (self.k, self.v):
            for i, t in enumerate(buf):
                grown = t.new_zeros(t.shape[0], t.shape[1], new, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                buf[i] = grown

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, cache_pos: torch.Tensor,
              slots: torch.Tensor | None) -> None:
        """Store k/v (B, nh, T, hd) at absolute positions ``cache_pos`` (B, T) of each row."""
        rows = (torch.arange(k.shape[0], device=k.device) if slots is None else slots)[:, None]  # (B, 1)
        self.k[layer][rows, :, cache_pos] = k.transpose(1, 2)  # index (B, T) -> values (B, T, nh, hd)
        self.v[layer][rows, :, cache_pos] = v.transpose(1, 2)

    def read(self, layer: int, length: int, batch: int, slots: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``length`` positions of each row: (B, nh, length, hd)."""
        k, v = self.k[layer], self.v[layer]
        if slots is None:
            return k[:batch, :, :length], v[:batch, :, :length]
        return k[slots, :, :length], v[slots, :, :length]
