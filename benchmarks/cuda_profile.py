"""Where an eager decode step's time goes (torch.profiler), for the 6B shape cut to a few layers.

    python benchmarks/cuda_profile.py [--layers 4] [--compile graphs]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from visualglm.bench import BenchOptions, SpecialIds, _params, build, synthetic_prompt
from visualglm.generation.engine import Engine, Request


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--compile", default="", help="'' (eager), graphs, inductor")
    args = ap.parse_args()
    opts = BenchOptions(model="visualglm-6b", layers=args.layers, dtype=args.dtype, device="cuda")
    model, _, _ = build(opts)
    ids = SpecialIds.for_model(model)
    g = torch.Generator().manual_seed(0)
    prompt, _ = synthetic_prompt(64, g, ids, model.config.image_length, False)
    mode = {"": False, "graphs": "graphs", "inductor": True}[args.compile]
    engine = Engine(model, eos_token_id=ids.eos, bos_token_id=ids.bos, mask_token_ids=(ids.mask, ids.gmask),
                    compile=mode)
    engine.add([Request(prompt, _params(len(prompt), 40, ids))])
    for _ in range(5):
        engine.step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        engine.step()
    torch.cuda.synchronize()
    print(f"{args.layers} layers, {args.compile or 'eager'}: {(time.perf_counter() - t) / 10 * 1e3:.2f} ms/step")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            engine.step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
