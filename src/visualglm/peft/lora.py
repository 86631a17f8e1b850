"""LoRA (and QLoRA as a flag): a Linear that keeps its ``weight``/``bias`` names plus a low-rank update.

``y = x W^T + b + (alpha / rank) * dropout(x) A^T B^T``, with A (rank, in) and B (out, rank); B starts at
zero so a fresh adapter leaves the model unchanged. Because the base parameters keep ``nn.Linear``'s names, a
base checkpoint loads into an adapted model unchanged, and merging is ``W + (alpha / rank) * B A``.

QLoRA stores the frozen base weights in 4-bit NF4 (torchao's ``NF4Tensor``, which works on CPU and CUDA and
dequantizes inside ``F.linear``), so a plain ``nn.Linear`` with an NF4 weight is already a frozen 4-bit layer.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_TARGETS = ("glm.attention.query_key_value", "glm.attention.dense")
LAYERED_PARTS = ("glm", "vision", "qformer")
TARGET_EXAMPLES = ("glm.attention.query_key_value", "glm.attention.dense", "glm.attention", "glm.mlp",
                   "glm.mlp.dense_h_to_4h", "qformer.attention", "qformer.cross_attention", "vision.attention",
                   "glm_proj")
GLM_LINEAR = re.compile(r"^glm\.layers\.\d+\.(attention\.(query_key_value|dense)|mlp\.(dense_h_to_4h|dense_4h_to_h))"
                        r"\.weight$")


@dataclass
class LoRAConfig:
    """What to adapt and how.

    targets: ``<part>.<path inside a layer>`` for part in glm / vision / qformer (a path prefix selects
    every Linear below it, e.g. ``glm.mlp``), ``glm_proj``, or a full module name.
    layers: GLM layer indices to adapt (None = all; ``[0, 14]`` is the original VisualGLM choice).
    quantize_base: QLoRA, every frozen GLM Linear weight in 4-bit NF4.
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    layers: list[int] | None = None
    quantize_base: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError(f"LoRA needs at least one target module, e.g. {', '.join(DEFAULT_TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """``nn.Linear`` + low-rank update; the base weight may be an NF4 tensor (QLoRA)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 bias: bool = True, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, adapter_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                                   requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False)
                     if bias else None)
        a_dtype = adapter_dtype or dtype
        self.lora_a = nn.Linear(in_features, rank, bias=False, device=device, dtype=a_dtype)
        self.lora_b = nn.Linear(rank, out_features, bias=False, device=device, dtype=a_dtype)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False  # True: behave exactly like the base Linear

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, *,
                    adapter_dtype: torch.dtype | None = None, quantize_base: bool = False,
                    generator: torch.Generator | None = None) -> LoRALinear:
        """Wrap ``linear``, reusing (not copying) its weight and bias; the adapter is freshly initialised."""
        w = linear.weight
        mod = cls(linear.in_features, linear.out_features, rank, alpha, dropout, bias=False, device="meta",
                  dtype=w.dtype)
        mod.weight = nn.Parameter(quantize_nf4(w.detach()) if quantize_base and not is_nf4(w) else w.detach(),
                                  requires_grad=False)
        mod.bias = (nn.Parameter(linear.bias.detach(), requires_grad=False) if linear.bias is not None else None)
        a_dtype = adapter_dtype or (torch.float32 if is_nf4(mod.weight) else w.dtype)
        mod.lora_a = nn.Linear(linear.in_features, rank, bias=False, device=w.device, dtype=a_dtype)
        mod.lora_b = nn.Linear(rank, linear.out_features, bias=False, device=w.device, dtype=a_dtype)
        mod.reset_adapter(generator)
        return mod

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A ~ Kaiming-uniform (as nn.Linear), B = 0: the update starts at exactly zero."""
        bound = 1 / math.sqrt(self.in_features)
        a = torch.rand(self.lora_a.weight.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
        self.lora_a.weight.copy_(a)
        self.lora_b.weight.zero_()

    def adapter_params(self) -> list[str]:
        return ["lora_a.weight", "lora_b.weight"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # NF4 weights dequantize inside F.linear
        if self.disabled:
            return out
        a, b = self.lora_a.weight, self.lora_b.weight
        if not torch.is_autocast_enabled(x.device.type):
            a, b = a.to(x.dtype), b.to(x.dtype)  # fp32 adapters over a bf16 base
        update = F.linear(F.linear(self.dropout(x), a), b)  # (..., out)
        return out + update.to(out.dtype) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + scaling * B A in the base weight's dtype (NF4 bases are dequantized first)."""
        w = dequantize(self.weight)
        return merge_weight(w, self.lora_a.weight, self.lora_b.weight, self.scaling)

    def extra_repr(self) -> str:
        kind = "nf4" if is_nf4(self.weight) else str(self.weight.dtype).removeprefix("torch.")
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, "
                f"base={kind}")


