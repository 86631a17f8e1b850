"""Fine-tuning settings: plain dataclasses, filled from a YAML file (plain keys) and then command-line flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from ..peft.lora import LoRAConfig
from ..peft.ptuning import PTuningConfig
from .data import DataConfig

METHODS = ("lora", "qlora", "ptuning", "full")
PARTS = ("vision", "qformer", "proj", "glm")
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class OptimConfig:
    """AdamW, linear warmup then cosine decay to ``min_lr_ratio * lr``; ``max_grad_norm`` 0 = no clipping."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int | None = None  # default: warmup_ratio of the steps
    warmup_ratio: float = 0.02  # the original's --warmup .02
    min_lr_ratio: float = 0.0
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    """The loop. ``batch_size`` is the global batch (samples per optimizer step, over all processes);
    ``micro_batch_size`` samples go through one forward per process; the rest is gradient accumulation."""

    steps: int | None = None
    epochs: float | None = None  # used when steps is not given
    batch_size: int = 4
    micro_batch_size: int = 1
    seed: int = 0
    dtype: str | None = None  # weights: float32 / bfloat16 (default: bf16 for >= 1B params; full: float32)
    precision: str = "auto"  # autocast: auto (bf16 when the weights are bf16 or on a bf16 GPU), fp32, bf16
    gradient_checkpointing: bool = True
    device: str | None = None
    log_every: int = 1
    eval_every: int = 0  # 0 = only at the end
    eval_max_samples: int = 200
    eval_max_new_tokens: int = 64
    eval_generate: bool = True  # answer exact-match through the real generation path
    save_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    save_dtype: str | None = None  # full fine-tuning: dtype of the written model (default: as trained)
    progress: bool = True
    fsdp: bool = False
    cache_image_embeds: bool = True  # frozen image encoder: encode each image once


@dataclass
class FinetuneConfig:
    method: str = "lora"
    model: str = ""  # checkpoint folder; with init=random also a config name or config.json
    init: str = "checkpoint"  # or "random" (train from scratch, e.g. the demo model)
    tokenizer: str | None = None
    output_dir: str = ""
    train_parts: list[str] = field(default_factory=lambda: ["glm"])  # method full: what to train
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    ptuning: PTuningConfig = field(default_factory=PTuningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        if not self.model and self.init == "checkpoint":  # like every command: the shipped demo model
            from ..api import DEMO_MODEL
            self.model = str(DEMO_MODEL)
        checks = [
            (self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
            (self.init in ("checkpoint", "random"), f"init must be checkpoint or random, got {self.init!r}"),
            (bool(self.model), "a model is required (--model: checkpoint folder, or config name with --init random)"),
            (bool(self.data.train), "training data is required (--data FILE)"),
            (bool(self.output_dir), "an output folder is required (--output DIR)"),
            (self.train.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.train.batch_size >= 1 and self.train.micro_batch_size >= 1, "batch sizes must be >= 1"),
            (self.train.steps is None or self.train.steps >= 1, "steps must be >= 1"),
            (self.train.epochs is None or self.train.epochs > 0, "epochs must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        bad = [p for p in self.train_parts if p not in PARTS]
        if bad or not self.train_parts:
            raise ValueError(f"--train takes a comma list of {', '.join(PARTS)}; got {self.train_parts}")
        self.lora.quantize_base = self.method == "qlora"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def from_dict(data: dict[str, Any], cls: type = FinetuneConfig, where: str = "config") -> Any:
    """Nested plain dict -> dataclasses; unknown keys are errors that list the accepted ones."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; accepted: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        default = cls.__dataclass_fields__[name].default_factory  # type: ignore[attr-defined]
        sub = default() if callable(default) else None
        if is_dataclass(sub) and isinstance(value, dict):
            value = from_dict(value, type(sub), f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError as e:
        raise ImportError("reading --config YAML files needs pyyaml: pip install 'visualglm[finetune]'") from e
    text = Path(path).expanduser().read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings at the top level")
    return data


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge plain dicts (overrides win)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
