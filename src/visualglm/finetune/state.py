"""Training checkpoints: written atomically, read back for an exact resume, on any number of processes.

A checkpoint folder ``checkpoints/step-000100/`` holds ``trainable.safetensors`` (the trained tensors, full,
canonical names), ``optimizer.pt`` (AdamW state keyed by parameter name), ``trainer_state.json`` (step,
scheduler, the settings) and, for adapter methods, the adapter files, so any checkpoint is itself a usable
adapter. It is written into a temporary folder and renamed into place, so a crash never leaves a partial one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run (missing, or made with incompatible settings)."""


def step_dir(out: Path, step: int) -> Path:
    return out / CHECKPOINTS / f"step-{step:06d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders never match the name pattern)."""
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def write_checkpoint_dir(target: Path, trainable: dict[str, torch.Tensor], optimizer: dict[str, Any],
                         state: dict[str, Any], extra: Callable[[Path], None] | None = None) -> Path:
    """Write everything into a temporary sibling, then rename it to ``target`` (replacing an old one)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in trainable.items()}
        save_file(tensors, str(tmp / TRAINABLE_FILE), metadata={"format": "pt"})
        torch.save(optimizer, tmp / OPTIMIZER_FILE)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if extra is not None:
            extra(tmp)
        os.chmod(tmp, 0o755)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def prune(out: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints (0 or less keeps all)."""
    if keep <= 0:
        return
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_resume(out: Path, spec: str | bool) -> Path:
    """``True``/"latest" -> the newest checkpoint under ``out``; otherwise a checkpoint folder path."""
    if spec is True or spec == "latest":
        found = list_checkpoints(out)
        if not found:
            raise ResumeError(f"--resume: no checkpoint under {out / CHECKPOINTS} to resume from")
        return found[-1]
    path = Path(str(spec)).expanduser()
    if not (path / STATE_FILE).is_file():
        raise ResumeError(f"--resume {path}: not a training checkpoint (no {STATE_FILE})")
    return path


def read_checkpoint_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    for name in (TRAINABLE_FILE, OPTIMIZER_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise ResumeError(f"checkpoint {path} is incomplete: {name} is missing")
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    optimizer = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    return load_file(str(path / TRAINABLE_FILE)), optimizer, state


def check_compatible(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Exact resume needs the same method, data order and batch; the number of processes may differ."""
    keys = [("method",), ("data", "train"), ("train", "batch_size"), ("train", "seed"), ("model",), ("init",)]
    for key in keys:
        a, b = saved, current
        for k in key:
            a, b = (a or {}).get(k), (b or {}).get(k)
        if _normalise(a) != _normalise(b):
            raise ResumeError(f"cannot resume from {path}: {'.'.join(key)} was {a!r}, now {b!r} "
                              "(an exact resume needs the same setting)")


def _normalise(value: Any) -> Any:
    """Paths compare by what they point at (a relative and an absolute spelling are the same run)."""
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def truncate_metrics(file: Path, step: int) -> None:
    """Drop metric lines written after ``step`` (by a run that went on past its last checkpoint)."""
    if not file.is_file():
        return
    keep = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    file.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def move_into(tmp: Path, out: Path) -> None:
    """Move a freshly written checkpoint's files into ``out`` (which also holds logs and checkpoints):
    shards first, the index and config last, and stale shards of an earlier save removed."""
    new = {p.name for p in tmp.iterdir()}
    for old in out.glob("model-*-of-*.safetensors"):
        if old.name not in new:
            old.unlink()
    last = ("model.safetensors.index.json", "config.json")
    for p in sorted(tmp.iterdir(), key=lambda p: p.name in last):
        p.replace(out / p.name)
    shutil.rmtree(tmp, ignore_errors=True)
