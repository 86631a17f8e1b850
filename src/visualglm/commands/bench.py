"""``visualglm bench``: decode speed against the memory-bandwidth limit, prefill, image encoding, memory.

Example: ``visualglm bench --model visualglm-6b --quant 4 --max-new-tokens 8 --json``.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from .common import add_compile_flag


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="visualglm-6b",
                        help="a named config with random weights (visualglm-6b, tiny) or a checkpoint folder")
    parser.add_argument("--layers", type=int, default=None, help="cut the GLM to N blocks (named configs)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="compute dtype (default: bf16 from 1B parameters on CPU and on GPUs, else fp32)")
    parser.add_argument("--quant", type=int, default=None, choices=[8, 4],
                        help="weight-only INT8/INT4 GLM block linears")
    parser.add_argument("--quant-extras", default="",
                        help="comma list of lm_head,embeddings,vision to quantize as well (INT8)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder (checkpoints without one)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens decoded per run (>= 2)")
    parser.add_argument("--prompt-len", type=int, default=64, help="batch-1 prompt length, image tokens included")
    parser.add_argument("--batch-sizes", default="1,8,32", help="comma list of decode batch sizes")
    parser.add_argument("--batch-prompt-len", type=int, default=16, help="prompt length for batches > 1")
    parser.add_argument("--no-image", action="store_true", help="text-only prompts, no image encoding")
    parser.add_argument("--untied", action="store_true",
                        help="random weights: a separate lm_head matrix (the released checkpoints load tied)")
    add_compile_flag(parser)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def compiled(mode: bool | str) -> str:
    return {False: "", True: ", compiled", "graphs": ", CUDA graphs"}[mode]


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(f"error: {flag} takes a comma list of integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"error: {flag} is empty")
    return values


def run(args: argparse.Namespace) -> int:
    from ..bench import BenchOptions
    from ..bench import run as run_bench

    extras = tuple(x.strip() for x in args.quant_extras.split(",") if x.strip())
    opts = BenchOptions(model=args.model, layers=args.layers, dtype=args.dtype, quant=args.quant,
                        quant_extras=extras, device=args.device, tokenizer=args.tokenizer,
                        prompt_len=args.prompt_len, batch_prompt_len=args.batch_prompt_len,
                        max_new_tokens=args.max_new_tokens, batch_sizes=_ints(args.batch_sizes, "--batch-sizes"),
                        image=not args.no_image, tied=not args.untied, compile=args.compile,
                        threads=args.threads, seed=args.seed)
    try:
        result = run_bench(opts)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.json:
        print(json.dumps(_finite(result)))
    else:
        print(format_report(result))
    return 0


def _finite(value: Any) -> Any:
    """JSON has no NaN: report unmeasured numbers as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def format_report(r: dict[str, Any]) -> str:
    quant = "none" if r["quant"] is None else f"INT{r['quant']['bits']} {'+'.join(r['quant']['targets'])}"
    lines = [
        f"model {r['model']} ({r['weights']} weights), {r['glm_layers']} GLM layers, {r['dtype']}, quant {quant}, "
        f"{r['device']} x{r['threads']} threads{compiled(r['compile'])}",
        f"bandwidth       {r['bandwidth_gbs']:.1f} GB/s (copy; samples "
        f"{', '.join(f'{x:.1f}' for x in r['bandwidth_samples_gbs'])})",
        f"weights         {r['weights_gb']:.2f} GB; read per token {r['weight_bytes_per_token'] / 1e9:.3f} GB",
        f"load            {r['load_s']:.1f} s",
    ]
    if "image_encode_s" in r:
        lines.append(f"image encode    {r['image_encode_s'] * 1e3:.0f} ms")
    if "prefill_s" in r:
        lines.append(f"prefill         {r['prefill_s'] * 1e3:.0f} ms for {r['prefill_tokens']} tokens")
    for b, d in r["decode"].items():
        lines.append(f"decode batch {b:>2}  {d['tokens_per_s']:.2f} tok/s ({d['step_ms']:.1f} ms/step, "
                     f"prefill {d['prefill_s']:.2f} s for {d['prompt_tokens']} tokens/row)")
    if r.get("roofline_ratio") is not None:
        lines.append(f"roofline        {r['achieved_gbs']:.1f} GB/s of {r['bandwidth_gbs']:.1f} = "
                     f"{100 * r['roofline_ratio']:.0f}% (limit {r['roofline_tokens_per_s']:.2f} tok/s)")
    lines.append(f"peak RSS        {r['peak_rss_gb']:.2f} GB (all batches: {r['peak_rss_gb_all_batches']:.2f} GB)")
    if "peak_cuda_gb" in r:
        lines.append(f"peak CUDA       {r['peak_cuda_gb']:.2f} GB")
    return "\n".join(lines)
