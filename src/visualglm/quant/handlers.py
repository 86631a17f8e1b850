"""Quantization as two verbs (plus the glue that runs them while loading).

* :func:`quantize_tensor` / :func:`quantize_state_dict` (offline): float tensors -> the quantized
  checkpoint tensors (``<module>.weight`` int8 / packed int4, ``<module>.weight_scale``), one tensor at a time
  so a conversion streams.
* :func:`convert_for_runtime`: swap the targeted ``nn.Linear`` / ``nn.Embedding`` modules of a (usually
  ``meta``) model for quantized skeletons *before* loading; :func:`load_transform` then quantizes every
  float weight as it streams in (or passes an already-quantized checkpoint through) and
  :func:`prepare_for_inference` repacks for the device's kernels once everything is in place.

:func:`quantize_model` quantizes a materialised model in place, module by module.
Which modules are quantized is decided here only, from ``VisualGLMConfig.quant`` (see ``QuantConfig``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..config import QuantConfig, VisualGLMConfig
from . import int4, int8
from .modules import QuantizedEmbedding, QuantizedLinear, check_bits, stored_columns

GLM_LINEAR = re.compile(r"^glm\.layers\.\d+\.(attention\.(query_key_value|dense)|mlp\.(dense_h_to_4h|dense_4h_to_h))$")
VISION_LINEAR = re.compile(r"^(vision|qformer)\.")  # every Linear of the ViT and the Q-Former (not glm_proj)
LM_HEAD, EMBEDDINGS = "glm.lm_head", "glm.word_embeddings"


def quant_config(bits: int | None, *, lm_head: bool = False, embeddings: bool = False, vision: bool = False,
                 extra_bits: int = 8) -> QuantConfig:
    """The QuantConfig for ``load(quantize=bits, ...)`` / ``--quant``: GLM block linears plus the extras."""
    if bits is None or bits == 0:
        if lm_head or embeddings or vision:
            raise ValueError("quantizing lm_head / embeddings / vision needs a bit width: pass quantize=8 or 4")
        return QuantConfig(bits=0)
    check_bits(bits, "quantize")
    targets = ["glm"] + [t for t, on in (("lm_head", lm_head), ("embeddings", embeddings), ("vision", vision)) if on]
    return QuantConfig(bits=bits, targets=targets, extra_bits=check_bits(extra_bits, "extra_bits"))


# ----- which module gets how many bits -------------------------------------------------------------------
def module_bits(name: str, kind: str, cfg: VisualGLMConfig) -> int:
    """Bits for module ``name`` ("linear" or "embedding"); 0 = left in floating point."""
    q = cfg.quant
    if not q.enabled:
        return 0
    tied = cfg.glm.tie_word_embeddings
    head_or_emb = "lm_head" in q.targets or "embeddings" in q.targets
    if kind == "linear":
        if GLM_LINEAR.match(name):
            return q.bits if "glm" in q.targets else 0
        if name == LM_HEAD:
            return q.extra_bits if ("lm_head" in q.targets or (tied and head_or_emb)) else 0
        if VISION_LINEAR.match(name):
            return q.extra_bits if "vision" in q.targets else 0
        return 0
    if kind == "embedding" and name == EMBEDDINGS:
        return q.extra_bits if ("embeddings" in q.targets or (tied and head_or_emb)) else 0
    return 0


def weight_bits(name: str, shape: torch.Size | tuple[int, ...], cfg: VisualGLMConfig) -> int:
    """Bits for a checkpoint tensor ``name`` (a ``.weight`` of a targeted module), else 0."""
    module, _, leaf = name.rpartition(".")
    if leaf != "weight" or len(shape) != 2:
        return 0
    kind = "embedding" if module == EMBEDDINGS else "linear"
    return module_bits(module, kind, cfg)


# ----- verb 1: offline ----------------------------------------------------------------------------------------
def quantize_tensor(name: str, tensor: torch.Tensor, cfg: VisualGLMConfig) -> dict[str, torch.Tensor]:
    """One checkpoint tensor -> the tensors to store for it (itself when not targeted)."""
    bits = weight_bits(name, tensor.shape, cfg)
    if bits == 0:
        return {name: tensor}
    if not tensor.is_floating_point():  # already quantized (a quantized checkpoint): keep as stored
        return {name: tensor}
    stored_columns(tensor.shape[1], bits)  # clear error for odd widths at INT4
    q, scale = (int8.quantize_int8 if bits == 8 else int4.quantize_int4)(tensor)
    return {name: q, name + "_scale": scale}


def quantize_state_dict(tensors: Iterable[tuple[str, torch.Tensor]], cfg: VisualGLMConfig
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream (name, float tensor) -> (name, stored tensor); ``cfg.quant`` says what and how."""
    for name, tensor in tensors:
        yield from quantize_tensor(name, tensor, cfg).items()


