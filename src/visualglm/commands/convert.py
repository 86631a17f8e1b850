"""``visualglm convert SRC DST``: any supported checkpoint -> our self-contained safetensors folder."""

from __future__ import annotations

import argparse
import re
import sys

from ..api import parse_dtype

_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="source checkpoint folder (sat, HF or ours)")
    parser.add_argument("dst", help="new folder to write (written atomically)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder (ice_text.model, tokenizer_config.json) to copy in; "
                             "default: the source's own (sat folders have none)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="store floating weights in this dtype (default: as in the source)")
    parser.add_argument("--shard-size", default="2GB", type=parse_size,
                        help="largest shard, e.g. 500MB, 2GB (default 2GB)")
    parser.add_argument("--qkv-layout", default="auto", choices=["auto", "contiguous", "interleaved"],
                        help="sat GLM query_key_value rows: contiguous (sat since July 2023), interleaved "
                             "(older); auto-detected from the weights, contiguous when undecidable")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow pickled checkpoints that hold more than tensors "
                             "(only for files you trust)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--quantize", type=int, default=None, choices=[8, 4],
                        help="store the GLM block linears as weight-only INT8/INT4 (loads without re-quantizing)")
    parser.add_argument("--quantize-extras", default="",
                        help="with --quantize: comma list of lm_head,embeddings,vision to store as INT8 too")


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GB', '1048576' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use a positive size such as 500MB or 2GB")
    unit = m.group(2) if m.group(2) in _UNITS else m.group(2) + "B"
    return max(1, int(float(m.group(1)) * _UNITS[unit]))


def run(args: argparse.Namespace) -> int:
    from ..checkpoint.convert import convert
    from ..checkpoint.io import CheckpointError

    try:
        out = convert(args.src, args.dst, tokenizer=args.tokenizer, dtype=parse_dtype(args.dtype),
                      shard_bytes=args.shard_size, qkv_layout=args.qkv_layout,
                      trust_pickle=args.trust_pickle, overwrite=args.overwrite, quantize=args.quantize,
                      quantize_extras=[x.strip() for x in args.quantize_extras.split(",") if x.strip()])
    except (CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    if not (out / "ice_text.model").is_file():
        print(f"note: {out} has no tokenizer files; pass --tokenizer DIR to make it self-contained",
              file=sys.stderr)
    return 0
