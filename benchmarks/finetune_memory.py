"""Peak memory of LoRA / QLoRA fine-tuning of the full VisualGLM-6B configuration (random weights).

Step 1 writes a random bf16 ``visualglm-6b`` checkpoint (streamed: one 2 GB shard in memory at a time):
    python benchmarks/finetune_memory.py make --out /tmp/vglm6b --tokenizer ../shared/reference/tokenizer
Step 2 fine-tunes it for a few steps, batch 1, gradient checkpointing on, and prints peak memory (process RSS
on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), after setup and during training:
    python benchmarks/finetune_memory.py run --model /tmp/vglm6b --method qlora --steps 3
Run one method per process: peak RSS is a per-process number.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch


def rss_gib() -> tuple[float, float]:
    """(current, peak since the last reset) resident memory of this process, GiB (from /proc)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kib = lambda k: int(fields[k].strip().split()[0])  # noqa: E731
    return kib("VmRSS") / 2**20, kib("VmHWM") / 2**20


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def make(args: argparse.Namespace) -> None:
    from visualglm.checkpoint.write import write_checkpoint
    from visualglm.config import VisualGLMConfig
    from visualglm.model.visualglm import VisualGLM

    config = VisualGLMConfig.from_name("visualglm-6b")
    with torch.device("meta"):
        shapes = [(n, tuple(p.shape)) for n, p in VisualGLM(config).state_dict().items()]
    g = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in shapes:
            if name.endswith("bias"):
                yield name, torch.zeros(shape, dtype=torch.bfloat16)
            elif "layernorm" in name or "ln_vision" in name:
                yield name, torch.ones(shape, dtype=torch.bfloat16)
            else:
                std = 0.02 if len(shape) < 2 or "embeddings" in name else 1 / math.sqrt(shape[-1])
                yield name, (torch.randn(shape, generator=g) * std).to(torch.bfloat16)

    t = time.perf_counter()
    write_checkpoint(args.out, config, tensors(), tokenizer_dir=args.tokenizer, dtype=torch.bfloat16,
                     overwrite=True)
    print(f"wrote {args.out} in {time.perf_counter() - t:.0f} s; peak RSS {rss_gib()[1]:.2f} GiB")


def run(args: argparse.Namespace) -> None:
    from PIL import Image

    from visualglm.finetune.config import from_dict
    from visualglm.finetune.recipe import FinetuneRecipe

    work = Path(tempfile.mkdtemp(prefix="ftmem-"))
    Image.new("RGB", (320, 240), (200, 40, 40)).save(work / "red.png")
    record = {"img": "red.png", "prompt": "这张图片的背景是什么颜色？",
              "label": "这张图片的背景是红色的，画面中没有其他物体。"}
    (work / "data.json").write_text(json.dumps([record] * 4, ensure_ascii=False), encoding="utf-8")
    cfg = from_dict({
        "method": args.method, "model": args.model, "output_dir": str(work / "out"),
        "data": {"train": str(work / "data.json")}, "lora": {"rank": 10},
        "train": {"steps": args.steps, "batch_size": 1, "micro_batch_size": 1, "dtype": "bfloat16",
                  "precision": "bf16", "gradient_checkpointing": True, "progress": False,
                  "eval_generate": False, "device": args.device},
    })
    cuda = args.device.startswith("cuda")
    t = time.perf_counter()
    recipe = FinetuneRecipe(cfg, log=lambda m: print(m, flush=True)).setup()
    setup_s = time.perf_counter() - t
    _, setup_peak = rss_gib()
    setup_gpu = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    reset_peak()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        info = recipe.train_step()
        times.append(time.perf_counter() - t)
        print(f"step {info['step']}: loss {info['loss']:.4f}, {times[-1]:.1f} s, RSS now/peak "
              "%.2f/%.2f GiB" % rss_gib(), flush=True)
    result = {"method": args.method, "device": args.device, "steps": args.steps, "setup_s": round(setup_s, 1),
              "step_s": [round(x, 1) for x in times], "rss_peak_setup_gib": round(setup_peak, 2),
              "rss_peak_train_gib": round(rss_gib()[1], 2),
              "ru_maxrss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
              "trainable_params": sum(p.numel() for p in recipe.trainable.values())}
    if cuda:
        result["gpu_peak_setup_gib"] = round(setup_gpu, 2)
        result["gpu_peak_train_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write a random bf16 visualglm-6b checkpoint")
    m.add_argument("--out", required=True)
    m.add_argument("--tokenizer", required=True, help="folder with ice_text.model")
    r = sub.add_parser("run", help="fine-tune it for a few steps and report peak memory")
    r.add_argument("--model", required=True)
    r.add_argument("--method", choices=["lora", "qlora"], default="qlora")
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--device", default="cpu")
    args = p.parse_args()
    make(args) if args.cmd == "make" else run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