# ----- verb 2: runtime ----------------------------------------------------------------------------------------
def convert_for_runtime(model: nn.Module, cfg: VisualGLMConfig | None = None) -> nn.Module:
    """Swap every targeted Linear/Embedding for an empty quantized skeleton on the same device (``meta`` for
    loading). A tied lm_head gets non-persistent buffers: it shares the embedding's, tied after loading."""
    cfg = cfg or model.config
    tied = cfg.glm.tie_word_embeddings
    for name, mod in list(model.named_modules()):
        bits = _bits_of(name, mod, cfg)
        if not bits:
            continue
        ref = mod.weight
        dtype = ref.dtype if ref.is_floating_point() else None
        if isinstance(mod, nn.Embedding):
            new: nn.Module = QuantizedEmbedding(mod.num_embeddings, mod.embedding_dim, bits=bits, dtype=dtype,
                                                device=ref.device)
        else:
            new = QuantizedLinear(mod.in_features, mod.out_features, mod.bias is not None, bits=bits,
                                  dtype=dtype, device=ref.device, persistent=not (tied and name == LM_HEAD))
        replace_module(model, name, new)
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, quant: QuantConfig | None = None) -> nn.Module:
    """Quantize a materialised float model in place, module by module (peak: one float module extra).

    ``quant`` (default: the model's own ``config.quant``) is recorded in ``model.config``; a tied lm_head
    ends up sharing the quantized embedding's tensors.
    """
    if quant is not None:
        model.config.quant = quant
    cfg = model.config
    for name in [n for n, _ in model.named_modules()]:  # names: the float modules are freed one by one
        if name == LM_HEAD and cfg.glm.tie_word_embeddings:
            continue  # shares the embedding's quantized tensors (prepare_for_inference)
        mod = model.get_submodule(name)
        bits = _bits_of(name, mod, cfg)
        if bits and isinstance(mod, nn.Embedding):
            replace_module(model, name, QuantizedEmbedding.from_embedding(mod, bits))
        elif bits:
            replace_module(model, name, QuantizedLinear.from_linear(mod, bits))
        del mod
    return prepare_for_inference(model)


def load_transform(cfg: VisualGLMConfig):  # noqa: ANN201 (a checkpoint.io Transform)
    """The per-tensor hook for ``load_into``: float weights of targeted modules are quantized on the way in
    (one tensor in float at a time); tensors of an already-quantized checkpoint pass through."""
    def transform(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return quantize_tensor(name, tensor, cfg)
    return transform


def prepare_for_inference(model: nn.Module) -> nn.Module:
    """After loading: tie a quantized lm_head to the quantized embedding and repack for the kernels."""
    glm = getattr(model, "glm", None)
    tied = glm is not None and model.config.glm.tie_word_embeddings
    if tied and isinstance(glm.lm_head, QuantizedLinear) and not isinstance(glm.word_embeddings, QuantizedEmbedding):
        raise ValueError("a tied lm_head is quantized only together with the word embeddings (one matrix)")
    if tied and isinstance(glm.word_embeddings, QuantizedEmbedding):
        emb = glm.word_embeddings
        head = QuantizedLinear(emb.embedding_dim, emb.num_embeddings, False, bits=emb.bits,
                               dtype=emb.weight_scale.dtype, device="meta", persistent=False)
        head.weight, head.weight_scale = emb.weight, emb.weight_scale  # INT8: shared; INT4: repacked below
        glm.lm_head = head
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            mod.prepare()
    return model


def _bits_of(name: str, mod: nn.Module, cfg: VisualGLMConfig) -> int:
    if type(mod) is nn.Linear:
        return module_bits(name, "linear", cfg)
    if type(mod) is nn.Embedding:
        return module_bits(name, "embedding", cfg)
    return 0


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def resolve_quant(stored: QuantConfig, quantize: int | QuantConfig | None, extras: Iterable[str] = ()
                  ) -> QuantConfig:
    """What to load: a checkpoint's recorded quantization wins (it loads as stored, never re-quantized);
    a float checkpoint is quantized as asked (``quantize`` bits for the GLM linears, ``extras`` at 8 bits)."""
    extras = list(extras)
    if quantize is None and not extras:
        return stored
    if isinstance(quantize, QuantConfig):
        requested = quantize
    else:
        unknown = sorted(set(extras) - {"lm_head", "embeddings", "vision"})
        if unknown:
            raise ValueError(f"unknown quantization extra(s) {unknown}; accepted: lm_head, embeddings, vision")
        requested = quant_config(quantize, **{e: True for e in extras})
    if stored.enabled and requested != stored:
        raise ValueError(f"this checkpoint is already quantized (bits={stored.bits}, targets={stored.targets}, "
                         f"extra_bits={stored.extra_bits}) and loads as stored; drop quantize= / --quant, or "
                         "quantize the original float checkpoint instead")
    return requested
