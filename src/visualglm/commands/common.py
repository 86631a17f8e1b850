"""Flags and loading shared by every command that needs a model: one way to get one."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="checkpoint folder (ours, sat or HF); default: the demo model shipped in the package")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (needed for sat folders)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: best available)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: fp32 for small models on CPU, bf16 from 1B params / on GPU)")
    g.add_argument("--qkv-layout", default="auto", choices=["auto", "contiguous", "interleaved"],
                   help="sat GLM query_key_value row layout (auto-detected)")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow pickled checkpoints that hold more than tensors (only for files you trust)")
    g.add_argument("--quant", type=int, default=None, choices=[8, 4],
                   help="weight-only INT8/INT4 GLM block linears, quantized while loading (a checkpoint saved "
                        "quantized loads as stored without it)")
    g.add_argument("--quant-extras", default="",
                   help="with --quant: comma list of lm_head,embeddings,vision to quantize as well (INT8)")
    add_compile_flag(g)
    g.add_argument("--adapter", default=None, help="LoRA / P-tuning adapter folder to use on top of --model "
                   "(without merging); alone, it loads the base it records")


def compile_mode(text: str) -> bool | str:
    if text != "graphs":
        raise argparse.ArgumentTypeError(f"--compile takes no value (torch.compile) or 'graphs' (CUDA graphs of the "
                                         f"eager step), got {text!r}")
    return text


def add_compile_flag(parser: Any) -> None:
    parser.add_argument("--compile", nargs="?", const=True, default=False, type=compile_mode, metavar="graphs",
                        help="torch.compile the decode step, on CUDA replayed as CUDA graphs (slower start, faster "
                             "tokens; CPU needs a C++ compiler); '--compile graphs': CUDA graphs without compiling")


def load_from_args(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..api import load
    from ..checkpoint.files import CheckpointError

    adapter = getattr(args, "adapter", None)  # no --model: the adapter's recorded base, else the demo model
    try:
        return load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
                    qkv_layout=args.qkv_layout, trust_pickle=args.trust_pickle, adapter=adapter,
                    quantize=getattr(args, "quant", None), quantize_extras=quant_extras(args),
                    compile=getattr(args, "compile", False))
    except (FileNotFoundError, CheckpointError) as e:  # a user's path problem: a message, not a traceback
        raise SystemExit(f"error: {e}") from None


def quant_extras(args: argparse.Namespace) -> list[str]:
    return [x.strip() for x in getattr(args, "quant_extras", "").split(",") if x.strip()]
