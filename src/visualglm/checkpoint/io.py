"""Reading and writing checkpoints: sat folders, HF folders and our own layout all converge here.

Loading never holds two copies of the weights: the model is built on the ``meta`` device and filled file by
file (safetensors read tensor by tensor, pickles memory-mapped), each tensor converted, cast and placed
before the next is read. A ``transform`` hook (quantization) sees every tensor on the way in.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..config import VisualGLMConfig
from .keymaps import GLM_QKV, canonical_name, contiguous_to_interleaved, guess_qkv_layout

TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3

# name, tensor -> {name: tensor}: lets quantization replace one weight by (int weight, scales).
Transform = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used as it is; the message names the file and key."""


@dataclass
class CheckpointSource:
    path: Path
    format: str  # "sat" | "hf" | "visualglm"
    config: VisualGLMConfig
    files: list[Path]
    tokenizer_dir: Path | None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. our config.json's quantization record


# ----- finding out what a folder is ------------------------------------------------------------------
def inspect(path: str | Path) -> CheckpointSource:
    """Recognise a checkpoint folder (ours, sat or HF) and list its weight files."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is a file; pass the checkpoint folder that contains it")
    tok = folder if (folder / TOKENIZER_FILES[0]).is_file() else None
    cfg_file = folder / "config.json"
    if cfg_file.is_file():
        raw = _read_json(cfg_file)
        if raw.get("format") == "visualglm":
            extra = {k: raw.pop(k) for k in ("torch_dtype",) if k in raw}
            return CheckpointSource(folder, "visualglm", VisualGLMConfig.from_dict(raw),
                                    _weight_files(folder), tok, extra)
        if "eva_config" in raw:
            return CheckpointSource(folder, "hf", VisualGLMConfig.from_hf(raw), _weight_files(folder), tok)
        raise CheckpointError(f"{cfg_file} is neither a visualglm config (\"format\": \"visualglm\") nor a "
                              "VisualGLM HF config (it has no eva_config: a plain ChatGLM has no image part)")
    if (folder / "model_config.json").is_file():
        raw = _read_json(folder / "model_config.json")
        if "eva_args" not in raw:
            raise CheckpointError(f"{folder / 'model_config.json'} has no eva_args: not a VisualGLM sat model")
        src = CheckpointSource(folder, "sat", VisualGLMConfig.from_sat(raw), [_sat_weight_file(folder)], tok)
        src.config.glm.tie_word_embeddings = _sat_lm_head_is_tied(src.files[0])
        return src
    raise CheckpointError(f"{folder} is not a checkpoint folder: expected config.json (ours or HF) or "
                          "model_config.json + latest (sat)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _sat_weight_file(folder: Path) -> Path:
    latest = folder / "latest"
    if not latest.is_file():
        raise CheckpointError(f"sat folder {folder} has no 'latest' file naming the iteration folder")
    it = latest.read_text().strip()
    file = folder / it / "mp_rank_00_model_states.pt"
    if not file.is_file():
        others = sorted(p.name for p in (folder / it).glob("mp_rank_*")) if (folder / it).is_dir() else []
        hint = f" (found {others}: model-parallel files must be merged first)" if others else ""
        raise CheckpointError(f"sat weight file not found: {file}{hint}")
    return file


def _sat_lm_head_is_tied(file: Path) -> bool:
    """sat stores lm_head separately; ChatGLM's equals the word embedding (one storage in the fixtures).
    Tie them then, so the model holds one 130k-row matrix instead of two."""
    try:
        with open_weights(file) as (names, get):
            a, b = "transformer.word_embeddings.weight", "mixins.chatglm-final.lm_head.weight"
            if a not in names or b not in names:
                return False
            wa, wb = get(a), get(b)
            return wa.shape == wb.shape and (wa.data_ptr() == wb.data_ptr() or torch.equal(wa, wb))
    except CheckpointError:
        return False  # an untrusted pickle: decided (and reported) when the weights are read


def _weight_files(folder: Path) -> list[Path]:
    for index_name in (INDEX_NAME, "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            names = sorted(set(_read_json(index)["weight_map"].values()))
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{index} names shard files that are missing: {missing}")
            return [folder / n for n in names]
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{folder} has no weights: expected *.safetensors or pytorch_model*.bin")


# ----- reading tensors ---------------------------------------------------------------------------------
@contextmanager
def open_weights(file: Path, *, trust_pickle: bool = False) -> Iterator[tuple[list[str], Callable[[str], torch.Tensor]]]:
    """(names, get) for one file; tensors are produced lazily (safetensors) or memory-mapped (pickles)."""
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt", device="cpu") as f:
            yield list(f.keys()), f.get_tensor
        return
    sd = _load_pickle(file, trust_pickle)
    if "module" in sd and isinstance(sd["module"], dict):  # sat: weights under "module"
        sd = sd["module"]
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    try:
        yield list(tensors), tensors.__getitem__
    finally:
        tensors.clear()
        sd = None


def _load_pickle(file: Path, trust_pickle: bool) -> dict[str, Any]:
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=not trust_pickle, mmap=True)
        except RuntimeError as e:  # legacy (pre-zipfile) pickles cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            return torch.load(file, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{file} contains pickled Python objects besides tensors, which are not loaded by default "
            f"because unpickling can run arbitrary code ({str(e).splitlines()[0]}). If you trust this file, "
            "pass trust_pickle=True (command line: --trust-pickle), or convert it once with "
            "`visualglm convert --trust-pickle SRC DST` and use the safetensors copy."
        ) from e


def iter_canonical(src: CheckpointSource, *, qkv_layout: str = "auto", trust_pickle: bool = False
                   ) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, canonical name, tensor in the file's dtype) for every weight, GLM QKV in our layout."""
    if qkv_layout not in ("auto", "contiguous", "interleaved"):
        raise ValueError(f"qkv_layout must be auto, contiguous or interleaved, got {qkv_layout!r}")
    heads = src.config.glm.num_heads
    layout = "interleaved" if src.format != "sat" else qkv_layout
    for file in src.files:
        with open_weights(file, trust_pickle=trust_pickle) as (names, get):
            for name in names:
                try:
                    canon = canonical_name(name, src.format)
                except KeyError:
                    raise CheckpointError(f"unexpected key {name!r} in {file}") from None
                if canon is None:
                    continue
                tensor = get(name)
                if GLM_QKV.match(canon) and src.format == "sat":
                    if layout == "auto":
                        layout = _decide_layout(src, get, names, heads)
                    if layout == "contiguous":
                        tensor = contiguous_to_interleaved(tensor, heads)
                yield file, canon, tensor


