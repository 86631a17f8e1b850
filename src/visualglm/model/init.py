"""Random initialisation: for training from scratch (the demo model), benchmarks and tests."""

from __future__ import annotations

import math

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
        if p.is_meta:
            raise ValueError(f"{name} is on the meta device; materialise the model first (to_empty)")
        if name.endswith("bias"):
            p.zero_()
        elif "layernorm" in name or "ln_vision" in name:
            p.fill_(1.0)
        elif p.dim() >= 2 and "embeddings" not in name and "query_tokens" not in name and "pos_embed" not in name:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g).div_(math.sqrt(fan_in)))
        else:
            p.copy_(torch.randn(p.shape, generator=g).mul_(std))
    if isinstance(model, VisualGLM):
        scale = 1 / math.sqrt(2 * model.config.glm.num_layers)
        for layer in model.glm.layers:
            layer.attention.dense.weight.mul_(scale)
            layer.mlp.dense_4h_to_h.weight.mul_(scale)
    return model


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
