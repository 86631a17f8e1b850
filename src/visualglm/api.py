"""``visualglm.load``: the one way to get a ready model and tokenizer from a checkpoint folder."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint.io import CheckpointError, CheckpointSource, inspect, load_into
from .model.visualglm import VisualGLM
from .tokenizer import ChatGLMTokenizer


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device, num_params: int) -> torch.dtype:
    """GPUs: bf16 where supported, else fp16. CPU: fp32 for small models, bf16 from 1 B parameters on
    (fp32 would need 31 GB for VisualGLM-6B); MPS: fp16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if num_params >= 1_000_000_000 else torch.float32


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_model(src: CheckpointSource, *, device: torch.device, dtype: torch.dtype,
                qkv_layout: str = "auto", trust_pickle: bool = False) -> VisualGLM:
    """Build on ``meta`` and fill tensor by tensor: peak memory stays near the weights' own size."""
    with torch.device("meta"):
        model = VisualGLM(src.config)
    load_into(model, src, device=device, dtype=dtype, qkv_layout=qkv_layout, trust_pickle=trust_pickle)
    model.glm.rotary.inv_freq = model.glm.rotary.inv_freq_init(device)
    return model.eval()


def load(path: str | Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         tokenizer: str | Path | None = None, *, qkv_layout: str = "auto", trust_pickle: bool = False
         ) -> tuple[VisualGLM, ChatGLMTokenizer]:
    """Load a VisualGLM checkpoint folder (ours, sat or HF) and its tokenizer.

    ``tokenizer`` names a folder with ``ice_text.model`` (+ ``tokenizer_config.json``); HF and converted
    folders carry their own, a sat folder does not. ``qkv_layout`` (sat only): "auto", "contiguous" (sat
    after July 2023) or "interleaved" (before). ``trust_pickle`` allows pickles that hold more than tensors.
    """
    src = inspect(path)
    tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else src.tokenizer_dir
    if tok_dir is None:
        raise CheckpointError(f"{src.path} ({src.format} layout) carries no tokenizer (ice_text.model); pass "
                              "tokenizer=FOLDER (command line: --tokenizer) naming a folder with ice_text.model "
                              "and tokenizer_config.json, e.g. a THUDM/chatglm-6b download")
    tok = ChatGLMTokenizer.from_dir(tok_dir)
    dev = torch.device(device) if device is not None else default_device()
    with torch.device("meta"):
        num_params = sum(p.numel() for p in VisualGLM(src.config).parameters())
    dt = parse_dtype(dtype) or default_dtype(dev, num_params)
    model = build_model(src, device=dev, dtype=dt, qkv_layout=qkv_layout, trust_pickle=trust_pickle)
    return model, tok
