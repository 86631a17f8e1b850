"""Shared fixtures: where the golden reference data lives, and small models to test with.

The reference folder sits beside the repository (``../shared/reference``); it is never copied in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"

torch.set_num_threads(min(2, torch.get_num_threads()))


def decode_to_end(engine, request) -> tuple[list[int], torch.Tensor]:
    """One request alone through ``engine`` until it finishes: the generated ids and the raw logits (one row
    per step, prefill's last position first) each id was chosen from."""
    seen: list[torch.Tensor] = []
    engine.logits_observer = lambda _slots, logits: seen.append(logits.clone())
    try:
        ids = [engine.add([request])[0]]
        while not engine.slots[0].done:
            ids.append(engine.step()[0])
    finally:
        engine.logits_observer = None
        engine.finish(0)
    return ids, torch.cat(seen)


def reference_dirs() -> list[Path]:
    """The shipped fixture folder plus any named in VISUALGLM_REFERENCE_DIRS (os.pathsep-separated)."""
    dirs = [REFERENCE_DIR]
    extra = os.environ.get("VISUALGLM_REFERENCE_DIRS", "")
    dirs += [Path(p).expanduser() for p in extra.split(os.pathsep) if p.strip()]
    return dirs


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference fixtures not found at {REFERENCE_DIR}; the repo must sit beside shared/")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tokenizer_dir(reference_dir: Path) -> Path:
    return reference_dir / "tokenizer"


@pytest.fixture(scope="session")
def reference_cases(reference_dir: Path) -> list[dict]:
    return json.loads((reference_dir / "cases.json").read_text(encoding="utf-8"))["cases"]


@pytest.fixture(scope="session")
def reference_model(reference_dir: Path):
    """(model, tokenizer): the tiny reference checkpoint (HF layout) in float32 on CPU. Do not modify it."""
    import visualglm

    return visualglm.load(reference_dir / "tiny-visualglm-hf", device="cpu", dtype="float32")


@pytest.fixture
def tiny_model():
    """A fresh randomly initialised model of the reference's tiny shape (float32, CPU)."""
    from visualglm.config import VisualGLMConfig
    from visualglm.model.init import random_model

    return random_model(VisualGLMConfig.from_name("tiny"), seed=0)
