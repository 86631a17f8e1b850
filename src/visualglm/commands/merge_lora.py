"""``visualglm merge-lora [BASE] ADAPTER OUT``: a standalone checkpoint equal to base + LoRA adapter."""

from __future__ import annotations

import argparse
import sys

from ..api import parse_dtype


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="[BASE] ADAPTER OUT; BASE defaults to the base recorded in the adapter")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="dtype to store (default: as the base stores it); the merge is done in float32")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder to copy in (default: the base's)")
    parser.add_argument("--shard-size", default="2GB", help="largest shard, e.g. 500MB, 2GB")
    parser.add_argument("--trust-pickle", action="store_true", help="allow base pickles holding non-tensors")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from ..peft.adapters import AdapterError
    from ..peft.merge import merge_lora_checkpoint
    from .convert import parse_size

    if len(args.paths) not in (2, 3):
        print("error: expected [BASE] ADAPTER OUT (two or three paths)", file=sys.stderr)
        return 2
    base, adapter, out = ([None] + args.paths if len(args.paths) == 2 else args.paths)
    try:
        path = merge_lora_checkpoint(adapter, out, base=base, dtype=parse_dtype(args.dtype),
                                     tokenizer=args.tokenizer, shard_bytes=parse_size(args.shard_size),
                                     overwrite=args.overwrite, trust_pickle=args.trust_pickle)
    except (AdapterError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
