"""Quantized drop-ins for ``nn.Linear`` and ``nn.Embedding``.

Both hold the storage layout as buffers named like the original's: ``weight`` (int8 (N, K) or packed int4
(N, K/2)) and ``weight_scale`` (N,), plus an unchanged float ``bias``. ``QuantizedLinear.prepare()`` (called
once after loading) repacks the weight for the device's fused kernel; ``state_dict()`` always gives the
storage layout back, so a prepared model saves the same checkpoint it was loaded from.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..kernels import cpu as cpu_kernels
from . import cuda_kernel, int4, int8

# INT8: up to this many rows (tokens x batch) the fused kernel beats casting the matrix to the compute
# dtype for oneDNN's GEMM (measured on 2 AVX-512 cores, 16384x4096: equal around 16-32 rows). INT4 always
# uses its kernel: unpacking the whole matrix costs more than the kernel's extra compute up to prefill sizes.
INT8_FUSED_MAX_ROWS = 16


def check_bits(bits: int, where: str = "bits") -> int:
    if bits not in (4, 8):
        raise ValueError(f"{where} must be 8 or 4 (weight-only INT8 / INT4), got {bits!r}")
    return bits


def stored_columns(in_features: int, bits: int) -> int:
    if bits == 4 and in_features % 2:
        raise ValueError(f"INT4 packs two values per byte: in_features must be even, got {in_features}")
    return in_features if bits == 8 else in_features // 2


class QuantizedLinear(nn.Module):
    """Weight-only INT8/INT4 Linear: y = x (q * scale)^T + bias, computed without a float copy of W when a
    fused kernel exists for this device (see ``prepare``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 persistent: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, check_bits(bits)
        cols = stored_columns(in_features, bits)
        self.register_buffer("weight", torch.empty(out_features, cols, dtype=torch.int8, device=device),
                             persistent=persistent)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=dtype or int8.SCALE_DTYPE,
                                                         device=device), persistent=persistent)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)
        self.layout = "storage"  # or "cpu_int4", "cuda_int4": the weight buffer holds a kernel layout
        self._group = 0
        # INT4 kernels' per-group [scale, zero] table (a buffer so .to(dtype) follows; never saved)
        self.register_buffer("_table", None, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int) -> QuantizedLinear:
        """Quantize a materialised Linear (its float weight is released by the caller dropping it)."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, bits=bits, dtype=w.dtype,
                  device=w.device)
        q, scale = (int8.quantize_int8 if bits == 8 else int4.quantize_int4)(w)
        mod.weight, mod.weight_scale = q, scale.to(w.dtype)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return mod.prepare()

    # ----- runtime layout ---------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    @torch.no_grad()
    def prepare(self) -> QuantizedLinear:
        """Repack the weight for this device's fused kernel (idempotent). INT8 needs no repacking."""
        if self.bits == 8 or self.layout != "storage" or self.weight.is_meta:
            return self
        dev = self.weight.device
        group = int4.cpu_group_size(self.in_features)
        if dev.type == "cpu" and cpu_kernels.enabled() and self.in_features % 32 == 0:
            return self  # visualglm's CPU kernel reads the storage layout (few rows; more: the dense path)
        if dev.type == "cpu" and group is not None and int4.cpu_block_rows() is not None:
            kernel = int4.to_cpu_layout(self.weight)
            self._table = int4.cpu_scales_and_zeros(self.weight_scale, self.in_features, kernel.shape[0], group)
            self.weight, self.layout, self._group = kernel, "cpu_int4", group
        elif dev.type == "cuda" and group is not None and self.compute_dtype == torch.bfloat16:
            self._prepare_cuda(group)  # tinygemm (bf16 only); else the Triton kernel reads the storage layout
        return self

    def _prepare_cuda(self, group: int) -> None:
        try:
            kernel, _ = int4.to_cuda_layout(self.weight)
            table = torch.zeros(self.in_features // group, self.out_features, 2, dtype=self.compute_dtype,
                                device=self.weight.device)
            table[:, :, 0] = self.weight_scale
            probe = torch.zeros(1, self.in_features, dtype=self.compute_dtype, device=self.weight.device)
            int4.int4_cuda_matmul(probe, kernel, group, table)
        except (RuntimeError, ValueError, NotImplementedError):
            return  # e.g. a pre-Ampere GPU: keep the storage layout and the generic path
        self.weight, self._table, self.layout, self._group = kernel, table, "cuda_int4", group

    def storage_weight(self) -> torch.Tensor:
        """The weight in the storage (checkpoint) layout, whatever the runtime layout."""
        if self.layout == "storage":
            return self.weight
        if self.layout == "cpu_int4":
            return int4.from_cpu_layout(self.weight, self.out_features)
        return self._cuda_storage_weight()

    def _cuda_storage_weight(self) -> torch.Tensor:
        """tinygemm's layout is opaque: read it back through the kernel, a block of unit rows at a time."""
        ones = self._table.clone()
        ones[..., 0], ones[..., 1] = 1.0, 0.0
        cols = []
        for lo in range(0, self.in_features, 1024):
            eye = torch.eye(self.in_features, dtype=self.compute_dtype, device=self.weight.device)[lo: lo + 1024]
            cols.append(int4.int4_cuda_matmul(eye, self.weight, self._group, ones).round().to(torch.int8))
        return int4.pack_int4(torch.cat(cols).t().contiguous())

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, K) float weight (for merging, debugging and the fallback path)."""
        q = self.storage_weight()
        q = q if self.bits == 8 else int4.unpack_int4(q)
        return (q.to(torch.float32) * self.weight_scale.float()[:, None]).to(dtype or self.compute_dtype)

    # ----- forward -------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        grad = torch.is_grad_enabled() and (x2.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if self.layout == "storage" and not grad and cuda_kernel.available(x2):  # CUDA decoding: bias fused
            y = cuda_kernel.weight_only_mm(x2, self.weight, self.weight_scale, self.bias, self.bits)
        else:
            y = self._matmul(x2)  # (M, N)
            if self.bias is not None:
                y = y + self.bias
        return y.view(*lead, self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and x.requires_grad  # the fused kernels have no backward
        packed_for = self.layout.split("_")[0]  # "cpu" / "cuda" for a kernel layout
        if self.layout != "storage" and self.weight.device.type != packed_for:
            raise RuntimeError(f"this INT4 layer was packed for {packed_for} kernels but moved to "
                               f"{self.weight.device}; load the model on the device it runs on")
        if self.layout == "storage" and not grad and cpu_kernels.serves(x, x.shape[0], self.in_features):
            y = cpu_kernels.gemv(x, self.weight, cpu_kernels.INT8 if self.bits == 8 else cpu_kernels.INT4, self.weight_scale)
            if y is not None:
                return y.to(x.dtype)
        if self.layout == "cpu_int4" and not grad:
            return int4.int4_cpu_matmul(x.contiguous(), self.weight, self._group, self._table, self.out_features)
        if self.layout == "cuda_int4" and not grad:
            return int4.int4_cuda_matmul(x.contiguous(), self.weight, self._group, self._table)
        # Many rows (or autograd): cast the integer values to the compute dtype block by block for a dense
        # GEMM (exact), scale the output. float32 where bf16/fp16 GEMMs are emulated (see kernels.cpu).
        xc = x.float() if not grad and cpu_kernels.upcasts(x) else x
        if self.bits == 8:
            small = x.shape[0] <= INT8_FUSED_MAX_ROWS
            # torch's kernel on CUDA streams 100-230 GB/s on an H100: slower than casting blocks for cuBLAS
            fused = not grad and small and x.device.type == "cpu" and int8.fused_int8_available(x.device, x.dtype)
            if fused:
                return int8.int8_matmul(x.contiguous(), self.weight, self.weight_scale, fused=True)
            return int8.int8_matmul(xc, self.weight, self.weight_scale.to(xc.dtype), fused=False).to(x.dtype)
        n = self.out_features
        if self.layout == "cpu_int4":
            rows = lambda lo, hi: int4.cpu_layout_rows(self.weight, lo, hi)  # noqa: E731
        else:
            storage = self.storage_weight()
            rows = lambda lo, hi: _int4_values(storage[lo:hi])  # noqa: E731
        return (int8.dense_matmul(xc, rows, n) * self.weight_scale.to(xc.dtype)).to(x.dtype)

    # ----- state dict: always the storage layout ---------------------------------------------------------
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "storage" and prefix + "weight" in destination:
            destination[prefix + "weight"] = self.storage_weight()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.layout != "storage":  # back to the storage layout first, then copy, then repack
            self.weight, self.layout, self._table = self.storage_weight(), "storage", None
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
            self.prepare()
            return
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, bits={self.bits}, layout={self.layout}")


def _int4_values(packed: torch.Tensor) -> torch.Tensor:
    """Storage-layout rows -> their values, through the CPU kernels where they serve (memory speed)."""
    values = cpu_kernels.unpack_int4(packed)
    return values if values is not None else int4.unpack_int4(packed)


class QuantizedEmbedding(nn.Module):
    """Weight-only INT8/INT4 embedding table: looked-up rows are dequantized (q * scale) on the fly."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, bits: int = 8, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, check_bits(bits)
        cols = stored_columns(embedding_dim, bits)
        self.register_buffer("weight", torch.empty(num_embeddings, cols, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.empty(num_embeddings, dtype=dtype or int8.SCALE_DTYPE,
                                                         device=device))

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, bits: int) -> QuantizedEmbedding:
        w = emb.weight.detach()
        mod = cls(emb.num_embeddings, emb.embedding_dim, bits=bits, dtype=w.dtype, device=w.device)
        q, scale = (int8.quantize_int8 if bits == 8 else int4.quantize_int4)(w)
        mod.weight, mod.weight_scale = q, scale.to(w.dtype)
        return mod

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids]  # (..., K) int8 or (..., K/2) packed
        if self.bits == 4:
            rows = int4.unpack_int4(rows.reshape(-1, rows.shape[-1])).view(*ids.shape, self.embedding_dim)
        return rows.to(self.weight_scale.dtype) * self.weight_scale[ids].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"
