"""Writing our layout: config.json, safetensors shards + index, tokenizer files; atomically."""


import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import VisualGLMConfig
from .files import CheckpointError
from .io import DEFAULT_SHARD_BYTES, INDEX_NAME, TOKENIZER_FILES


# ----- writing our layout -------------------------------------------------------------------------------
def write_checkpoint(out_dir: str | Path, config: VisualGLMConfig,
                     tensors: Iterable[tuple[str, torch.Tensor]], *, tokenizer_dir: str | Path | None = None,
                     shard_bytes: int = DEFAULT_SHARD_BYTES, dtype: torch.dtype | None = None,
                     overwrite: bool = False) -> Path:
    """Write config.json, safetensors shards + index and tokenizer files, atomically (temp dir + rename).

    ``tensors`` is consumed lazily, so a conversion holds at most one shard in memory. A tied lm_head is
    left out (the word embedding is the output matrix). ``dtype`` casts floating tensors.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose a new folder or pass overwrite=True "
                              "(--overwrite)")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tied = config.glm.tie_word_embeddings
        kept = ((n, t) for n, t in tensors if not (tied and n == "glm.lm_head.weight"))
        shards, dtypes = _write_shards(tmp, kept, shard_bytes, dtype)
        _finish_layout(tmp, shards)
        record = config.to_dict()
        if len(dtypes) == 1:
            record["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir).expanduser(), tmp)
        _apply_umask(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_tokenizer(tokenizer_dir: Path, dst: Path) -> None:
    if not (tokenizer_dir / TOKENIZER_FILES[0]).is_file():
        raise CheckpointError(f"tokenizer folder {tokenizer_dir} has no {TOKENIZER_FILES[0]}")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, dst / name)


def _write_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int,
                  dtype: torch.dtype | None) -> tuple[list[tuple[str, list[str], int]], set[torch.dtype]]:
    """Fill shards up to ``shard_bytes`` (a larger tensor gets one of its own); (temp name, keys, bytes)."""
    shards: list[tuple[str, list[str], int]] = []
    floating: set[torch.dtype] = set()
    written: set[str] = set()
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f"shard-{len(shards):05d}.tmp"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append((name, list(current), size))
            current, size = {}, 0

    for name, t in tensors:
        if name in written:
            raise CheckpointError(f"key {name!r} is given twice to write_checkpoint")
        written.add(name)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        if t.is_floating_point():
            floating.add(t.dtype)
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = t.clone() if t.untyped_storage().nbytes() != nbytes else t  # no shared storage
        size += nbytes
    flush()
    return shards, floating


def _finish_layout(folder: Path, shards: list[tuple[str, list[str], int]]) -> None:
    """Name the shards model-0000i-of-0000n.safetensors and write the index (HF's layout)."""
    total = len(shards)
    weight_map: dict[str, str] = {}
    for i, (tmp_name, keys, _) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(folder / tmp_name, folder / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": sum(n for _, _, n in shards)}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n")


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the result the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _replace_dir(tmp: Path, out: Path) -> None:
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    backup = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, backup)
    os.replace(tmp, out)
    if backup.is_dir() and not backup.is_symlink():
        shutil.rmtree(backup, ignore_errors=True)
    else:
        backup.unlink(missing_ok=True)

