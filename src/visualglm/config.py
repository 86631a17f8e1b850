"""Model sizes: the one source of truth, stored as ``config.json`` in every checkpoint folder.

Readers for the two foreign layouts (sat ``model_config.json`` and HF ``config.json``) convert into these
dataclasses, so every other module only ever sees a :class:`VisualGLMConfig`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "GLMConfig",
    "NAMED_CONFIGS",
    "QFormerConfig",
    "QuantConfig",
    "VisionConfig",
    "VisualGLMConfig",
]


@dataclass
class VisionConfig:
    """EVA-CLIP ViT (pre-LN, CLS token, learned positions, no final LN) followed by ``ln_vision``."""

    num_layers: int = 39
    hidden_size: int = 1408
    num_heads: int = 16
    intermediate_size: int = 6144
    image_size: int = 224
    patch_size: int = 14
    in_channels: int = 3
    layernorm_eps: float = 1e-6
    ln_vision_eps: float = 1e-5  # torch's default: the original builds ln_vision with nn.LayerNorm(hidden)

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass
class QFormerConfig:
    """BLIP-2 Q-Former (post-LN): learned queries self-attend and cross-attend into the ViT tokens."""

    num_layers: int = 12
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    num_query_tokens: int = 32
    cross_attention_layers: list[bool] = field(default_factory=lambda: [True, False] * 6)
    encoder_hidden_size: int = 1408
    layernorm_eps: float = 1e-12

    def __post_init__(self) -> None:
        if len(self.cross_attention_layers) != self.num_layers:
            raise ValueError(
                f"qformer.cross_attention_layers has {len(self.cross_attention_layers)} entries, "
                f"expected one per layer ({self.num_layers})"
            )


@dataclass
class GLMConfig:
    """ChatGLM-6B: DeepNorm-style residual, 2-D rotary positions, prefix-LM attention."""

    num_layers: int = 28
    hidden_size: int = 4096
    num_heads: int = 32
    intermediate_size: int = 16384
    vocab_size: int = 130528
    max_sequence_length: int = 2048
    layernorm_eps: float = 1e-5
    tie_word_embeddings: bool = False  # sat stores lm_head separately; the HF layout ties it
    rotary_base: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class QuantConfig:
    """Weight-only quantization recorded in the checkpoint, never guessed from file names.

    bits: 0 (none), 8 or 4 for the GLM block linears (query_key_value, dense, dense_h_to_4h, dense_4h_to_h).
    targets: what is quantized: "glm" (those block linears), "lm_head", "embeddings" (GLM word embeddings),
        "vision" (ViT and Q-Former linears). With a tied lm_head, "lm_head" and "embeddings" are one matrix:
        naming either quantizes both.
    extra_bits: 8 or 4 for the lm_head / embeddings / vision targets.
    """

    bits: int = 0
    targets: list[str] = field(default_factory=lambda: ["glm"])
    extra_bits: int = 8

    TARGETS = ("glm", "lm_head", "embeddings", "vision")

    def __post_init__(self) -> None:
        if self.bits not in (0, 4, 8):
            raise ValueError(f"quant.bits must be 0 (none), 8 or 4, got {self.bits!r}")
        if self.extra_bits not in (4, 8):
            raise ValueError(f"quant.extra_bits must be 8 or 4, got {self.extra_bits!r}")
        unknown = sorted(set(self.targets) - set(self.TARGETS))
        if unknown:
            raise ValueError(f"unknown quantization target(s) {unknown}; accepted: {', '.join(self.TARGETS)}")
        self.targets = [t for t in self.TARGETS if t in self.targets]  # canonical order, no duplicates

    @property
    def enabled(self) -> bool:
        return self.bits != 0


@dataclass
class VisualGLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    glm: GLMConfig = field(default_factory=GLMConfig)
    image_length: int = 32
    quant: QuantConfig = field(default_factory=QuantConfig)
    name: str = "visualglm-6b"

    def __post_init__(self) -> None:
        for sub, cls in (("vision", VisionConfig), ("qformer", QFormerConfig), ("glm", GLMConfig),
                         ("quant", QuantConfig)):
            value = getattr(self, sub)
            if isinstance(value, dict):
                setattr(self, sub, _from_dict(cls, value, sub))
        if self.qformer.num_query_tokens != self.image_length:
            raise ValueError(
                f"image_length ({self.image_length}) must equal qformer.num_query_tokens "
                f"({self.qformer.num_query_tokens}): each query output fills one placeholder token"
            )
        if self.qformer.encoder_hidden_size != self.vision.hidden_size:
            raise ValueError(
                f"qformer.encoder_hidden_size ({self.qformer.encoder_hidden_size}) must equal "
                f"vision.hidden_size ({self.vision.hidden_size})"
            )
        for part in (self.vision, self.qformer, self.glm):
            if part.hidden_size % part.num_heads:
                raise ValueError(f"{type(part).__name__}: hidden_size {part.hidden_size} is not divisible "
                                 f"by num_heads {part.num_heads}")

    # --- our own json -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": "visualglm", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisualGLMConfig:
        data = {k: v for k, v in data.items() if k != "format"}
        return _from_dict(cls, data, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VisualGLMConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_name(cls, name: str) -> VisualGLMConfig:
        if name not in NAMED_CONFIGS:
            raise KeyError(f"unknown model config {name!r}; known: {', '.join(sorted(NAMED_CONFIGS))}")
        return copy.deepcopy(NAMED_CONFIGS[name])

    # --- foreign layouts ----------------------------------------------------------------------
    @classmethod
    def from_sat(cls, data: dict[str, Any]) -> VisualGLMConfig:
        """Read sat's ``model_config.json`` (keys ``eva_args`` / ``qformer_args``)."""
        return cls._from_foreign(data, data["eva_args"], data["qformer_args"], tie=False, name="sat")

    @classmethod
    def from_hf(cls, data: dict[str, Any]) -> VisualGLMConfig:
        """Read THUDM/visualglm-6b's HF ``config.json`` (keys ``eva_config`` / ``qformer_config``)."""
        return cls._from_foreign(data, data["eva_config"], data["qformer_config"], tie=True, name="hf")

    @classmethod
    def _from_foreign(cls, glm: dict, eva: dict, qf: dict, *, tie: bool, name: str) -> VisualGLMConfig:
        hidden = glm["hidden_size"]
        image_size = eva.get("image_size", [224, 224])
        if isinstance(image_size, list):
            if image_size[0] != image_size[1]:
                raise ValueError(f"only square images are supported, config has image_size {image_size}")
            image_size = image_size[0]
        vision = VisionConfig(
            num_layers=eva["num_layers"],
            hidden_size=eva["hidden_size"],
            num_heads=eva["num_attention_heads"],
            intermediate_size=eva.get("inner_hidden_size") or 4 * eva["hidden_size"],
            image_size=image_size,
            patch_size=eva.get("patch_size", 14),
            in_channels=eva.get("in_channels", 3),
            layernorm_eps=eva.get("layernorm_epsilon", 1e-6),
        )
        qformer = QFormerConfig(
            num_layers=qf["num_layers"],
            hidden_size=qf["hidden_size"],
            num_heads=qf["num_attention_heads"],
            intermediate_size=qf.get("inner_hidden_size") or 4 * qf["hidden_size"],
            num_query_tokens=qf["vocab_size"],
            cross_attention_layers=[bool(x) for x in qf["is_decoder"]],
            encoder_hidden_size=qf.get("cross_attn_hidden_size") or eva["hidden_size"],
            layernorm_eps=qf.get("layernorm_epsilon", 1e-12),
        )
        glm_cfg = GLMConfig(
            num_layers=glm["num_layers"],
            hidden_size=hidden,
            num_heads=glm["num_attention_heads"],
            intermediate_size=glm.get("inner_hidden_size") or 4 * hidden,
            vocab_size=glm["vocab_size"],
            max_sequence_length=glm.get("max_sequence_length", 2048),
            layernorm_eps=glm.get("layernorm_epsilon", 1e-5),
            tie_word_embeddings=tie,
        )
        return cls(vision=vision, qformer=qformer, glm=glm_cfg, image_length=glm.get("image_length", 32),
                   name=name)


