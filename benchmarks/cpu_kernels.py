"""visualglm's CPU kernels against torch's, side by side in one process, on the GLM-6B matrix shapes.

Decode (one row): GB/s of weights streamed by ``F.linear`` / ``_weight_int8pack_mm`` / torch's INT4 kernel and
by ``kernels/gemv.c``, alternating call by call over 4 copies of each matrix (more than the L3 cache), with
the copy bandwidth measured in the same run. Prefill (64 rows) and image encoding (257 rows): ms of a bf16
``F.linear`` against the float32 GEMM on blocks cast from bf16 (``kernels.cpu.upcast_linear``).

    python benchmarks/cpu_kernels.py [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as `import visualglm` sets it, before torch loads

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from visualglm.bench import measure_bandwidth  # noqa: E402
from visualglm.kernels import cpu  # noqa: E402
from visualglm.quant import int4, int8  # noqa: E402

GLM_SHAPES = {"query_key_value": (12288, 4096), "dense": (4096, 4096), "dense_h_to_4h": (16384, 4096),
              "dense_4h_to_h": (4096, 16384)}
COPIES = 4


def alternate(fns: dict[str, object], rounds: int = 15) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved so drifts hit all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 2):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            if r >= 2:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def decode_rows(n: int, k: int, g: torch.Generator) -> dict[str, dict[str, float]]:
    i = [0]

    def nxt() -> int:
        i[0] = (i[0] + 1) % COPIES
        return i[0]

    x = torch.randn(1, k, generator=g).bfloat16()
    out: dict[str, dict[str, float]] = {}
    w = [torch.randn(n, k, generator=g).bfloat16() for _ in range(COPIES)]
    t = alternate({"torch": lambda: F.linear(x, w[nxt()]), "visualglm": lambda: cpu.gemv(x, w[nxt()], 1)})
    out["bf16"] = {name: n * k * 2 / s / 1e9 for name, s in t.items()}
    q8 = [int8.quantize_int8(torch.randn(n, k, generator=g)) for _ in range(COPIES)]
    t = alternate({"torch": lambda: torch.ops.aten._weight_int8pack_mm(x, q8[j := nxt()][0], q8[j][1].bfloat16()),
                   "visualglm": lambda: cpu.gemv(x, q8[j := nxt()][0], cpu.INT8, q8[j][1])})
    out["int8"] = {name: n * k / s / 1e9 for name, s in t.items()}
    q4 = [int4.quantize_int4(torch.randn(n, k, generator=g)) for _ in range(COPIES)]
    group = int4.cpu_group_size(k)
    kernel_layout = [int4.to_cpu_layout(p) for p, _ in q4]
    tables = [int4.cpu_scales_and_zeros(s.bfloat16(), k, kernel_layout[0].shape[0], group) for _, s in q4]
    t = alternate({"torch": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, kernel_layout[j := nxt()], group, tables[j]),
        "visualglm": lambda: cpu.gemv(x, q4[j := nxt()][0], cpu.INT4, q4[j][1])})
    out["int4"] = {name: n * k / 2 / s / 1e9 for name, s in t.items()}
    return out


@torch.inference_mode()  # upcast_linear serves inference only
def many_rows(rows: int, n: int, k: int, g: torch.Generator) -> dict[str, float]:
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    t = alternate({"torch_bf16": lambda: F.linear(x, w), "visualglm_fp32": lambda: cpu.upcast_linear(x, w)},
                  rounds=5)
    return {name: 1e3 * s for name, s in t.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["VISUALGLM_CPU_GEMV"] = "1"
    torch.backends.mkldnn.enabled = False  # torch's faster one-row bf16 path, as decoding uses it
    g = torch.Generator().manual_seed(0)
    result: dict[str, object] = {"threads": torch.get_num_threads(),
                                 "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                 "bandwidth_gbs_before": measure_bandwidth(torch.device("cpu"), 256 * 2**20)}
    decode = {}
    for name, (n, k) in GLM_SHAPES.items():
        decode[name] = decode_rows(n, k, g)
        for kind, r in decode[name].items():
            print(f"decode {name:16s} {n:5d}x{k:<5d} {kind}: torch {r['torch']:5.1f} GB/s, visualglm "
                  f"{r['visualglm']:5.1f} GB/s ({r['visualglm'] / r['torch']:.2f}x)", flush=True)
    result["decode_gbs"] = decode
    torch.backends.mkldnn.enabled = True
    gemm = {}
    for label, rows, (n, k) in (("prefill dense_h_to_4h", 64, GLM_SHAPES["dense_h_to_4h"]),
                                ("vit-g mlp fc1", 257, (6144, 1408))):
        gemm[label] = many_rows(rows, n, k, g)
        r = gemm[label]
        print(f"{label:22s} {rows}x{n}x{k}: torch bf16 {r['torch_bf16']:6.1f} ms, float32 upcast "
              f"{r['visualglm_fp32']:6.1f} ms ({r['torch_bf16'] / r['visualglm_fp32']:.2f}x)", flush=True)
    result["many_rows_ms"] = gemm
    result["bandwidth_gbs_after"] = measure_bandwidth(torch.device("cpu"), 256 * 2**20)
    print(f"copy bandwidth: {result['bandwidth_gbs_before']:.1f} / {result['bandwidth_gbs_after']:.1f} GB/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
