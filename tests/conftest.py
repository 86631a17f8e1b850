"""Shared fixtures: where the golden reference data lives.

The reference folder sits beside the repository (``../shared/reference``); it is never copied in.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE_DIR.is_dir():
        pytest.fail(f"reference fixtures not found at {REFERENCE_DIR}; the repo must sit beside shared/")
    return REFERENCE_DIR


@pytest.fixture(scope="session")
def tokenizer_dir(reference_dir: Path) -> Path:
    return reference_dir / "tokenizer"