def _from_dict(cls: type, data: dict[str, Any], where: str) -> Any:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; accepted: {sorted(known)}")
    return cls(**data)


def _tiny() -> VisualGLMConfig:
    """The shape of ``shared/reference`` fixtures: real 224x224 input, everything else minute."""
    return VisualGLMConfig(
        vision=VisionConfig(num_layers=2, hidden_size=48, num_heads=4, intermediate_size=96),
        qformer=QFormerConfig(num_layers=4, hidden_size=32, num_heads=4, intermediate_size=128,
                              cross_attention_layers=[True, False, True, False], encoder_hidden_size=48),
        glm=GLMConfig(num_layers=3, hidden_size=64, num_heads=4, intermediate_size=256,
                      max_sequence_length=512),
        name="tiny",
    )


def _demo() -> VisualGLMConfig:
    """The shipped demo model (``visualglm.demo``): real 224x224 input in 28-pixel patches (64 + CLS tokens),
    a few narrow layers, and the vocabulary of the demo tokenizer (871 pieces, padded to a multiple of 64)."""
    return VisualGLMConfig(
        vision=VisionConfig(num_layers=3, hidden_size=96, num_heads=4, intermediate_size=384, patch_size=28),
        qformer=QFormerConfig(num_layers=2, hidden_size=96, num_heads=4, intermediate_size=384,
                              cross_attention_layers=[True, True], encoder_hidden_size=96),
        glm=GLMConfig(num_layers=4, hidden_size=128, num_heads=4, intermediate_size=512, vocab_size=896,
                      max_sequence_length=256),
        name="visualglm-demo",
    )


NAMED_CONFIGS: dict[str, VisualGLMConfig] = {
    "visualglm-6b": VisualGLMConfig(),
    "tiny": _tiny(),
    "visualglm-demo": _demo(),
}
