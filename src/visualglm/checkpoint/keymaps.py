"""Pure name and layout maps between the foreign checkpoint layouts (sat, HF) and our canonical key space.

Canonical names are the module paths of :class:`visualglm.model.VisualGLM` (``vision.*``, ``qformer.*``,
``glm_proj.*``, ``glm.*``); the GLM ``query_key_value`` rows are per-head interleaved ([q_h | k_h | v_h] per
head, the HF layout), so a contiguous block of rows always holds whole heads.
"""

from __future__ import annotations

import re

import torch

FORMATS = ("sat", "hf", "visualglm")

# (sat name, canonical name), one table for both directions. An entry ending in "." maps every name with
# that prefix (the rest unchanged: layer internals have the same names on both sides); any other entry maps
# exactly one name. HF names are sat names with two renames (see _HF_TO_SAT).
_SAT_TABLE: list[tuple[str, str]] = [
    ("mixins.eva.model.vit.mixins.patch_embedding.proj.", "vision.patch_embed."),
    ("mixins.eva.model.vit.mixins.cls.ln_vision.", "vision.ln_vision."),
    ("mixins.eva.model.vit.transformer.word_embeddings.weight", "vision.cls_token"),
    ("mixins.eva.model.vit.transformer.position_embeddings.weight", "vision.pos_embed"),
    ("mixins.eva.model.vit.transformer.layers.", "vision.layers."),
    ("mixins.eva.model.qformer.transformer.word_embeddings.weight", "qformer.query_tokens"),
    ("mixins.eva.model.qformer.transformer.layers.", "qformer.layers."),
    ("mixins.eva.model.qformer.transformer.final_layernorm.", "qformer.final_layernorm."),
    ("mixins.eva.model.glm_proj.", "glm_proj."),
    ("transformer.word_embeddings.weight", "glm.word_embeddings.weight"),
    ("transformer.layers.", "glm.layers."),
    ("transformer.final_layernorm.", "glm.final_layernorm."),
    ("mixins.chatglm-final.lm_head.weight", "glm.lm_head.weight"),
]
_HF_TO_SAT: list[tuple[str, str]] = [
    ("image_encoder.", "mixins.eva.model."),
    ("lm_head.weight", "mixins.chatglm-final.lm_head.weight"),
]

# Keys that carry no weights we need: rotary tables (recomputed in float32) and the released sat file's
# unused GLM position embeddings (current sat ignores them too).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq$)|(^transformer\.position_embeddings\.weight$)")

GLM_QKV = re.compile(r"^glm\.layers\.\d+\.attention\.query_key_value\.(weight|bias)$")


def _rename(name: str, table: list[tuple[str, str]], reverse: bool = False) -> str | None:
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if src.endswith(".") and name.startswith(src):
            return dst + name[len(src):]
        if name == src:
            return dst
    return None


def hf_to_sat_name(name: str) -> str:
    return _rename(name, _HF_TO_SAT) or name


def sat_to_hf_name(name: str) -> str:
    return _rename(name, _HF_TO_SAT, reverse=True) or name


def canonical_name(name: str, fmt: str) -> str | None:
    """Map a key of a ``fmt`` ("sat", "hf" or "visualglm") file; None for keys that are ignored.

    Raises KeyError for a key that belongs to no VisualGLM weight.
    """
    if fmt == "visualglm":
        return name
    if fmt == "hf":
        name = hf_to_sat_name(name)
    elif fmt != "sat":
        raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if _IGNORED.search(name):
        return None
    canon = _rename(name, _SAT_TABLE)
    if canon is None:
        raise KeyError(name)
    return canon


def foreign_name(canon: str, fmt: str) -> str:
    """The inverse of :func:`canonical_name`: our key -> the key a ``fmt`` file stores it under."""
    if fmt == "visualglm":
        return canon
    sat = _rename(canon, _SAT_TABLE, reverse=True)
    if sat is None:
        raise KeyError(canon)
    if fmt == "sat":
        return sat
    if fmt == "hf":
        return sat_to_hf_name(sat)
    raise ValueError(f"unknown checkpoint format {fmt!r}; expected one of {', '.join(FORMATS)}")


def contiguous_to_interleaved(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[Q (all heads) | K | V] rows -> per head [q_h | k_h | v_h] (weight or bias); a new tensor."""
    return interleaved_view(t, num_heads).reshape(t.shape)


def interleaved_view(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A view of contiguous-layout rows ordered (head, part, row): copy it into a (H, 3, d, ...) tensor
    to get the interleaved layout without an intermediate copy."""
    return t.reshape(3, num_heads, -1, *t.shape[1:]).transpose(0, 1)  # (H, 3, d, ...)


def interleaved_to_contiguous(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(num_heads, 3, -1, *rest).transpose(0, 1).reshape(t.shape)


def qkv_separation(row_norms: torch.Tensor, num_heads: int) -> dict[str, float]:
    """How well each layout hypothesis splits a GLM query_key_value weight's row norms into Q, K and V.

    Trained Q, K and V projections have clearly different row norms. Under each hypothesis the rows are
    grouped into the three parts and a one-way ANOVA F statistic is computed: about 1 when the grouping
    is arbitrary (random weights, or the wrong layout), large (tens to thousands) for the right layout.
    """
    norms = row_norms.double()  # (3 * H * d,)
    groups = {
        "contiguous": norms.view(3, -1),
        "interleaved": norms.view(num_heads, 3, -1).transpose(0, 1).reshape(3, -1),
    }
    return {layout: _f_statistic(parts) for layout, parts in groups.items()}


def _f_statistic(parts: torch.Tensor) -> float:
    """parts (3, n): between-group variance over within-group variance (one-way ANOVA)."""
    k, n = parts.shape
    between = n * ((parts.mean(dim=1) - parts.mean()) ** 2).sum() / (k - 1)
    within = ((parts - parts.mean(dim=1, keepdim=True)) ** 2).sum() / (k * (n - 1))
    return float(between / within.clamp_min(1e-30))
