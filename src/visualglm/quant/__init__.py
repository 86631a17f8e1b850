"""Weight-only INT8/INT4 quantization compatible with the original VisualGLM/ChatGLM scheme.

See :mod:`visualglm.quant.handlers` for the two verbs (quantize offline, convert for runtime) and
:mod:`visualglm.quant.int8` / :mod:`visualglm.quant.int4` for the scheme and the kernels.
"""

from .handlers import (
    convert_for_runtime,
    load_transform,
    prepare_for_inference,
    quant_config,
    quantize_model,
    quantize_state_dict,
    quantize_tensor,
)
from .modules import QuantizedEmbedding, QuantizedLinear

__all__ = [
    "QuantizedEmbedding",
    "QuantizedLinear",
    "convert_for_runtime",
    "load_transform",
    "prepare_for_inference",
    "quant_config",
    "quantize_model",
    "quantize_state_dict",
    "quantize_tensor",
]