def merge_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
                 ) -> torch.Tensor:
    """W (out, in) + scaling * B (out, r) @ A (r, in), computed in float32, returned in W's dtype."""
    delta = lora_b.float() @ lora_a.float()  # (out, in)
    return (weight.float() + scaling * delta.to(weight.device)).to(weight.dtype)


# ----- applying and merging ------------------------------------------------------------------------
def target_matches(name: str, target: str, layers: list[int] | None) -> bool:
    """Does module ``name`` (canonical, e.g. ``glm.layers.3.attention.dense``) match ``target``?"""
    if name == target:
        return True
    part, _, sub = target.partition(".")
    if part not in LAYERED_PARTS:
        return False
    m = re.match(rf"^{part}\.layers\.(\d+)\.(.+)$", name)
    if m is None:
        return False
    if part == "glm" and layers is not None and int(m.group(1)) not in layers:
        return False
    rest = m.group(2)
    return not sub or rest == sub or rest.startswith(sub + ".")


def find_targets(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Names of the Linear modules ``cfg`` selects; every target must select something."""
    linears = [n for n, m in model.named_modules() if type(m) is nn.Linear]
    if cfg.layers is not None:
        n_layers = len(model.glm.layers)
        bad = [i for i in cfg.layers if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"LoRA layers {bad} out of range: the GLM has layers 0..{n_layers - 1}")
    chosen: list[str] = []
    for target in cfg.targets:
        hits = [n for n in linears if target_matches(n, target, cfg.layers)]
        if not hits:
            raise ValueError(f"LoRA target {target!r} matches no Linear module; examples: "
                             f"{', '.join(TARGET_EXAMPLES)} (or a full module name)")
        chosen += [n for n in hits if n not in chosen]
    return chosen


def apply_lora(model: nn.Module, cfg: LoRAConfig, *, seed: int = 0, adapter_dtype: torch.dtype | None = None,
               names: list[str] | None = None) -> list[str]:
    """Swap the selected Linears (or exactly ``names``) for LoRALinear in place; returns their names.

    With ``cfg.quantize_base`` every other GLM Linear weight becomes NF4 as well (frozen, 4-bit).
    """
    names = find_targets(model, cfg) if names is None else names
    g = torch.Generator().manual_seed(seed)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, attr)
        if not isinstance(lin, nn.Linear):
            raise ValueError(f"{name} is a {type(lin).__name__}, not a Linear: cannot add LoRA")
        setattr(parent, attr, LoRALinear.from_linear(lin, cfg.rank, cfg.alpha, cfg.dropout,
                                                     adapter_dtype=adapter_dtype,
                                                     quantize_base=cfg.quantize_base, generator=g))
    if cfg.quantize_base:
        quantize_glm_linears(model)
    return names


def quantize_glm_linears(model: nn.Module) -> int:
    """Store every plain GLM Linear weight (attention and MLP) in NF4; returns how many were converted."""
    count = 0
    for name, mod in model.named_modules():
        if type(mod) is nn.Linear and GLM_LINEAR.match(name + ".weight") and not is_nf4(mod.weight):
            mod.weight = nn.Parameter(quantize_nf4(mod.weight.detach()), requires_grad=False)
            count += 1
    return count


def iter_lora(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            yield name, mod


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain Linear holding ``W + scaling * B A`` (in place)."""
    for name, mod in list(iter_lora(model)):
        parent_name, _, attr = name.rpartition(".")
        w = mod.merged_weight()
        lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if mod.bias is not None:
            lin.bias = nn.Parameter(mod.bias.detach(), requires_grad=False)
        setattr(model.get_submodule(parent_name), attr, lin)
    return model


# ----- NF4 (torchao) ---------------------------------------------------------------------------------
def _nf4_module():
    """torchao's NF4 tensor module, imported only for QLoRA (and its loader noise silenced)."""
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as e:
        raise ImportError("QLoRA needs torchao (NF4 on CPU and CUDA): pip install 'visualglm[finetune]' or "
                          "pip install --no-deps torchao") from e
    finally:
        log.setLevel(level)
    return nf4_tensor


def is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor" or type(getattr(t, "data", None)).__name__ == "NF4Tensor"


def nf4_block_sizes(numel: int, block: int = 64, scaler_block: int = 256) -> tuple[int, int]:
    """NF4 quantizes blocks of 64 values; their scales are quantized in groups that must divide the block
    count. Large layers use the standard (64, 256); small ones a smaller scale group."""
    if numel % block:
        raise ValueError(f"NF4 needs a weight size divisible by {block}, got {numel} values")
    n_blocks = numel // block
    scaler = max(d for d in range(1, min(scaler_block, n_blocks) + 1) if n_blocks % d == 0)
    return block, scaler


def quantize_nf4(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) float weight -> NF4Tensor of the same shape and nominal dtype (4 bits + scales)."""
    nf4 = _nf4_module()
    block, scaler = nf4_block_sizes(weight.numel())
    return nf4.to_nf4(weight.contiguous(), block, scaler)


def dequantize(weight: torch.Tensor) -> torch.Tensor:
    return weight.get_original_weight() if is_nf4(weight) else weight.detach()
