"""Reading checkpoints: sat folders, HF folders and our own layout all converge on one key space here.

Loading never holds two copies of the weights: the model is built on the ``meta`` device and filled file by
file. Each file is memory-mapped (safetensors, and pickles through ``torch.load(mmap=True)``); every tensor
is copied (cast, QKV rows reordered) into its final place in slices, and the slice's pages of the mapping
are handed back to the kernel right away, so neither a whole file nor a second copy of a tensor is ever
resident (``benchmarks/load_memory.py``: peak RSS about 1.16 x the weights, Python and torch included).
The loaded model owns its memory: nothing stays mapped, so the files may be replaced or deleted while it
runs. A ``transform`` hook (quantization, tensor parallelism) sees every tensor on the way in.
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import VisualGLMConfig
from .files import CheckpointError, WeightFile, open_weights
from .keymaps import GLM_QKV, canonical_name, foreign_name, qkv_separation

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("ice_text.model", "tokenizer_config.json")
INDEX_NAME = "model.safetensors.index.json"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
DEFAULT_SHARD_BYTES = 2 * 1024**3
QKV_LAYOUTS = ("auto", "contiguous", "interleaved")
_MIN_F, _MIN_F_RATIO = 20.0, 4.0  # QKV layout detection: how clear a separation must be to count

# name, tensor -> {name: tensor}: lets quantization replace one weight by (int weight, scales).
Transform = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


@dataclass
class CheckpointSource:
    path: Path
    format: str  # "sat" | "hf" | "visualglm"
    config: VisualGLMConfig
    files: list[Path]
    tokenizer_dir: Path | None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. our config.json's torch_dtype
    index: Path | None = None  # the shard index, when the folder has one
    weight_map: dict[str, Path] = field(default_factory=dict)  # stored key -> shard, from the index


# ----- finding out what a folder is ------------------------------------------------------------------
def inspect(path: str | Path, *, trust_pickle: bool = False) -> CheckpointSource:
    """Recognise a checkpoint folder (ours, sat or HF) and list its weight files.

    ``trust_pickle`` is needed here only to look into a sat pickle that holds more than tensors (to see
    whether its lm_head is the word embedding).
    """
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
            config = _parse_config(cfg_file, VisualGLMConfig.from_dict, raw)
            return _with_weights(CheckpointSource(folder, "visualglm", config, [], tok, extra))
        if "eva_config" in raw:
            config = _parse_config(cfg_file, VisualGLMConfig.from_hf, raw)
            return _with_weights(CheckpointSource(folder, "hf", config, [], tok))
        raise CheckpointError(f"{cfg_file} is neither a visualglm config (\"format\": \"visualglm\") nor a "
                              "VisualGLM HF config (it has no eva_config: a plain ChatGLM has no image part)")
    if (folder / "model_config.json").is_file():
        cfg_file = folder / "model_config.json"
        raw = _read_json(cfg_file)
        if "eva_args" not in raw:
            raise CheckpointError(f"{cfg_file} has no eva_args: not a VisualGLM sat model")
        config = _parse_config(cfg_file, VisualGLMConfig.from_sat, raw)
        src = CheckpointSource(folder, "sat", config, [_sat_weight_file(folder)], tok)
        src.config.glm.tie_word_embeddings = _sat_lm_head_is_tied(src.files[0], trust_pickle)
        return src
    raise CheckpointError(f"{folder} is not a checkpoint folder: expected config.json (ours or HF) or "
                          "model_config.json + latest (sat)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _parse_config(path: Path, parse: Callable[[dict[str, Any]], VisualGLMConfig],
                  raw: dict[str, Any]) -> VisualGLMConfig:
    try:
        return parse(raw)
    except KeyError as e:
        raise CheckpointError(f"{path} lacks the field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def _sat_weight_file(folder: Path) -> Path:
    latest = folder / "latest"
    if not latest.is_file():
        raise CheckpointError(f"sat folder {folder} has no 'latest' file naming the iteration folder "
                              "(sat writes it next to model_config.json; it holds e.g. '1')")
    it = latest.read_text(encoding="utf-8").strip()
    if not it or "/" in it or it in (".", ".."):
        raise CheckpointError(f"{latest} should name an iteration folder inside {folder}, found {it!r}")
    file = folder / it / "mp_rank_00_model_states.pt"
    if not file.is_file():
        others = sorted(p.name for p in (folder / it).glob("mp_rank_*")) if (folder / it).is_dir() else []
        hint = f" (found {others}: model-parallel files must be merged first)" if others else ""
        raise CheckpointError(f"sat weight file not found: {file}{hint}")
    return file


def _sat_lm_head_is_tied(file: Path, trust_pickle: bool) -> bool:
    """sat stores lm_head separately; ChatGLM's equals the word embedding (one storage in the fixtures).
    Tie them then, so the model holds one 130k-row matrix instead of two."""
    a, b = "transformer.word_embeddings.weight", "mixins.chatglm-final.lm_head.weight"
    try:
        with open_weights(file, trust_pickle=trust_pickle) as wf:
            if a not in wf.names or b not in wf.names:
                return False
            wa, wb = wf.view(a), wf.view(b)
            if wa.shape != wb.shape or wa.dtype != wb.dtype:
                return False
            if wa.data_ptr() == wb.data_ptr() and wa.stride() == wb.stride():
                return True
            return wf.equal(wa, wb)
    except CheckpointError:
        return False  # unreadable or an untrusted pickle: reported when the weights are read


def _with_weights(src: CheckpointSource) -> CheckpointSource:
    """HF / our folders: the shards named by an index, else the weight files present."""
    folder = src.path
    for index_name in (INDEX_NAME, BIN_INDEX_NAME):
        index = folder / index_name
        if index.is_file():
            src.index, src.weight_map = index, _read_index(index)
            src.files = sorted(set(src.weight_map.values()))
            return src
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            src.files = files
            return src
    raise CheckpointError(f"{folder} has no weights: expected {INDEX_NAME} or {BIN_INDEX_NAME} with its "
                          "shards, *.safetensors, or pytorch_model*.bin")


def _read_index(index: Path) -> dict[str, Path]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no \"weight_map\" object mapping weight names to shard files")
    bad = sorted({str(f) for f in weight_map.values() if not isinstance(f, str) or Path(f).name != f})
    if bad:
        raise CheckpointError(f"{index} names shards that are not plain file names in its folder: {bad}")
    missing = sorted({f for f in weight_map.values() if not (index.parent / f).is_file()})
    if missing:
        keys = [k for k, f in weight_map.items() if f == missing[0]][:3]
        raise CheckpointError(f"{index} names shard file(s) that do not exist: {missing} "
                              f"(e.g. {missing[0]} should hold {keys})")
    return {k: index.parent / f for k, f in weight_map.items()}


# ----- canonical tensors -----------------------------------------------------------------------------
@dataclass
class _Entry:
    """One stored weight, seen before its data is read; ``read`` works until the iteration moves on."""

    file: Path
    key: str  # as stored
    name: str  # canonical
    shape: torch.Size
    dtype: torch.dtype
    read: Callable[..., torch.Tensor]  # (dtype=None, device="cpu") -> owned tensor


def _entries(src: CheckpointSource, qkv_layout: str, trust_pickle: bool) -> Iterator[_Entry]:
    if qkv_layout not in QKV_LAYOUTS:
        raise ValueError(f"qkv_layout must be one of {', '.join(QKV_LAYOUTS)}, got {qkv_layout!r}")
    heads = src.config.glm.num_heads
    layout = qkv_layout if src.format == "sat" else "interleaved"  # HF and ours are interleaved
    tied = src.config.glm.tie_word_embeddings
    for file in src.files:
        with open_weights(file, trust_pickle=trust_pickle) as wf:
            for key in wf.names:
                name = _canonical(key, src.format, file)
                if name is None or (tied and name == "glm.lm_head.weight"):
                    continue  # ignored keys; a tied lm_head is the word embedding (as the HF code does)
                reorder = False
                if src.format == "sat" and GLM_QKV.match(name):
                    if layout == "auto":
                        layout = _decide_layout(wf, heads)
                    src.extra["qkv_layout"] = layout
                    reorder = layout == "contiguous"
                view = wf.view(key)
                stored_shape, stored_dtype = view.shape, view.dtype
                del view

                def read(dtype: torch.dtype | None = None, device: torch.device | str = "cpu", *,
                         _key: str = key, _heads: int | None = heads if reorder else None) -> torch.Tensor:
                    return wf.take(_key, dtype=dtype, device=device, qkv_heads=_heads)

                yield _Entry(file, key, name, stored_shape, stored_dtype, read)


def _canonical(key: str, fmt: str, file: Path) -> str | None:
    try:
        return canonical_name(key, fmt)
    except KeyError:
        raise CheckpointError(f"unexpected key {key!r} in {file}: it is no weight of a VisualGLM {fmt} "
                              "checkpoint (expected transformer.*, mixins.eva.model.* / image_encoder.*, "
                              "the lm_head and rotary buffers)") from None


def iter_canonical(src: CheckpointSource, *, qkv_layout: str = "auto", trust_pickle: bool = False,
                   dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
                   ) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, canonical name, owned tensor) for every weight, GLM QKV in our layout, floating tensors cast
    to ``dtype`` when given. A tied lm_head is left out. One tensor is read at a time."""
    for e in _entries(src, qkv_layout, trust_pickle):
        cast = dtype if dtype is not None and e.dtype.is_floating_point else None
        yield e.file, e.name, e.read(dtype=cast, device=device)


