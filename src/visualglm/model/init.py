"""Random initialisation: for training from scratch (the demo model), benchmarks and tests."""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from ..config import VisualGLMConfig
from .visualglm import VisualGLM


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0, std: float = 0.02) -> nn.Module:
    """Seeded, deterministic init (parameters visited in sorted-name order): N(0, std) embeddings and
    learned tokens, N(0, 1/fan_in) Linear/Conv weights, zero biases, unit LayerNorms. GLM output
    projections are scaled down by sqrt(2 * layers) so the alpha-scaled residual stays balanced."""
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        init_parameter(name, p, g, std)
    if isinstance(model, VisualGLM):
        for name, p in model.named_parameters():
            scale = residual_scale(name, model.config.glm.num_layers)
            if scale != 1.0:
                p.mul_(scale)
    return model


@torch.no_grad()
def init_parameter(name: str, p: torch.Tensor, g: torch.Generator, std: float = 0.02) -> None:
    """Fill one parameter by its (model-level) name, the rules of :func:`init_weights`; lets a caller
    materialise and initialise a large model one tensor at a time (benchmarks). Numbers are drawn on ``g``'s
    device (a CUDA generator fills a GPU model without a trip through the CPU)."""
    if p.is_meta:
        raise ValueError(f"{name} is on the meta device; materialise the model first (to_empty)")
    if name.endswith("bias"):
        p.zero_()
    elif "layernorm" in name or "ln_vision" in name:
        p.fill_(1.0)
    elif p.dim() >= 2 and "embeddings" not in name and "query_tokens" not in name and "pos_embed" not in name:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=g, device=g.device).div_(math.sqrt(fan_in)))
    else:
        p.copy_(torch.randn(p.shape, generator=g, device=g.device).mul_(std))


def residual_scale(name: str, num_layers: int) -> float:
    """Extra factor for GLM output projections (attention.dense, mlp.dense_4h_to_h weights), else 1."""
    return 1 / math.sqrt(2 * num_layers) if _GLM_OUTPUT.match(name) else 1.0


_GLM_OUTPUT = re.compile(r"^glm\.layers\.\d+\.(attention\.dense|mlp\.dense_4h_to_h)\.weight$")


def random_model(config: VisualGLMConfig, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> VisualGLM:
    """A randomly initialised model allocated once, directly in ``dtype`` on ``device`` (so a 6B bf16 model
    never passes through a float32 copy)."""
    with torch.device("meta"):
        model = VisualGLM(config).to(dtype=dtype)
    model = model.to_empty(device=device)
    model.glm.rotary.inv_freq = model.glm.rotary.inv_freq_init(device)
    if config.glm.tie_word_embeddings:
        model.glm.lm_head.weight = model.glm.word_embeddings.weight
    init_weights(model, seed)
    return model.eval()
