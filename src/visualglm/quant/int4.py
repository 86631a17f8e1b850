"""INT4 weight-only quantization, the original's scheme and storage layout.

Symmetric, one scale per output row: ``scale = max|W_row| / 7`` (float16), ``q = round(W / scale)`` in
[-7, 7]. Two values share a byte, the even column in the high nibble (two's complement nibbles):
``byte = (q[2i] << 4) | (q[2i+1] & 0xF)``, so a (N, K) weight is stored as int8 (N, K/2).

That is the storage (checkpoint) layout. At run time a Linear is repacked once for the device's kernel:

* CPU: ``aten._weight_int4pack_mm_for_cpu`` (AVX-512/AVX2 int4 x bf16/fp16/fp32). Its layout groups rows in
  blocks of B (rows are padded to a multiple of B); inside a block, for every column k, byte j holds row
  B/2+j in the high nibble and row j in the low one, values offset by +8 (unsigned). B depends on the
  kernel torch picked for this processor (64 with AVX-512, 32 with AVX2), so it is found once by packing a
  probe (:func:`cpu_block_rows`). Its per-group scales get the row scale replicated over every group (zero
  point 0): the arithmetic is exactly ``q * scale``.
* CUDA, bf16: tinygemm (``aten._weight_int4pack_mm``, sm80+), fed with the storage bytes XOR 0x88 (the same
  nibbles offset by +8); on an H100 it streams 1.2-1.8 TB/s of INT4 at batch 1 (tests/test_cuda.py,
  benchmarks/cuda_kernels.py). If it fails (an older GPU), the layer keeps the storage layout.
* CUDA, fp16: the storage layout, read by the Triton kernel of :mod:`visualglm.quant.cuda_kernel` (few rows).
* Anything else: unpack + cast + dense GEMM (the "dequantize per call" fallback).
"""

from __future__ import annotations

import functools

import torch

from .int8 import quantize_rows

QMAX = 7
CPU_BLOCK_CANDIDATES = (64, 32, 16)  # rows per block of the CPU kernel's layout, by vector width
CPU_GROUP_SIZES = (256, 128, 64, 32)  # group sizes the kernels accept, largest first
_PACK_CHUNK_ROWS = 64 * 64  # repack this many rows at a time (the CPU packer wants int32 input)


