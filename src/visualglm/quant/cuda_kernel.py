"""Weight-only INT8/INT4 matmul for CUDA decoding, in Triton: ``y = x @ (q * scale)^T (+ bias)``.

Reads the checkpoint's storage layout as it lies (int8 (N, K); int4 packed two per byte (N, K/2), the even
column in the high nibble), so nothing is repacked at load time and one kernel serves fp16 and bf16
(torch's tinygemm INT4 kernel is bf16-only and is preferred there: it streams INT4 faster at batch 1).
One row (batch-1 decoding): a matrix-vector product on the CUDA cores. Up to ``MAX_ROWS`` rows: ``tl.dot``
tiles on the tensor cores. More rows (prefill, image encoding) go to cuBLAS on dequantized blocks
(``int8.dense_matmul``). Calls go through the ``visualglm::weight_only_mm`` custom op, so ``torch.compile``
and CUDA-graph capture see one opaque op; block sizes are autotuned per shape on first use (in the warm-up
before a graph is captured), from a cold L2 cache as in decoding. ``benchmarks/cuda_kernels.py`` measures it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs never get here
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

MAX_ROWS = 64  # above this cuBLAS wins (compute-bound)
DTYPES = (torch.float16, torch.bfloat16)


def available(x: torch.Tensor) -> bool:
    """Does the Triton kernel serve this input (a CUDA fp16/bf16 tensor with few rows)?"""
    return triton is not None and x.is_cuda and x.dtype in DTYPES and x.numel() // x.shape[-1] <= MAX_ROWS


if triton is not None:
    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                     BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        n_ok = rn < N
        m_ok = rm < M
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            if BITS == 4:  # byte j: column 2j in the high nibble, 2j + 1 in the low one (two's complement)
                rh = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                b = tl.load(w_ptr + rn[:, None] * stride_wn + rh[None, :],
                            mask=n_ok[:, None] & (rh < K // 2)[None, :], other=0)
                hi = b >> 4
                lo = (b << 4).to(tl.int8) >> 4
                w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))
            else:
                w = tl.load(w_ptr + rn[:, None] * stride_wn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                            other=0)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)
            if BLOCK_M == 1:  # |q| <= 127: exact in fp32; products and sums in fp32
                acc += tl.sum(w.to(tl.float32) * x.to(tl.float32), axis=1)[None, :]
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        out = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if HAS_BIAS:
            out = out + tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], out.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])

    def _config(n: int, k: int, warps: int, stages: int) -> triton.Config:
        return triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=warps, num_stages=stages)

    GEMV_CONFIGS = [_config(*c) for c in ((4, 1024, 4, 4), (8, 512, 4, 3), (8, 1024, 4, 3), (16, 256, 4, 4),
                                          (16, 512, 4, 3), (16, 1024, 8, 3), (32, 256, 4, 3), (32, 512, 8, 3))]
    GEMM_CONFIGS = [_config(*c) for c in ((16, 256, 4, 4), (16, 512, 4, 3), (32, 128, 4, 4), (32, 256, 4, 3),
                                          (64, 128, 4, 4), (64, 64, 4, 4))]
    _gemv = triton.autotune(GEMV_CONFIGS, key=["N", "K", "BITS"])(_gemv_kernel)
    _gemm = triton.autotune(GEMM_CONFIGS, key=["N", "K", "BITS", "BLOCK_M"])(_gemv_kernel)


def row_block(m: int) -> int:
    """Rows per program: 1 (matrix-vector) or the smallest tensor-core tile >= m (16, 32, 64)."""
    return 1 if m == 1 else max(16, triton.next_power_of_2(m))


def launch(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
           config: dict[str, int] | None = None) -> torch.Tensor:
    """x (M, K) fp16/bf16 contiguous, w as stored (see the module docstring), scale (N,) for INT8/INT4 ->
    (M, N) in x's dtype. ``config`` ({"BLOCK_N", "BLOCK_K"}) skips the autotuner (tests, the interpreter)."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = row_block(m)
    args = (x, w, scale, bias if bias is not None else y, y, m, n, k, x.stride(0),
            w.stride(0), y.stride(0))
    flags = {"BITS": bits, "HAS_BIAS": bias is not None, "BLOCK_M": block_m}
    if config is not None:
        _gemv_kernel[(triton.cdiv(n, config["BLOCK_N"]), triton.cdiv(m, block_m))](*args, **flags, **config)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(m, block_m))  # noqa: E731
        (_gemv if block_m == 1 else _gemm)[grid](*args, **flags)
    return y


@torch.library.custom_op("visualglm::weight_only_mm", mutates_args=())
def weight_only_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
         bits: int) -> torch.Tensor:
    """The op the model calls: ``launch`` with the autotuned block sizes."""
    return launch(x.contiguous(), w, scale, bias, bits)


@weight_only_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],  # noqa: UP045
      bits: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[0])


def reference(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              bits: int) -> torch.Tensor:
    """What the kernel computes, in float32 (tests and the benchmark's check)."""
    if bits == 4:
        from ..quant.int4 import unpack_int4
        w = unpack_int4(w)
    wf = w.float() * scale.float()[:, None]
    return F.linear(x.float(), wf, None if bias is None else bias.float())