def detect_qkv_layout(src: CheckpointSource, *, trust_pickle: bool = False) -> str | None:
    """The GLM query_key_value row layout of ``src``: "interleaved" (HF, ours, sat before July 2023),
    "contiguous" (sat since), or None when a sat file's weights do not tell (e.g. random weights)."""
    if src.format != "sat":
        return "interleaved"
    with open_weights(src.files[0], trust_pickle=trust_pickle) as wf:
        return _qkv_verdict(wf, src.config.glm.num_heads)[0]


def _decide_layout(wf: WeightFile, heads: int) -> str:
    verdict, scores = _qkv_verdict(wf, heads)
    if verdict is None:
        log.warning("%s: the GLM query_key_value layout cannot be told from the weights (separation %s); "
                    "assuming contiguous (sat since July 2023). Pass qkv_layout='interleaved' "
                    "(--qkv-layout interleaved) for older sat checkpoints.", wf.path,
                    {k: round(v, 2) for k, v in scores.items()})
        return "contiguous"
    log.info("%s: GLM query_key_value layout detected as %s (separation %s)", wf.path, verdict, scores)
    return verdict


def _qkv_verdict(wf: WeightFile, heads: int) -> tuple[str | None, dict[str, float]]:
    """Median Q/K/V separation (F statistic) of every GLM QKV weight under each layout; a layout wins
    only when it separates clearly and far better than the other."""
    stats: dict[str, list[float]] = {"contiguous": [], "interleaved": []}
    for key in wf.names:
        try:
            name = canonical_name(key, "sat")
        except KeyError:
            continue
        if name is None or not GLM_QKV.match(name) or not name.endswith(".weight"):
            continue
        w = wf.view(key)
        if w.dim() != 2 or w.shape[0] % (3 * heads):
            continue
        norms = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32)  # (3 * hidden,)
        wf.release(w)
        for layout, f in qkv_separation(norms, heads).items():
            stats[layout].append(f)
    if not stats["contiguous"]:
        return None, {}
    med = {k: statistics.median(v) for k, v in stats.items()}
    for a, b in (("contiguous", "interleaved"), ("interleaved", "contiguous")):
        if med[a] >= _MIN_F and med[a] >= _MIN_F_RATIO * med[b]:
            return a, med
    return None, med


