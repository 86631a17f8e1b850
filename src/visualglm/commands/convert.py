"""``visualglm convert SRC DST``: any supported checkpoint -> our self-contained safetensors folder."""

from __future__ import annotations

import argparse

from ..api import parse_dtype


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source checkpoint folder (sat, HF or ours)")
    parser.add_argument("dst", help="new folder to write")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder to copy in (sat folders have none)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="store weights in this dtype (default: as in the source)")
    parser.add_argument("--shard-size", default="2GB", help="largest shard, e.g. 500MB, 2GB")
    parser.add_argument("--qkv-layout", default="auto", choices=["auto", "contiguous", "interleaved"])
    parser.add_argument("--trust-pickle", action="store_true", help="allow pickles holding non-tensors")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")


def parse_size(text: str) -> int:
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            try:
                return int(float(t[: -len(unit)]) * mult)
            except ValueError:
                break
    if t.isdigit():
        return int(t)
    raise SystemExit(f"error: bad --shard-size {text!r}; use e.g. 500MB or 2GB")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.convert import convert

    out = convert(args.src, args.dst, tokenizer=args.tokenizer, dtype=parse_dtype(args.dtype),
                  shard_bytes=parse_size(args.shard_size), qkv_layout=args.qkv_layout,
                  trust_pickle=args.trust_pickle, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0
