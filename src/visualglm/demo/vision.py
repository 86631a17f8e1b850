"""Pretraining the demo's vision tower, the way VisualGLM-6B starts from a pretrained EVA-CLIP.

The language-model loss alone teaches a from-scratch ViT which colours are present and where, but shape
recognition barely moves through it on two CPU cores: the signal reaches the patches only through the
Q-Former and a few answer tokens (shape questions stayed near chance for thousands of steps). A direct
objective fixes that in a couple of minutes: for every shape of a rendered scene, the ViT's output tokens over
the patches it covers, and the Q-Former's outputs over the regions it touches, are averaged and linear heads
must name its kind and colour (and the background's colour from all Q-Former outputs). The heads are thrown
away; the tower keeps its 2-D position codes (the Q-Former's spatial queries read them), and the whole model
is trained end to end afterwards anyway.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..image import preprocess
from ..model.eva_vit import EvaViT
from ..model.qformer import QFormer
from .scenes import (
    BACKGROUNDS,
    COLORS,
    IMAGE_SIZE,
    SHAPES,
    Scene,
    random_scene,
    render,
    scene_rng,
    shape_index_map,
)

PRETRAIN_SEED = 2  # its own scene stream: disjoint from the training, few-shot and evaluation seeds
MIN_COVER = 0.15  # a patch belongs to a shape when the shape paints at least this share of it


def patch_owners(scene: Scene, patch: int) -> torch.Tensor:
    """(patches,) long: for each patch (row-major) 0 for background, or i + 1 when ``scene.shapes[i]`` paints
    the largest part of it and at least MIN_COVER of it."""
    grid = IMAGE_SIZE // patch
    index = torch.from_numpy(np.array(shape_index_map(scene), dtype=np.int64))  # (H, W)
    cells = index.reshape(grid, patch, grid, patch).permute(0, 2, 1, 3).reshape(grid * grid, patch * patch)
    counts = F.one_hot(cells, len(scene.shapes) + 1).sum(1)[:, 1:]  # (patches, shapes)
    best = counts.max(1)
    return torch.where(best.values >= MIN_COVER * patch * patch, best.indices + 1, torch.zeros_like(best.indices))


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, 224, 224)
    patch_weights: torch.Tensor  # (shapes, B * patches): row i averages the patches shape i owns
    query_weights: torch.Tensor  # (shapes, B * queries): row i averages the queries whose region it touches
    kinds: torch.Tensor  # (shapes,)
    colors: torch.Tensor  # (shapes,)
    backgrounds: torch.Tensor  # (B,)


def _batch(scenes: list[Scene], patch: int, num_queries: int) -> Batch:
    """Query k starts out reading region k of the patch grid (row-major runs of ``patches // num_queries``
    patches; see ``train._spatial_queries``), so a shape's queries are those of the regions it touches."""
    pixels = torch.stack([preprocess(render(s)) for s in scenes])
    patches = (IMAGE_SIZE // patch) ** 2
    width = patches // num_queries
    prows, qrows, kinds, colors = [], [], [], []
    for b, scene in enumerate(scenes):
        owners = patch_owners(scene, patch)
        for i, s in enumerate(scene.shapes):
            owned = owners == i + 1
            if not owned.any():  # a shape too small to own a patch: nothing to learn from
                continue
            pm, qm = torch.zeros(len(scenes), patches), torch.zeros(len(scenes), num_queries)
            pm[b] = owned.float()
            qm[b] = owned.reshape(num_queries, width).any(1).float()
            prows.append(pm.flatten())
            qrows.append(qm.flatten())
            kinds.append(SHAPES.index(s.kind))
            colors.append(COLORS.index(s.color))
    pw, qw = torch.stack(prows), torch.stack(qrows)
    return Batch(pixels, pw / pw.sum(1, keepdim=True), qw / qw.sum(1, keepdim=True), torch.tensor(kinds),
                 torch.tensor(colors), torch.tensor([BACKGROUNDS.index(s.background) for s in scenes]))


def pretrain_vision(vision: EvaViT, qformer: QFormer, *, steps: int = 1000, batch_size: int = 32,
                    lr: float = 2e-3, seed: int = 0, log: Callable[[str], None] | None = None,
                    log_every: int = 100) -> dict[str, float]:
    """Train ``vision`` and ``qformer`` in place: each shape's kind and colour must be read linearly from the
    mean of the ViT tokens it covers and from the mean of the Q-Former outputs over its regions (the tokens
    the language model sees), the background colour from the mean of all Q-Former outputs. Returns the last
    held-out accuracies."""
    log = log or (lambda line: print(line, flush=True))
    torch.manual_seed(seed)
    patch, hidden, qhidden = vision.cfg.patch_size, vision.cfg.hidden_size, qformer.cfg.hidden_size
    queries = qformer.cfg.num_query_tokens
    heads = torch.nn.ModuleDict({
        "vit_kind": torch.nn.Linear(hidden, len(SHAPES)), "vit_color": torch.nn.Linear(hidden, len(COLORS)),
        "q_kind": torch.nn.Linear(qhidden, len(SHAPES)), "q_color": torch.nn.Linear(qhidden, len(COLORS)),
        "q_background": torch.nn.Linear(qhidden, len(BACKGROUNDS))})
    params = [*vision.parameters(), *qformer.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    held_out = _batch([random_scene(random.Random(f"visualglm-demo-vision-eval:{i}")) for i in range(200)],
                      patch, queries)

    def logits(b: Batch) -> dict[str, torch.Tensor]:
        tokens = vision(b.pixels)  # (B, 1 + patches, C)
        outputs = qformer(tokens)  # (B, queries, Cq)
        vit, q = b.patch_weights @ tokens[:, 1:].reshape(-1, hidden), b.query_weights @ outputs.flatten(0, 1)
        return {"vit_kind": heads["vit_kind"](vit), "vit_color": heads["vit_color"](vit),
                "q_kind": heads["q_kind"](q), "q_color": heads["q_color"](q),
                "q_background": heads["q_background"](outputs.mean(1))}

    def targets(b: Batch, name: str) -> torch.Tensor:
        return {"kind": b.kinds, "color": b.colors, "background": b.backgrounds}[name.split("_")[-1]]

    result: dict[str, float] = {}
    vision.train()
    qformer.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        b = _batch([random_scene(scene_rng(PRETRAIN_SEED, (step - 1) * batch_size + i)) for i in range(batch_size)],
                   patch, queries)
        loss = sum(F.cross_entropy(v, targets(b, k)) for k, v in logits(b).items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                out = logits(held_out)
            result = {"step": step, "loss": round(loss.item(), 4),
                      **{f"{k}_accuracy": (v.argmax(1) == targets(held_out, k)).float().mean().item()
                         for k, v in out.items()},
                      "seconds": round(time.perf_counter() - started, 1)}
            log("vision pretraining: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    vision.eval()
    qformer.eval()
    return result
