"""One protocol for every adapter, and adapter folders in the PEFT layout.

An adapter module (LoRALinear, PrefixEncoder) names its own trainable tensors with ``adapter_params()``;
everything else here (which parameters train, what an adapter state dict holds, saving and loading) is
driven by that one method.

An adapter folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` as PEFT writes them, with
tensor names in the HF VisualGLM module layout (``base_model.model.transformer.layers.0.attention.
query_key_value.lora_A.weight``, ``prompt_embeddings``), so PEFT can read them, and ours can read PEFT's.
The config records the base checkpoint (``base_model_name_or_path``) so the folder alone is enough to use it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .lora import LoRAConfig, LoRALinear, apply_lora
from .ptuning import PrefixEncoder, PTuningConfig, apply_ptuning

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
PROMPT_KEY = "prompt_embeddings"
PREFIX_PARAM = "glm.prefix_encoder.embedding.weight"

# canonical module prefix -> HF VisualGLM module prefix (only modules an adapter can touch)
_HF_PREFIXES = (
    ("glm.layers.", "transformer.layers."),
    ("vision.layers.", "image_encoder.vit.transformer.layers."),
    ("qformer.layers.", "image_encoder.qformer.transformer.layers."),
    ("glm_proj", "image_encoder.glm_proj"),
    ("glm.lm_head", "lm_head"),
)


class AdapterError(ValueError):
    """An adapter folder that cannot be used; the message names the file and what is wrong."""


@runtime_checkable
class AdapterModule(Protocol):
    def adapter_params(self) -> list[str]:
        """Names (relative to the module) of the parameters that make up the adapter."""


# ----- selection -------------------------------------------------------------------------------------
def get_adapter_params(model: nn.Module) -> dict[str, nn.Parameter]:
    out: dict[str, nn.Parameter] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterModule):
            for p in mod.adapter_params():
                full = f"{name}.{p}" if name else p
                out[full] = mod.get_parameter(p)
    return out


def set_trainable_params(model: nn.Module, names: set[str] | list[str]) -> int:
    """requires_grad only for ``names``; returns the number of trainable values."""
    names = set(names)
    unknown = names - {n for n, _ in model.named_parameters()}
    if unknown:
        raise ValueError(f"no such parameter(s): {sorted(unknown)[:5]}")
    total = 0
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
        total += p.numel() if n in names else 0
    return total


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in get_adapter_params(model).items()}


# ----- names ---------------------------------------------------------------------------------------------
def to_hf_module(name: str) -> str:
    for ours, hf in _HF_PREFIXES:
        if name == ours.rstrip(".") or name.startswith(ours):
            return hf + name[len(ours):]
    raise AdapterError(f"no HF name for module {name!r}")


def from_hf_module(name: str) -> str:
    for ours, hf in _HF_PREFIXES:
        if name == hf.rstrip(".") or name.startswith(hf):
            return ours + name[len(hf):]
    raise AdapterError(f"unknown module {name!r} (expected transformer.layers.*, image_encoder.*, lm_head)")


def to_peft_key(name: str) -> str:
    """``glm.layers.0.attention.dense.lora_a.weight`` -> ``base_model.model.transformer...lora_A.weight``."""
    if name == PREFIX_PARAM:
        return PROMPT_KEY
    module, _, leaf = name.rpartition(".lora_")
    if not module:
        raise AdapterError(f"{name!r} is not an adapter parameter")
    return f"{PEFT_PREFIX}{to_hf_module(module)}.lora_{leaf[0].upper()}{leaf[1:]}"


def from_peft_key(key: str) -> str:
    if key == PROMPT_KEY:
        return PREFIX_PARAM
    body = key.removeprefix(PEFT_PREFIX)
    for peft_leaf, ours in (("lora_A.weight", "lora_a.weight"), ("lora_B.weight", "lora_b.weight")):
        suffix = "." + peft_leaf
        if body.endswith(suffix):
            return f"{from_hf_module(body[: -len(suffix)])}.{ours}"
        suffix = f".{peft_leaf.split('.')[0]}.default.weight"  # PEFT in-memory names, just in case
        if body.endswith(suffix):
            return f"{from_hf_module(body[: -len(suffix)])}.{ours}"
    raise AdapterError(f"unsupported adapter tensor {key!r} (LoRA A/B weights and prompt_embeddings are)")


def target_regex(modules: list[str]) -> str:
    """A PEFT ``target_modules`` regex that selects exactly these (HF-named) modules."""
    import re
    return "^(" + "|".join(re.escape(to_hf_module(m)) for m in modules) + ")$"


# ----- config ----------------------------------------------------------------------------------------------
def lora_config_record(cfg: LoRAConfig, modules: list[str], base: str | None, method: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": target_regex(modules), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "modules_to_save": None,
        "visualglm": {"method": method, "targets": list(cfg.targets), "layers": cfg.layers},
    }


def ptuning_config_record(enc: PrefixEncoder, base: str | None) -> dict[str, Any]:
    hidden = enc.num_heads * enc.head_dim
    return {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "num_virtual_tokens": enc.pre_seq_len, "token_dim": hidden, "num_transformer_submodules": 1,
        "num_attention_heads": enc.num_heads, "num_layers": enc.num_layers, "encoder_hidden_size": hidden,
        "prefix_projection": False, "inference_mode": True, "visualglm": {"method": "ptuning"},
    }


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    folder = Path(folder).expanduser()
    file = folder / CONFIG_NAME
    if not file.is_file():
        raise AdapterError(f"{folder} is not an adapter folder: {CONFIG_NAME} is missing")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{file} is not valid JSON: {e}") from e
    if cfg.get("peft_type") not in ("LORA", "PREFIX_TUNING"):
        raise AdapterError(f"{file}: peft_type {cfg.get('peft_type')!r} is not supported "
                           "(LORA and PREFIX_TUNING are)")
    return cfg


def base_model_path(folder: str | Path) -> str | None:
    """The base checkpoint an adapter was trained on (None if it did not record one)."""
    return read_adapter_config(folder).get("base_model_name_or_path")


# ----- save / load --------------------------------------------------------------------------------------
def save_adapter(model: nn.Module, out_dir: str | Path, record: dict[str, Any]) -> Path:
    """Write the adapter's tensors (float32) and config; each file is replaced atomically."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {to_peft_key(n): t.float().cpu().contiguous() for n, t in adapter_state_dict(model).items()}
    if not tensors:
        raise AdapterError("the model has no adapter parameters to save")
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    text = json.dumps(record, indent=2, ensure_ascii=False) + "\n"
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(text, encoding="utf-8"))
    return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_adapter_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Canonical name -> tensor for every tensor in the adapter file."""
    file = Path(folder).expanduser() / WEIGHTS_NAME
    if not file.is_file():
        raise AdapterError(f"{file} is missing")
    with safe_open(str(file), framework="pt", device="cpu") as f:
        return {from_peft_key(k): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


def attach_adapter(model: nn.Module, folder: str | Path, *, dtype: torch.dtype | None = None) -> str:
    """Add the adapter in ``folder`` to ``model`` (not merged); returns the method ("lora" or "ptuning").

    LoRA goes exactly on the modules named in the file (rank from the tensor shapes), so PEFT files with any
    target choice load; the adapter takes the model's dtype unless ``dtype`` is given.
    """
    cfg = read_adapter_config(folder)
    tensors = read_adapter_tensors(folder)
    dtype = dtype or model.glm.final_layernorm.weight.dtype
    if cfg["peft_type"] == "LORA":
        _attach_lora(model, cfg, tensors, dtype, folder)
        method = "lora"
    else:
        _attach_prefix(model, cfg, tensors, dtype, folder)
        method = "ptuning"
    return method


def _attach_lora(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 folder: str | Path) -> None:
    modules = sorted({n.rpartition(".lora_")[0] for n in tensors if ".lora_" in n})
    if not modules or set(tensors) != {f"{m}.lora_{x}.weight" for m in modules for x in "ab"}:
        raise AdapterError(f"{folder}: {WEIGHTS_NAME} must hold lora_A and lora_B for every adapted module")
    rank = tensors[f"{modules[0]}.lora_a.weight"].shape[0]
    lcfg = LoRAConfig(rank=rank, alpha=float(cfg.get("lora_alpha", rank)), dropout=0.0, targets=modules)
    apply_lora(model, lcfg, adapter_dtype=dtype, names=modules)
    _copy_into(model, tensors, folder)


def _attach_prefix(model: nn.Module, cfg: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                   folder: str | Path) -> None:
    g = model.config.glm
    want = (g.num_layers, g.num_heads, g.hidden_size)
    got = (cfg.get("num_layers"), cfg.get("num_attention_heads"), cfg.get("token_dim"))
    if got != want:
        raise AdapterError(f"{folder}: prefix for (layers, heads, hidden) = {got}, model has {want}")
    apply_ptuning(model, PTuningConfig(int(cfg["num_virtual_tokens"])), dtype=dtype)
    _copy_into(model, tensors, folder)


def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy adapter tensors into an already adapted model (every adapter parameter must be given)."""
    _copy_into(model, tensors, where)


@torch.no_grad()
def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], folder: str | Path) -> None:
    params = get_adapter_params(model)
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise AdapterError(f"{folder}: adapter tensors do not match the model (missing {missing[:4]}, "
                           f"unexpected {extra[:4]})")
    for name, p in params.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(p.shape):
            raise AdapterError(f"{folder}: {name} has shape {list(t.shape)}, the model expects {list(p.shape)}")
        p.copy_(t.to(p.dtype))


def lora_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
