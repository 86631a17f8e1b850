"""Weight-only matmul kernels on CUDA, side by side: GB/s of weights read per product, for the GLM shapes.

    python benchmarks/cuda_kernels.py [--json out.json]

Per shape (N, K) and rows M: cuBLAS fp16/bf16 (F.linear), the Triton INT8/INT4 kernel (fp16 and bf16),
torch's tinygemm INT4 (bf16, repacked layout) and ``_weight_int8pack_mm`` where CUDA has it. Each product is
timed from a cold L2 cache (``triton.testing.do_bench`` clears it before every run, which also hides the
Python launch cost behind the clearing kernel): the median of CUDA-event timings. The copy bandwidth of the same run is printed for scale.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton.testing

from visualglm.quant import cuda_kernel, int4, int8

SHAPES = {"qkv": (12288, 4096), "dense": (4096, 4096), "h_to_4h": (16384, 4096), "4h_to_h": (4096, 16384),
          "lm_head": (130528, 4096)}


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200, return_mode="median")
    return 2 * nbytes / ms / 1e6


def timed(fn, *args) -> float:
    """Median ms of ``fn(*args)``, L2 cleared before each call."""
    fn(*args)  # autotune / compile first
    return triton.testing.do_bench(lambda: fn(*args), warmup=25, rep=200, return_mode="median")


def bench_shape(n: int, k: int, m: int) -> dict[str, float]:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, generator=g, device="cuda", dtype=torch.float16)
    out: dict[str, float] = {}
    for dt in (torch.float16, torch.bfloat16):
        x = torch.randn(m, k, generator=g, device="cuda").to(dt)
        wd = w.to(dt)
        name = "fp16" if dt == torch.float16 else "bf16"
        out[f"cublas_{name}"] = n * k * 2 / timed(F.linear, x, wd) / 1e6
        del wd
        for bits in (8, 4):
            q, s = (int8.quantize_int8 if bits == 8 else int4.quantize_int4)(w)
            s = s.to(dt)
            ms = timed(cuda_kernel.weight_only_mm, x, q, s, None, bits)
            out[f"triton_int{bits}_{name}"] = q.numel() / ms / 1e6
            if bits == 4 and dt == torch.bfloat16:
                try:
                    group = int4.cpu_group_size(k)
                    packed = int4.to_cuda_layout(q)[0]
                    table = torch.zeros(k // group, n, 2, dtype=dt, device="cuda")
                    table[:, :, 0] = s
                    ms = timed(int4.int4_cuda_matmul, x, packed, group, table)
                    out["tinygemm_int4_bf16"] = q.numel() / ms / 1e6
                except (RuntimeError, ValueError) as e:
                    out["tinygemm_int4_bf16"] = float("nan")
                    print("tinygemm:", str(e).splitlines()[0])
            if bits == 8 and int8.fused_int8_available(x.device, dt):
                ms = timed(torch.ops.aten._weight_int8pack_mm, x, q, s)
                out[f"aten_int8pack_{name}"] = q.numel() / ms / 1e6
    return out


def check_kernel() -> float:
    """Largest relative error of the Triton kernel against the dequantized weight, on fresh random data."""
    worst = 0.0
    g = torch.Generator(device="cuda").manual_seed(1)
    for bits in (8, 4):
        for dt in (torch.float16, torch.bfloat16):
            for m in (1, 7, 32, 64):
                w = torch.randn(4104, 4160, generator=g, device="cuda")
                b = torch.randn(4104, generator=g, device="cuda").to(dt)
                q, s = (int8.quantize_int8 if bits == 8 else int4.quantize_int4)(w)
                s = s.to(dt)
                x = torch.randn(m, 4160, generator=g, device="cuda").to(dt)
                ref = cuda_kernel.reference(x, q, s, b, bits)
                y = cuda_kernel.weight_only_mm(x, q, s, b, bits)
                worst = max(worst, ((y.float() - ref).norm() / ref.norm()).item())
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--rows", default="1,8,32")
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "torch": torch.__version__, "triton": triton.__version__,
              "copy_gbs": copy_bandwidth(), "kernel_max_rel_error": check_kernel(), "shapes": {}}
    print(f"{props.name}: copy {result['copy_gbs']:.0f} GB/s; kernel max rel error "
          f"{result['kernel_max_rel_error']:.2e}")
    for m in (int(r) for r in args.rows.split(",")):
        for label, (n, k) in SHAPES.items():
            row = bench_shape(n, k, m)
            result["shapes"][f"{label}_m{m}"] = row
            print(f"M={m:<3} {label:<8} " + "  ".join(f"{key} {v:6.0f}" for key, v in row.items()), flush=True)
    for name, tuner in (("gemv", cuda_kernel._gemv), ("gemm", cuda_kernel._gemm)):  # the autotuner's picks
        picks = {str(key): str(cfg) for key, cfg in tuner.cache.items()}
        result[f"configs_{name}"] = picks
        for key, cfg in picks.items():
            print(name, key, cfg)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