def _decide_layout(src: CheckpointSource, get: Callable[[str], torch.Tensor], names: list[str], heads: int) -> str:
    """Vote over every GLM QKV weight; fall back to contiguous (current sat) when undecidable."""
    votes = {"contiguous": 0.0, "interleaved": 0.0}
    for name in names:
        canon = canonical_name(name, src.format)
        if canon and GLM_QKV.match(canon) and canon.endswith("weight"):
            guess, strength = guess_qkv_layout(get(name), heads)
            votes[guess] += strength - 1.0
    return "interleaved" if votes["interleaved"] > votes["contiguous"] + 1.0 else "contiguous"


# ----- filling a model ------------------------------------------------------------------------------------
def load_into(model: torch.nn.Module, src: CheckpointSource, *, device: torch.device, dtype: torch.dtype,
              qkv_layout: str = "auto", trust_pickle: bool = False, transform: Transform | None = None) -> None:
    """Fill a model built on ``meta`` from ``src``; every expected key must arrive exactly once."""
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.glm.tie_word_embeddings
    if tied:
        expected.pop("glm.lm_head.weight", None)
    seen: dict[str, Path] = {}
    lm_head_file: Path | None = None
    for file, name, tensor in iter_canonical(src, qkv_layout=qkv_layout, trust_pickle=trust_pickle):
        if tied and name == "glm.lm_head.weight":
            lm_head_file = file  # the HF code replaces it by the word embedding on load; so do we
            continue
        if name in seen:
            raise CheckpointError(f"key {name!r} appears twice: in {seen[name]} and in {file}")
        pieces = transform(name, tensor) if transform is not None else {name: tensor}
        for piece_name, piece in pieces.items():
            target = expected.get(piece_name)
            if target is None:
                raise CheckpointError(f"unexpected key {piece_name!r} in {file} (from {name!r})")
            if tuple(target.shape) != tuple(piece.shape):
                raise CheckpointError(f"shape mismatch for {piece_name!r} in {file}: checkpoint "
                                      f"{list(piece.shape)}, model {list(target.shape)}")
            cast = dtype if piece.is_floating_point() and target.is_floating_point() else piece.dtype
            _assign(model, piece_name, piece.to(device=device, dtype=cast, copy=False))
            seen[piece_name] = file
        del tensor, pieces
    missing = sorted(set(expected) - set(seen) - _non_persistent(model))
    if missing:
        where = ", ".join(str(f) for f in src.files)
        raise CheckpointError(f"{len(missing)} weight(s) missing from {where}: {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}")
    if tied:
        model.glm.lm_head.weight = model.glm.word_embeddings.weight
    del lm_head_file


def _non_persistent(model: torch.nn.Module) -> set[str]:
    return {n for n, b in model.named_buffers() if n not in model.state_dict()}


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = getattr(owner, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = tensor  # buffers (e.g. quantized weights and scales)


# ----- writing our layout -------------------------------------------------------------------------------
def write_checkpoint(out_dir: str | Path, config: VisualGLMConfig, tensors: Iterator[tuple[str, torch.Tensor]],
                     *, tokenizer_dir: str | Path | None = None, shard_bytes: int = DEFAULT_SHARD_BYTES,
                     dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write config.json, safetensors shards + index and tokenizer files, atomically (temp dir + rename).

    ``tensors`` is consumed lazily, so a conversion holds at most one shard in memory.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose a new folder or pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shards = _write_shards(tmp, tensors, shard_bytes, dtype)
        _finish_layout(tmp, shards)
        record = config.to_dict()
        if dtype is not None:
            record["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp / name)
        _apply_umask(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_shards(folder: Path, tensors: Iterator[tuple[str, torch.Tensor]], shard_bytes: int,
                  dtype: torch.dtype | None) -> list[tuple[str, list[str]]]:
    shards: list[tuple[str, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            name = f"shard-{len(shards):05d}.tmp"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for name, t in tensors:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > shard_bytes:
            flush()
        current[name] = t.clone() if t.untyped_storage().nbytes() != nbytes else t  # no shared storage
        size += nbytes
    flush()
    return shards


def _finish_layout(folder: Path, shards: list[tuple[str, list[str]]]) -> None:
    total = len(shards)
    weight_map: dict[str, str] = {}
    for i, (tmp_name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(folder / tmp_name, folder / final)
        weight_map.update(dict.fromkeys(keys, final))
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1) + "\n")


def _apply_umask(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the result the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _replace_dir(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    backup = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, backup)
    os.replace(tmp, out)
    shutil.rmtree(backup, ignore_errors=True)
