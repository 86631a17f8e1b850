"""Streaming conversion: tensors flow from the source files to our shards one at a time."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch

from .io import DEFAULT_SHARD_BYTES, inspect, iter_canonical
from .write import write_checkpoint


def convert(src_dir: str | Path, dst_dir: str | Path, *, tokenizer: str | Path | None = None,
            dtype: torch.dtype | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
            qkv_layout: str = "auto", trust_pickle: bool = False, overwrite: bool = False,
            quantize: int | None = None, quantize_extras: Sequence[str] = ()) -> Path:
    """Convert a sat, HF or our folder into ours: config.json, ``model-0000i-of-0000n.safetensors`` shards
    + index and the tokenizer files (from ``tokenizer``, else the source's own), written atomically.

    Memory stays at about one shard: each tensor is read, cast to ``dtype`` (floating tensors; default: as
    stored) and handed to the shard writer before the next is read.

    ``quantize`` (8 or 4) stores the GLM block linears (plus ``quantize_extras``: "lm_head", "embeddings",
    "vision" at INT8) as weight-only INT8/INT4 in the original's scheme, quantized one tensor at a time; the
    record in config.json makes ``visualglm.load`` take them as they are. Scales stay float16.
    """
    src = inspect(src_dir, trust_pickle=trust_pickle)
    tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else src.tokenizer_dir
    canonical = iter_canonical(src, qkv_layout=qkv_layout, trust_pickle=trust_pickle, dtype=dtype)
    tensors = ((name, t) for _, name, t in canonical)
    config = src.config
    if quantize is not None or quantize_extras:
        from ..quant.handlers import quantize_state_dict, resolve_quant

        config = copy.deepcopy(config)
        config.quant = resolve_quant(config.quant, quantize, quantize_extras)
        tensors = quantize_state_dict(tensors, config)
        dtype = None  # floating weights were cast above; keep the float16 scales as they are
    return write_checkpoint(dst_dir, config, tensors, tokenizer_dir=tok_dir, shard_bytes=shard_bytes,
                            dtype=dtype, overwrite=overwrite)