# ----- the storage layout ----------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 (N, K) in [-8, 7], K even -> int8 (N, K/2); even column in the high nibble."""
    if q.dim() != 2 or q.shape[1] % 2:
        raise ValueError(f"int4 packing needs a 2-D tensor with an even number of columns, got {list(q.shape)}")
    hi = q[:, 0::2].to(torch.int16) << 4  # (N, K/2)
    lo = q[:, 1::2].to(torch.int16) & 0xF
    return ((hi | lo) & 0xFF).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 (N, K/2) -> int8 (N, K) in [-8, 7] (sign-extended nibbles)."""
    p = packed.view(torch.int8) if packed.dtype == torch.uint8 else packed
    hi = p >> 4  # arithmetic shift: sign-extends the high nibble
    lo = (p << 4) >> 4  # int8 arithmetic: the low nibble, sign-extended
    return torch.stack((hi, lo), dim=-1).view(p.shape[0], -1)  # (N, K/2, 2) -> (N, K)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float, K even -> (packed int8 (N, K/2), float16 scales (N,))."""
    if weight.dim() != 2 or weight.shape[1] % 2:
        raise ValueError(f"int4 quantization needs a 2-D weight with an even number of columns (two values per "
                         f"byte), got shape {list(weight.shape)}")
    q, scale = quantize_rows(weight, QMAX)
    return pack_int4(q), scale


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """packed int8 (N, K/2), scales (N,) -> (N, K) in ``dtype``."""
    return (unpack_int4(packed).to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


# ----- CPU kernel layout --------------------------------------------------------------------------------
def cpu_group_size(in_features: int) -> int | None:
    """The largest group size the CPU kernel accepts that divides K; None when K % 32 != 0."""
    return next((g for g in CPU_GROUP_SIZES if in_features % g == 0), None)


@functools.cache
def cpu_block_rows() -> int | None:
    """Rows per block of this processor's CPU int4 layout, or None when the packer is missing or lays rows out
    in a way this module cannot read back (then INT4 layers keep the storage layout and the generic path).

    Found by packing a random probe and comparing it with :func:`_emulate_cpu_layout` for each candidate:
    the layout is torch's private choice, and a wrong guess would silently corrupt every INT4 weight read
    back from it (saving, merging, the many-rows path)."""
    rows = 2 * max(CPU_BLOCK_CANDIDATES)
    q = torch.randint(0, 16, (rows, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    except (RuntimeError, NotImplementedError, AttributeError):
        return None
    return next((b for b in CPU_BLOCK_CANDIDATES if torch.equal(packed, _emulate_cpu_layout(q, b))), None)


def _emulate_cpu_layout(q: torch.Tensor, block: int) -> torch.Tensor:
    """The layout described in the module docstring, for (N, K) values in [0, 16) with N % block == 0."""
    n, k = q.shape
    b = q.to(torch.uint8).view(n // block, 2, block // 2, k)  # (blocks, low/high half, B/2, K)
    return (b[:, 0] | (b[:, 1] << 4)).transpose(1, 2).reshape(n, k // 2)


def to_cpu_layout(packed: torch.Tensor) -> torch.Tensor:
    """Storage layout (N, K/2) -> the CPU kernel's layout (N rounded up to whole blocks, K/2) uint8, padded
    rows zero. Call only where :func:`cpu_block_rows` found the layout."""
    block = cpu_block_rows()
    if block is None:
        raise RuntimeError("torch's CPU int4 kernel layout is not known on this machine")
    n, half = packed.shape
    n_pad = -(-n // block) * block
    out = torch.empty(n_pad, half, dtype=torch.uint8)
    for lo in range(0, n_pad, _PACK_CHUNK_ROWS):
        hi = min(lo + _PACK_CHUNK_ROWS, n_pad)
        q = torch.zeros(hi - lo, 2 * half, dtype=torch.int32)  # padded rows: q = 0
        if lo < n:
            q[: min(hi, n) - lo] = unpack_int4(packed[lo: min(hi, n)]).to(torch.int32)
        out[lo:hi] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q + 8, 1)
    return out


def cpu_layout_to_int8(kernel_weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The CPU kernel's layout (whole blocks) -> int8 (rows, K) values in [-8, 7] (the many-rows path)."""
    block = cpu_block_rows()
    assert block is not None, "a CPU int4 layout exists only where its block size was found"
    n_pad, half = kernel_weight.shape
    k = 2 * half
    b = kernel_weight.view(n_pad // block, k, block // 2)  # (blocks, K, B/2)
    low_rows = (b & 0xF).to(torch.int8)  # rows j of each block
    high_rows = (b >> 4).to(torch.int8)  # rows B/2 + j
    q = torch.cat((low_rows, high_rows), dim=-1).transpose(1, 2).reshape(n_pad, k)  # (N_pad, K), offset +8
    return q[:rows].sub_(8) if rows == n_pad else q[:rows] - 8


def cpu_layout_rows(kernel_weight: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Rows [lo, hi) of the CPU kernel's layout as int8 values in [-8, 7], reading whole blocks only."""
    block = cpu_block_rows()
    assert block is not None
    start = lo // block * block
    end = min(-(-hi // block) * block, kernel_weight.shape[0])
    return cpu_layout_to_int8(kernel_weight[start:end], hi - start)[lo - start:]


def from_cpu_layout(kernel_weight: torch.Tensor, rows: int) -> torch.Tensor:
    """The CPU kernel's layout -> storage layout (rows, K/2) int8 (the inverse of :func:`to_cpu_layout`)."""
    return pack_int4(cpu_layout_to_int8(kernel_weight, rows))


def cpu_scales_and_zeros(scale: torch.Tensor, in_features: int, rows_padded: int, group: int) -> torch.Tensor:
    """(N,) row scales -> the kernel's (K/group, N_pad, 2) [scale, zero] table: same scale in every group."""
    n = scale.shape[0]
    table = torch.zeros(in_features // group, rows_padded, 2, dtype=scale.dtype, device=scale.device)
    table[:, :n, 0] = scale
    return table


def int4_cpu_matmul(x: torch.Tensor, kernel_weight: torch.Tensor, group: int, table: torch.Tensor,
                    out_features: int) -> torch.Tensor:
    """x (M, K) -> (M, N) with the CPU int4 kernel; padded output columns are dropped."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, kernel_weight, group, table)  # (M, N_pad)
    return y if y.shape[1] == out_features else y[:, :out_features]


# ----- CUDA kernel layout (tinygemm) ---------------------------------------------------------------------
CUDA_INNER_K_TILES = (8, 4, 2)


def to_cuda_layout(packed: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Storage layout -> (tinygemm int32 layout, inner_k_tiles). Raises if the shape or GPU is unsupported."""
    n, half = packed.shape
    k = 2 * half
    tiles = next((t for t in CUDA_INNER_K_TILES if k % (t * 16) == 0), None)
    if tiles is None or n % 8:
        raise ValueError(f"tinygemm needs K % 32 == 0 and N % 8 == 0, got N={n}, K={k}")
    unsigned = (packed.view(torch.uint8) ^ 0x88).contiguous()  # signed nibbles -> offset +8, same order
    return torch.ops.aten._convert_weight_to_int4pack(unsigned, tiles), tiles


def int4_cuda_matmul(x: torch.Tensor, kernel_weight: torch.Tensor, group: int, table: torch.Tensor
                     ) -> torch.Tensor:
    return torch.ops.aten._weight_int4pack_mm(x, kernel_weight, group, table)
