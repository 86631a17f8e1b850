"""``visualglm.load``: the one way to get a ready model and tokenizer from a checkpoint folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .checkpoint.io import CheckpointError, CheckpointSource, Transform, inspect, load_into
from .config import QuantConfig
from .distributed.tp import TensorParallel, tensor_parallel_setup
from .generation.engine import check_compile
from .model.visualglm import VisualGLM
from .quant.handlers import convert_for_runtime, load_transform, prepare_for_inference, resolve_quant
from .tokenizer import ChatGLMTokenizer


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device, num_params: int) -> torch.dtype:
    """GPUs: bf16 where supported, else fp16. CPU: fp32 for small models, bf16 from 1 B parameters on
    (fp32 would need 31 GB for VisualGLM-6B); MPS: fp16."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if num_params >= 1_000_000_000 else torch.float32


DEMO_MODEL = Path(__file__).resolve().parent / "assets" / "visualglm-demo"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def chain_transforms(*transforms: Transform | None) -> Transform | None:
    """Run load transforms in order (e.g. quantize, then TP slice); each piece of one feeds the next."""
    steps = [t for t in transforms if t is not None]
    if len(steps) <= 1:
        return steps[0] if steps else None

    def run(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        pieces = {name: tensor}
        for step in steps:
            pieces = {k: v for n, t in pieces.items() for k, v in step(n, t).items()}
        return pieces
    return run


def build_model(src: CheckpointSource, *, device: torch.device, dtype: torch.dtype,
                qkv_layout: str = "auto", trust_pickle: bool = False,
                tp: TensorParallel | None = None, transform: Transform | None = None) -> VisualGLM:
    """Build on ``meta`` and fill tensor by tensor: peak memory stays near the weights' own size.

    With ``tp`` the meta model is first cut to this rank's shapes and every tensor is sliced as it streams
    in, so a rank holds only its part of the split weights.
    """
    with torch.device("meta"):
        model = VisualGLM(src.config)
    tp_slice = tp.shard(model) if tp is not None else None  # shapes first: quantized skeletons follow them
    transforms = []
    if src.config.quant.enabled:  # quantized skeleton first; float weights are quantized as they stream in
        convert_for_runtime(model)
        transforms.append(load_transform(src.config))
    # TP slices after quantizing: whole rows get the same scales as in one process (and as a checkpoint
    # saved quantized, which can only be sliced), so every rank holds exactly its part of that model.
    transforms.append(tp_slice)
    transforms.append(transform)  # e.g. QLoRA's NF4 quantization, after any TP slicing
    load_into(model, src, device=device, dtype=dtype, qkv_layout=qkv_layout, trust_pickle=trust_pickle,
              transform=chain_transforms(*transforms))
    model.glm.rotary.inv_freq = model.glm.rotary.inv_freq_init(device)
    prepare_for_inference(model)  # quantized layers: repack for this device's kernels
    if tp is not None:
        tp.connect(model)  # after any module swap: the all-reduces hook onto the final modules
    return model.eval()


def load(path: str | Path | None = None, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, tokenizer: str | Path | None = None, *, qkv_layout: str = "auto", trust_pickle: bool = False,
         tp: bool | None = None, quantize: int | QuantConfig | None = None,
         quantize_extras: Sequence[str] = (), adapter: str | Path | None = None, compile: bool | str = False
         ) -> tuple[VisualGLM, ChatGLMTokenizer]:
    """Load a VisualGLM checkpoint folder (ours, sat or HF) and its tokenizer; no ``path`` (and no adapter)
    loads the small demo model shipped in the package (``visualglm-demo``).

    ``tokenizer`` names a folder with ``ice_text.model`` (+ ``tokenizer_config.json``); HF and converted
    folders carry their own, a sat folder does not. ``qkv_layout`` (sat only): "auto", "contiguous" (sat
    after July 2023) or "interleaved" (before). ``trust_pickle`` allows pickles that hold more than tensors.
    ``tp``: tensor parallelism over the processes of a torchrun job (each loads only its slice; see
    docs/distributed.md); None = when ``WORLD_SIZE`` > 1, False = a full copy per process (e.g. for DDP).
    ``quantize``: 8 or 4 = weight-only INT8/INT4 GLM block linears, quantized tensor by tensor while loading
    (or a full ``QuantConfig``); ``quantize_extras``: also "lm_head", "embeddings", "vision" (at INT8). A
    checkpoint saved quantized (``visualglm convert --quantize``) loads as stored without these.
    ``adapter``: a LoRA or P-tuning adapter folder (``visualglm finetune`` output, or PEFT's) used on top of
    the base without merging; ``path`` may then be None to use the base the adapter recorded.
    ``compile``: generation runs the decode step through ``torch.compile`` (the first steps of each batch size
    pay for compiling; needs a C++ compiler on CPU, Triton on CUDA). On CUDA the step is also replayed as CUDA
    graphs; ``compile="graphs"`` captures the eager step as CUDA graphs without compiling.
    """
    if path is None and adapter is not None:
        from .peft.adapters import AdapterError, base_model_path
        path = base_model_path(adapter)
        if path is None:
            raise AdapterError(f"{adapter} records no base model: pass the base checkpoint folder as well")
    if path is None:
        path = DEMO_MODEL  # the small demo model shipped inside the package (see docs/visualglm-demo.md)
        if not (DEMO_MODEL / "config.json").is_file():
            raise FileNotFoundError(f"no model given and the demo model is not in this installation ({DEMO_MODEL}); "
                                    "pass a checkpoint folder (--model DIR), or build the demo with "
                                    "`python -m visualglm.demo.train`")
    src = inspect(path, trust_pickle=trust_pickle)
    tok_dir = Path(tokenizer).expanduser() if tokenizer is not None else src.tokenizer_dir
    if tok_dir is None:
        raise CheckpointError(f"{src.path} ({src.format} layout) carries no tokenizer (ice_text.model); pass "
                              "tokenizer=FOLDER (command line: --tokenizer) naming a folder with ice_text.model "
                              "and tokenizer_config.json, e.g. a THUDM/chatglm-6b download")
    tok = ChatGLMTokenizer.from_dir(tok_dir)
    dev = torch.device(device) if device is not None else default_device()
    parallel, dev = tensor_parallel_setup(tp, dev)
    check_compile(compile, dev)
    if parallel is not None and adapter is not None:
        raise ValueError("adapters are not split for tensor parallelism: merge a LoRA adapter into its base "
                         "first (`visualglm merge-lora`) and load the merged folder; P-tuning runs in one process")
    src.config.quant = resolve_quant(src.config.quant, quantize, quantize_extras)
    with torch.device("meta"):
        num_params = sum(p.numel() for p in VisualGLM(src.config).parameters())
    dt = parse_dtype(dtype) or default_dtype(dev, num_params)
    model = build_model(src, device=dev, dtype=dt, qkv_layout=qkv_layout, trust_pickle=trust_pickle,
                        tp=parallel)
    if adapter is not None:
        from .peft.adapters import attach_adapter
        attach_adapter(model, adapter)
    model.compile_decode = compile  # read by every engine made for this model (generation.chat.make_engine)
    return model, tok
