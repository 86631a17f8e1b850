"""INT8 weight-only quantization, the original's scheme: symmetric, one scale per output row.

``scale = max|W_row| / 127`` (stored as float16, like the original's ``weight_scale``), ``q = round(W / scale)``
in int8, ``W ~ q * scale``. The int8 matrix keeps the float weight's (out, in) layout, so a checkpoint holds
``<name>.weight`` (int8) and ``<name>.weight_scale`` (float16) and nothing else changes.

Runtime: a few rows (decoding) go through a fused weight-only kernel that reads int8 and never materialises a
float matrix: torch's ``aten._weight_int8pack_mm`` on CPU, the Triton kernel of
:mod:`visualglm.quant.cuda_kernel` on CUDA; many rows (prefill, image encoding) and autograd cast the int8
matrix to the compute dtype (exact: |q| <= 127) block by block and use the dense GEMM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SCALE_DTYPE = torch.float16  # the original stores weight_scale in half precision
QMAX = 127
_CHUNK_ROWS = 4096  # quantize this many rows at a time: a 130k-row embedding never has a float32 copy


def row_scales(weight: torch.Tensor, qmax: int) -> torch.Tensor:
    """(N, K) float -> (N,) float16 scales ``max|W_row| / qmax``; all-zero rows get scale 1 (q is 0 anyway)."""
    absmax = weight.abs().amax(dim=-1).float()  # (N,)
    scale = (absmax / qmax).to(SCALE_DTYPE)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_rows(weight: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K) in [-qmax, qmax], float16 scales (N,)), a block of rows at a time.

    q is computed from the float16-rounded scale, so quantizing while loading and loading a saved
    quantized checkpoint give bit-identical weights.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"expected a 2-D floating weight, got {weight.dim()}-D {weight.dtype}")
    n = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=SCALE_DTYPE, device=weight.device)
    for lo in range(0, n, _CHUNK_ROWS):
        block = weight[lo: lo + _CHUNK_ROWS].float()  # (rows, K)
        s = row_scales(block, qmax)
        q[lo: lo + _CHUNK_ROWS] = torch.round(block / s.float()[:, None]).clamp_(-qmax, qmax).to(torch.int8)
        scales[lo: lo + _CHUNK_ROWS] = s
    return q, scales


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), float16 scales (N,))."""
    return quantize_rows(weight, QMAX)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 (N, K), scales (N,) -> (N, K) in ``dtype``."""
    return (q.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, *, fused: bool) -> torch.Tensor:
    """x (M, K) @ (q * scale)^T -> (M, N) in x's dtype. ``scale`` must already be in x's dtype.

    ``fused``: torch's weight-only kernel (reads the int8 matrix directly); otherwise the int8 matrix is cast
    to x's dtype (exact) for a dense GEMM and the scales are applied to the (M, N) output.
    """
    if fused:
        return torch.ops.aten._weight_int8pack_mm(x, q, scale)
    return dense_matmul(x, lambda lo, hi: q[lo:hi], q.shape[0]) * scale


def dense_matmul(x: torch.Tensor, rows: Callable[[int, int], torch.Tensor], n: int) -> torch.Tensor:
    """x (M, K) @ W^T with W's int rows (exact in x's dtype) produced block by block by ``rows(lo, hi)``, so
    at most ~32 MB of float weight exists at a time (a 130k-row lm_head never gets a float copy)."""
    block = max(64, (_DENSE_BLOCK_ELEMENTS // x.shape[-1]) // 64 * 64)
    parts = [torch.nn.functional.linear(x, rows(lo, min(lo + block, n)).to(x.dtype)) for lo in range(0, n, block)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (M, N)


_DENSE_BLOCK_ELEMENTS = 1 << 24


def fused_int8_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Does ``_weight_int8pack_mm`` run here? Probed once per (device, dtype) on a tiny problem."""
    key = (device.type, dtype)
    if key not in _FUSED_OK:
        try:
            x = torch.zeros(1, 32, dtype=dtype, device=device)
            w = torch.zeros(32, 32, dtype=torch.int8, device=device)
            torch.ops.aten._weight_int8pack_mm(x, w, torch.ones(32, dtype=dtype, device=device))
            _FUSED_OK[key] = True
        except (RuntimeError, NotImplementedError):
            _FUSED_OK[key] = False
    return _FUSED_OK[key]


_FUSED_OK: dict[tuple[str, torch.dtype], bool] = {}
