"""Pure name and layout maps from the foreign checkpoint layouts (sat, HF) to our canonical key space.

Canonical names are the module paths of :class:`visualglm.model.VisualGLM` (``vision.*``, ``qformer.*``,
``glm_proj.*``, ``glm.*``); the GLM ``query_key_value`` rows are per-head interleaved ([q_h | k_h | v_h] per
head, the HF layout), so a contiguous block of rows always holds whole heads.
"""

from __future__ import annotations

import re

import torch

# (pattern on the sat name, replacement); the first match wins. HF names are first rewritten to sat's.
_SAT_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(p), r) for p, r in [
        (r"^mixins\.eva\.model\.vit\.mixins\.patch_embedding\.proj\.", "vision.patch_embed."),
        (r"^mixins\.eva\.model\.vit\.mixins\.cls\.ln_vision\.", "vision.ln_vision."),
        (r"^mixins\.eva\.model\.vit\.transformer\.word_embeddings\.weight$", "vision.cls_token"),
        (r"^mixins\.eva\.model\.vit\.transformer\.position_embeddings\.weight$", "vision.pos_embed"),
        (r"^mixins\.eva\.model\.vit\.transformer\.layers\.", "vision.layers."),
        (r"^mixins\.eva\.model\.qformer\.transformer\.word_embeddings\.weight$", "qformer.query_tokens"),
        (r"^mixins\.eva\.model\.qformer\.transformer\.layers\.", "qformer.layers."),
        (r"^mixins\.eva\.model\.qformer\.transformer\.final_layernorm\.", "qformer.final_layernorm."),
        (r"^mixins\.eva\.model\.glm_proj\.", "glm_proj."),
        (r"^transformer\.word_embeddings\.weight$", "glm.word_embeddings.weight"),
        (r"^transformer\.layers\.", "glm.layers."),
        (r"^transformer\.final_layernorm\.", "glm.final_layernorm."),
        (r"^mixins\.chatglm-final\.lm_head\.weight$", "glm.lm_head.weight"),
    ]
]

# Keys that carry no weights we need: rotary tables (recomputed in float32) and the released sat file's
# unused GLM position embeddings (current sat ignores them too).
_IGNORED = re.compile(
    r"(rotary_emb\.inv_freq$)|(^transformer\.position_embeddings\.weight$)"
)

GLM_QKV = re.compile(r"^glm\.layers\.\d+\.attention\.query_key_value\.(weight|bias)$")


def hf_to_sat_name(name: str) -> str:
    if name.startswith("image_encoder."):
        return "mixins.eva.model." + name[len("image_encoder."):]
    if name == "lm_head.weight":
        return "mixins.chatglm-final.lm_head.weight"
    return name


def canonical_name(name: str, fmt: str) -> str | None:
    """Map a key of a ``fmt`` ("sat", "hf" or "visualglm") file; None for keys that are ignored."""
    if fmt == "visualglm":
        return name
    if fmt == "hf":
        name = hf_to_sat_name(name)
    elif fmt != "sat":
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected sat, hf or visualglm")
    if _IGNORED.search(name):
        return None
    for pattern, repl in _SAT_RULES:
        if pattern.search(name):
            return pattern.sub(repl, name, count=1)
    raise KeyError(name)


def contiguous_to_interleaved(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[Q (all heads) | K | V] rows -> per head [q_h | k_h | v_h] (weight or bias)."""
    rest = t.shape[1:]
    return t.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def interleaved_to_contiguous(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def guess_qkv_layout(weight: torch.Tensor, num_heads: int) -> tuple[str, float]:
    """Guess whether a sat GLM query_key_value weight is "contiguous" or "interleaved".

    Trained Q, K and V projections have clearly different row norms. Group the row norms into the three
    parts under each hypothesis; the right one separates them (a large between/within variance ratio).
    Returns the better layout and how many times better it separates (about 1 means undecidable, e.g.
    random weights).
    """
    norms = weight.float().norm(dim=1)  # (3 * H,)

    def separation(parts: torch.Tensor) -> float:  # parts (3, rows per part)
        between = parts.mean(dim=1).var().item()
        within = parts.var(dim=1).mean().item() + 1e-12
        return between / within

    contiguous = separation(norms.view(3, -1))
    interleaved = separation(norms.view(num_heads, 3, -1).transpose(0, 1).reshape(3, -1))
    if contiguous >= interleaved:
        return "contiguous", (contiguous + 1e-12) / (interleaved + 1e-12)
    return "interleaved", (interleaved + 1e-12) / (contiguous + 1e-12)