# ----- filling a model ------------------------------------------------------------------------------------
def load_into(model: torch.nn.Module, src: CheckpointSource, *, device: torch.device | str,
              dtype: torch.dtype, qkv_layout: str = "auto", trust_pickle: bool = False,
              transform: Transform | None = None) -> None:
    """Fill a model built on ``meta`` from ``src``; every expected key must arrive exactly once.

    Names, shapes and duplicates are checked before a tensor's data is read; each tensor goes straight
    into its final dtype and device.
    """
    expected = dict(model.state_dict(keep_vars=True))
    tied = model.config.glm.tie_word_embeddings
    if tied:
        expected.pop("glm.lm_head.weight", None)
    seen: dict[str, Path] = {}
    filled: set[str] = set()
    for e in _entries(src, qkv_layout, trust_pickle):
        if e.name in seen:
            raise CheckpointError(f"key {e.key!r} appears twice: in {seen[e.name]} and in {e.file}")
        seen[e.name] = e.file
        if transform is None:
            target = _target(expected, e.name, e.name, e)
            _check_shape(e.name, list(e.shape), target, e)
            cast = dtype if e.dtype.is_floating_point and target.is_floating_point() else None
            _assign(model, e.name, e.read(dtype=cast, device=device))
            filled.add(e.name)
            continue
        pieces = transform(e.name, e.read())  # as stored, on the CPU: the transform picks what to keep
        for piece_name, piece in pieces.items():
            target = _target(expected, piece_name, e.name, e)
            _check_shape(piece_name, list(piece.shape), target, e)
            if piece.is_floating_point() and target.is_floating_point() and piece.dtype != dtype:
                piece = piece.to(dtype=dtype)  # not for pieces already cast (NF4 would dequantize)
            _assign(model, piece_name, piece.to(device=device))
            filled.add(piece_name)
        del pieces
    missing = sorted(set(expected) - filled - _non_persistent(model))
    if missing:
        raise CheckpointError(_missing_message(src, missing))
    if tied:
        model.glm.lm_head.weight = model.glm.word_embeddings.weight


