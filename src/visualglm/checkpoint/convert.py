"""Streaming conversion: tensors flow from the source files to our shards one at a time."""

from __future__ import annotations

from pathlib import Path

import torch

from .io import DEFAULT_SHARD_BYTES, inspect, iter_canonical, write_checkpoint


def convert(src_dir: str | Path, dst_dir: str | Path, *, tokenizer: str | Path | None = None,
            dtype: torch.dtype | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES, qkv_layout: str = "auto",
            trust_pickle: bool = False, overwrite: bool = False) -> Path:
    src = inspect(src_dir)
    tok_dir = Path(tokenizer) if tokenizer is not None else src.tokenizer_dir
    config = src.config
    tied = config.glm.tie_word_embeddings

    def tensors():
        for _, name, t in iter_canonical(src, qkv_layout=qkv_layout, trust_pickle=trust_pickle):
            if tied and name == "glm.lm_head.weight":
                continue  # tied: the word embedding is the output matrix
            yield name, t

    return write_checkpoint(dst_dir, config, tensors(), tokenizer_dir=tok_dir, shard_bytes=shard_bytes,
                            dtype=dtype, overwrite=overwrite)
