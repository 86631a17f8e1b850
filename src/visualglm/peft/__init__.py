"""Parameter-efficient fine-tuning: LoRA / QLoRA (``lora``), P-tuning v2 (``ptuning``), adapter folders."""

from .adapters import attach_adapter, base_model_path, get_adapter_params, read_adapter_config, save_adapter
from .lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from .ptuning import PrefixEncoder, PTuningConfig, apply_ptuning

__all__ = ["LoRAConfig", "LoRALinear", "PTuningConfig", "PrefixEncoder", "apply_lora", "apply_ptuning",
           "attach_adapter", "base_model_path", "get_adapter_params", "merge_lora", "read_adapter_config",
           "save_adapter"]
