"""Logit error of weight-only INT8/INT4 on a larger random config (the 6B GLM shape, cut to a few layers).

Usage: ``python benchmarks/quant_error.py [--layers 2] [--tokens 48]``. Prints one JSON object per variant:
max |logit difference|, relative L2 error of the logits, and top-1 agreement over every prompt position,
against the same random model in float32 (weights from ``random_model``: N(0, 1/fan_in) linears).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from visualglm.config import VisualGLMConfig
from visualglm.model.init import random_model
from visualglm.quant import quant_config, quantize_model


def config(layers: int) -> VisualGLMConfig:
    """The 6B GLM shape (vision tower shrunk: it is not on the text path measured here)."""
    cfg = VisualGLMConfig.from_name("tiny")
    full = VisualGLMConfig.from_name("visualglm-6b").glm
    full.num_layers = layers
    full.tie_word_embeddings = True
    cfg.glm = full
    return cfg


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    t = ids.shape[1]
    pos = torch.stack([torch.arange(t), torch.zeros(t, dtype=torch.long)])[None]  # plain context positions
    return model(ids, pos, context_lengths=torch.tensor([t]))[0].float()  # (T, V)


def compare(want: torch.Tensor, got: torch.Tensor) -> dict[str, float]:
    return {"max_abs_err": float((got - want).abs().max()), "logit_abs_max": float(want.abs().max()),
            "rel_l2_err": float((got - want).norm() / want.norm()),
            "top1_agreement": float((got.argmax(-1) == want.argmax(-1)).float().mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = config(args.layers)
    ids = torch.randint(5, 20000, (1, args.tokens), generator=torch.Generator().manual_seed(args.seed + 1))
    want = logits(random_model(cfg, seed=args.seed), ids)
    variants = {"int8": quant_config(8), "int4": quant_config(4),
                "int4+lm_head/embeddings int8": quant_config(4, lm_head=True, embeddings=True)}
    for name, quant in variants.items():
        t = time.perf_counter()
        model = quantize_model(random_model(cfg, seed=args.seed), quant)
        got = logits(model, ids)
        del model
        print(json.dumps({"variant": name, "glm_layers": args.layers, "hidden": cfg.glm.hidden_size,
                          "tokens": args.tokens, **compare(want, got), "seconds": time.perf_counter() - t}))


if __name__ == "__main__":
    main()
