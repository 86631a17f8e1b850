"""Merge a LoRA adapter into its base checkpoint, streaming: one base tensor in memory at a time.

The result is a plain checkpoint folder (config.json, safetensors shards, tokenizer) that loads without any
adapter code, and whose outputs equal base + adapter.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint.io import DEFAULT_SHARD_BYTES, inspect, iter_canonical
from ..checkpoint.write import write_checkpoint
from .adapters import AdapterError, read_adapter_config, read_adapter_tensors
from .lora import merge_weight


def merge_lora_checkpoint(adapter: str | Path, out: str | Path, *, base: str | Path | None = None,
                          dtype: torch.dtype | None = None, tokenizer: str | Path | None = None,
                          shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
                          trust_pickle: bool = False) -> Path:
    """Write ``base`` (default: the base the adapter recorded) with ``W + alpha/r * B A`` for every adapted
    Linear into ``out``, atomically. ``dtype``: stored dtype (default: as the base stores it); the merge
    itself is computed in float32."""
    cfg = read_adapter_config(adapter)
    if cfg["peft_type"] != "LORA":
        raise AdapterError(f"{adapter} is a {cfg['peft_type']} adapter; only LoRA adapters can be merged "
                           "(use a prefix adapter with load(..., adapter=DIR) or chat --adapter DIR)")
    base = base or cfg.get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{adapter} records no base model; pass it: merge-lora BASE ADAPTER OUT")
    src = inspect(base, trust_pickle=trust_pickle)
    lora = read_adapter_tensors(adapter)
    lora_modules = {n.rpartition(".lora_")[0] for n in lora}
    rank = lora[f"{min(lora_modules)}.lora_a.weight"].shape[0]
    scaling = float(cfg.get("lora_alpha", rank)) / rank
    done: set[str] = set()

    def tensors():
        for _, name, t in iter_canonical(src, trust_pickle=trust_pickle):
            module = name.removesuffix(".weight")
            if name.endswith(".weight") and module in lora_modules:
                merged = merge_weight(t.float(), lora[f"{module}.lora_a.weight"], lora[f"{module}.lora_b.weight"],
                                      scaling)  # (out, in) float32
                t = merged.to(dtype or t.dtype)
                done.add(module)
            yield name, t
        missing = lora_modules - done
        if missing:
            raise AdapterError(f"the adapter adapts {sorted(missing)[:4]}, which {base} does not have")

    tok = Path(tokenizer).expanduser() if tokenizer is not None else src.tokenizer_dir
    return write_checkpoint(out, src.config, tensors(), tokenizer_dir=tok, shard_bytes=shard_bytes, dtype=dtype,
                            overwrite=overwrite)