def _target(expected: dict[str, torch.Tensor], name: str, source_name: str, e: _Entry) -> torch.Tensor:
    target = expected.get(name)
    if target is None:
        origin = f"stored as {e.key!r}" + (f", via {source_name!r}" if source_name != name else "")
        raise CheckpointError(f"unexpected key {name!r} in {e.file} ({origin}): the model has no such "
                              "weight (a checkpoint of another model or config?)")
    return target


def _check_shape(name: str, shape: list[int], target: torch.Tensor, e: _Entry) -> None:
    if shape != list(target.shape):
        raise CheckpointError(f"shape mismatch for {name!r} (stored as {e.key!r}) in {e.file}: checkpoint "
                              f"{shape}, model {list(target.shape)}; does the folder's config match its "
                              "weights?")


def _missing_message(src: CheckpointSource, missing: list[str]) -> str:
    parts = []
    for name in missing[:8]:
        stored = _stored_name(name, src.format)
        shard = src.weight_map.get(stored)
        where = f" ({src.index.name} puts it in {shard.name}, which lacks it)" if shard and src.index else ""
        parts.append(f"{name!r}" + (f" (stored as {stored!r})" if stored != name else "") + where)
    more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
    files = ", ".join(str(f) for f in src.files)
    return f"{len(missing)} weight(s) missing from {files}: {', '.join(parts)}{more}"


def _stored_name(name: str, fmt: str) -> str:
    try:
        return foreign_name(name, fmt)
    except KeyError:
        return name


def _non_persistent(model: torch.nn.Module) -> set[str]:
    persistent = model.state_dict()
    return {n for n, _ in model.named_buffers() if n not in persistent}


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    old = getattr(owner, attr)
    if isinstance(old, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(tensor, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = tensor  # buffers (e.g. quantized weights and scales)


