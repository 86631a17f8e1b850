"""visualglm: a clean PyTorch reimplementation of VisualGLM-6B (image + Chinese/English dialogue)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Decoding alternates torch's OpenMP regions with matrix-vector kernels; OpenMP workers that keep spinning
# after each region take the cores the next kernel needs (2 AVX2 cores, 4-layer bf16 decode step: 260 -> 190
# ms with torch's kernels, 236 -> 131 ms with visualglm's). Read once when torch loads, so set it before;
# an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
__all__ = ["ChatGLMTokenizer", "VisualGLM", "VisualGLMConfig", "load", "__version__"]

if TYPE_CHECKING:
    from .api import load
    from .config import VisualGLMConfig
    from .model.visualglm import VisualGLM
    from .tokenizer import ChatGLMTokenizer


def __getattr__(name: str) -> Any:  # lazy: `import visualglm` stays cheap for the CLI
    if name == "load":
        from .api import load
        return load
    if name == "VisualGLMConfig":
        from .config import VisualGLMConfig
        return VisualGLMConfig
    if name == "VisualGLM":
        from .model.visualglm import VisualGLM
        return VisualGLM
    if name == "ChatGLMTokenizer":
        from .tokenizer import ChatGLMTokenizer
        return ChatGLMTokenizer
    raise AttributeError(f"module 'visualglm' has no attribute {name!r}")
