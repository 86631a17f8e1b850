"""How close decoding gets to the hardware's limit: ``visualglm bench``.

Decoding one token at batch 1 reads every weight on the decode path once (GLM blocks, final LayerNorm,
lm_head), so tokens/s can never exceed ``bandwidth / bytes read per token``. One run measures that bandwidth
(a large tensor copy, before loading and again after decoding; the larger counts), image encoding, prefill,
decode tokens/s at batch 1 and larger batches through the real :class:`Engine`, and peak memory, and reports
``roofline_ratio = bytes per token x tokens/s / bandwidth``.

Models: a named config with random weights (built one module at a time, each quantized before the next is
allocated, so an INT4 6B never exists in bf16), optionally cut to ``layers`` GLM blocks, or a checkpoint.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .config import NAMED_CONFIGS, VisualGLMConfig
from .generation.engine import Engine, Request, cpu_kernels
from .generation.sampling import SamplingParams
from .kernels.cpu import worth_routing
from .model.visualglm import VisualGLM
from .quant.handlers import module_bits, prepare_for_inference, replace_module, resolve_quant
from .quant.modules import QuantizedEmbedding, QuantizedLinear

GB = 1e9


@dataclass(frozen=True)
class SpecialIds:
    """The ids a synthetic prompt needs; ordinary ids are drawn from [0, ``vocab``) minus these."""

    mask: int
    gmask: int
    bos: int
    eos: int
    pad: int
    vocab: int

    @classmethod
    def for_model(cls, model: VisualGLM, tokenizer: Any = None) -> SpecialIds:
        """The tokenizer's ids; else ChatGLM-6B's (the 130528-id vocabulary); else the top ids of a small one."""
        v = model.config.glm.vocab_size
        if tokenizer is not None:
            t = tokenizer
            return cls(t.mask_token_id, t.gmask_token_id, t.bos_token_id, t.eos_token_id, t.pad_token_id,
                       min(v, t.vocab_size))
        if v >= 130528:
            return cls(130000, 130001, 130004, 130005, 3, 130000)
        return cls(v - 4, v - 3, v - 2, v - 1, v - 5, v - 5)

    def ordinary(self, n: int, g: torch.Generator) -> list[int]:
        specials = {self.mask, self.gmask, self.bos, self.eos, self.pad}
        ids = torch.randint(0, self.vocab, (4 * n + 16,), generator=g).tolist()
        return [i for i in ids if i not in specials][:n]


@dataclass
class BenchOptions:
    """What to measure. ``model``: a named config (random weights) or a checkpoint folder."""

    model: str = "visualglm-6b"
    layers: int | None = None  # cut the GLM to this many blocks (named configs)
    dtype: str | None = None  # default: as visualglm.load picks (bf16 for big models on CPU)
    quant: int | None = None  # 8 or 4: GLM block linears
    quant_extras: tuple[str, ...] = ()  # "lm_head", "embeddings", "vision" (INT8)
    device: str | None = None
    tokenizer: str | None = None  # checkpoints without one (sat)
    prompt_len: int = 64  # batch-1 prompt, 32 image placeholders included when there is an image
    batch_prompt_len: int = 16  # prompts of the larger batches (text only)
    max_new_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    image: bool = True
    tied: bool = True  # random weights: one matrix for embeddings and lm_head, as the released files load
    compile: bool | str = False  # True: torch.compile (+ CUDA graphs on CUDA); "graphs": CUDA graphs only
    threads: int | None = None  # CPU threads (default: torch's, one per core)
    seed: int = 0
    bandwidth_bytes: int = 256 * 1024**2
    extra: dict[str, Any] = field(default_factory=dict)


# ----- the measurements ---------------------------------------------------------------------------
def measure_bandwidth(device: torch.device, nbytes: int, repeats: int = 7) -> float:
    """Copy bandwidth in GB/s (bytes read + bytes written, best of ``repeats``), like STREAM's copy."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / best / GB


def decode_bytes_per_token(model: VisualGLM) -> int:
    """Bytes of weights read to decode one token: every GLM tensor but the embedding table (one row is
    read), plus the lm_head (the embedding itself when tied). Kernel tables of INT4 layers count too."""
    seen: set[int] = set()
    total = 0
    for name, mod in model.glm.named_modules():
        if name in ("word_embeddings", "rotary"):  # one row read; the rotary table is no weight
            continue
        for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def peak_rss_gb() -> float:
    """The process's high-water resident set (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def current_rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / GB
    except OSError:
        return float("nan")


# ----- models -------------------------------------------------------------------------------------------
@torch.no_grad()
def random_model_streamed(config: VisualGLMConfig, *, dtype: torch.dtype, device: torch.device,
                          seed: int = 0) -> VisualGLM:
    """Random weights allocated one module at a time, each quantized as ``config.quant`` says before the next
    one exists. Same distributions as ``random_model``."""
    from .model.init import init_parameter, residual_scale

    with torch.device("meta"):
        model = VisualGLM(config)
    g = torch.Generator(device=device).manual_seed(seed)  # drawn where the weights live
    tied = config.glm.tie_word_embeddings
    # Names only (holding the modules would keep every float weight alive). Order: the two 130k-row tables
    # while little else exists (their float32 init temporaries are the largest), then the GLM, then the
    # vision side, whose small modules keep the transient at the end (when the total peaks) small.
    first = ("glm.word_embeddings", "glm.lm_head")
    names = sorted((n for n, _ in model.named_modules()),
                   key=lambda n: 0 if n in first else 1 if n.startswith("glm") else 2)
    for name in names:
        if tied and name == "glm.lm_head":
            continue  # the embedding's matrix
        mod = model.get_submodule(name)
        for pname, p in list(mod.named_parameters(recurse=False)):
            full = f"{name}.{pname}" if name else pname
            t = torch.empty(p.shape, dtype=dtype, device=device)
            init_parameter(full, t, g)
            t.mul_(residual_scale(full, config.glm.num_layers))
            setattr(mod, pname, nn.Parameter(t, requires_grad=False))
        kind = "embedding" if type(mod) is nn.Embedding else "linear" if type(mod) is nn.Linear else None
        bits = module_bits(name, kind, config) if kind else 0
        if bits:
            swap = QuantizedEmbedding.from_embedding if kind == "embedding" else QuantizedLinear.from_linear
            replace_module(model, name, swap(mod, bits))
        del mod
    if tied and not isinstance(model.glm.word_embeddings, QuantizedEmbedding):
        model.glm.lm_head.weight = model.glm.word_embeddings.weight
    model.glm.rotary.inv_freq = model.glm.rotary.inv_freq_init(device)
    return prepare_for_inference(model).eval()


def build(opts: BenchOptions) -> tuple[VisualGLM, str, Any]:
    """(model, "random" or "checkpoint", tokenizer or None) for ``opts.model``."""
    from .api import default_device, default_dtype, load, parse_dtype

    device = torch.device(opts.device) if opts.device else default_device()
    if opts.model in NAMED_CONFIGS:
        config = VisualGLMConfig.from_name(opts.model)
        if opts.layers is not None:
            if opts.layers < 1:
                raise ValueError(f"--layers must be >= 1, got {opts.layers}")
            config.glm.num_layers = opts.layers
        config.glm.tie_word_embeddings = opts.tied
        config.quant = resolve_quant(config.quant, opts.quant, opts.quant_extras)
        with torch.device("meta"):
            n = sum(p.numel() for p in VisualGLM(config).parameters())
        dtype = parse_dtype(opts.dtype) or default_dtype(device, n)
        return random_model_streamed(config, dtype=dtype, device=device, seed=opts.seed), "random", None
    if opts.layers is not None:
        raise ValueError("--layers applies to named configs (random weights), not to checkpoints")
    model, tok = load(opts.model, device=device, dtype=opts.dtype, tokenizer=opts.tokenizer, quantize=opts.quant,
                      quantize_extras=opts.quant_extras)
    return model, "checkpoint", tok


# ----- prompts and decoding -----------------------------------------------------------------------------
def synthetic_prompt(length: int, g: torch.Generator, ids: SpecialIds, image_length: int, with_image: bool
                     ) -> tuple[list[int], int]:
    """(ids, pre_image): random ordinary ids, 32 placeholders after 3 ids when there is an image, then
    ``[gMASK] <sop>``, as ``build_prompt`` lays a prompt out."""
    body = length - 2
    if body < (3 + image_length if with_image else 1):
        raise ValueError(f"prompt length {length} is too short (image prompts need {image_length + 5})")
    prompt = ids.ordinary(body, g)
    if with_image:
        prompt[3: 3 + image_length] = [ids.pad] * image_length
    return prompt + [ids.gmask, ids.bos], 3 if with_image else 0


def _params(prompt_len: int, new: int, ids: SpecialIds) -> SamplingParams:
    # greedy, no penalty; <eop> banned so every run decodes exactly ``new`` tokens
    return SamplingParams(max_length=prompt_len + new, max_new_tokens=new, do_sample=False,
                          repetition_penalty=1.0, banned=((ids.eos, ids.eos + 1),))


def run_decode(model: VisualGLM, requests: list[Request], ids: SpecialIds, opts: BenchOptions) -> dict[str, Any]:
    """Prefill ``requests`` together, then decode until done; times every step."""
    device = model.device
    engine = Engine(model, eos_token_id=ids.eos, bos_token_id=ids.bos, mask_token_ids=(ids.mask, ids.gmask),
                    max_batch_size=len(requests), compile=opts.compile)
    longest = max(len(r.input_ids) + (r.params.max_new_tokens or 0) for r in requests)
    engine.cache = model.new_cache(len(requests), longest)  # exactly what the run needs (no 256-chunk slack)
    _sync(device)
    t = time.perf_counter()
    engine.add(requests)
    _sync(device)
    prefill = time.perf_counter() - t
    steps = []
    while any(not s.done for s in engine.slots.values()):
        t = time.perf_counter()
        engine.step()
        _sync(device)
        steps.append(time.perf_counter() - t)
    warmup = min(2 if opts.compile else 1, max(len(steps) - 1, 0))
    timed = steps[warmup:]
    b = len(requests)
    tps = b * len(timed) / sum(timed) if timed and sum(timed) > 0 else float("nan")
    del engine
    return {"batch": b, "prompt_tokens": len(requests[0].input_ids), "prefill_s": prefill,
            "prefill_tokens_per_s": b * len(requests[0].input_ids) / prefill, "decode_steps": len(steps),
            "timed_steps": len(timed), "step_ms": 1e3 * sum(timed) / max(len(timed), 1),
            "step_ms_median": 1e3 * statistics.median(timed) if timed else float("nan"),
            "step_ms_min": 1e3 * min(timed) if timed else float("nan"), "tokens_per_s": tps}


# ----- the whole run ---------------------------------------------------------------------------------------
def run(opts: BenchOptions) -> dict[str, Any]:
    if opts.max_new_tokens < 2:
        raise ValueError(f"--max-new-tokens must be >= 2 (one token comes from the prefill), got {opts.max_new_tokens}")
    if not opts.batch_sizes or min(opts.batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be positive integers, got {opts.batch_sizes}")
    from .api import default_device

    device = torch.device(opts.device) if opts.device else default_device()
    if opts.threads is not None:
        if opts.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {opts.threads}")
        torch.set_num_threads(opts.threads)
    bw_before = measure_bandwidth(device, opts.bandwidth_bytes)
    t = time.perf_counter()
    model, kind, tokenizer = build(opts)
    special = SpecialIds.for_model(model, tokenizer)
    load_s = time.perf_counter() - t
    gc.collect()
    result: dict[str, Any] = _describe(model, opts, kind, device)
    result["load_s"] = load_s
    result["rss_after_load_gb"] = current_rss_gb()
    g = torch.Generator().manual_seed(opts.seed + 1)
    with_image = opts.image

    embeds = None
    if with_image:
        pixels = torch.randn(1, 3, model.config.vision.image_size, model.config.vision.image_size, generator=g)
        v = model.config.vision
        rows = pixels.shape[0] * ((v.image_size // v.patch_size) ** 2 + 1)  # patches + CLS: as the engine's prefill
        with torch.inference_mode(), cpu_kernels(device, model.dtype, rows, route_linears=worth_routing(model)):
            _sync(device)
            t = time.perf_counter()
            embeds = model.encode_image(pixels)[0]
            _sync(device)
            result["image_encode_s"] = time.perf_counter() - t

    decode: dict[str, Any] = {}
    ordered = sorted(set(opts.batch_sizes), key=lambda b: (b != 1, b))  # batch 1 first: its peak is the model's
    for b in ordered:
        requests = []
        for _ in range(b):
            if b == 1:
                ids, pre = synthetic_prompt(opts.prompt_len, g, special, model.config.image_length, with_image)
                requests.append(Request(ids, _params(len(ids), opts.max_new_tokens, special), pre_image=pre,
                                        image_embeds=embeds))
            else:
                ids, _ = synthetic_prompt(opts.batch_prompt_len, g, special, model.config.image_length, False)
                requests.append(Request(ids, _params(len(ids), opts.max_new_tokens, special)))
        decode[str(b)] = run_decode(model, requests, special, opts)
        gc.collect()
        if b == 1:
            result["peak_rss_gb"] = peak_rss_gb()
            if device.type == "cuda":
                result["peak_cuda_gb"] = torch.cuda.max_memory_allocated(device) / GB
    result["peak_rss_gb_all_batches"] = peak_rss_gb()
    if device.type == "cuda":
        result["peak_cuda_gb_all_batches"] = torch.cuda.max_memory_allocated(device) / GB
    bw_after = measure_bandwidth(device, opts.bandwidth_bytes)
    result.update(_roofline(model, decode, bw_before, bw_after))
    result["decode"] = decode
    return result


def _roofline(model: VisualGLM, decode: dict[str, Any], bw_before: float, bw_after: float) -> dict[str, Any]:
    bandwidth = max(bw_before, bw_after)
    per_token = decode_bytes_per_token(model)
    one = decode.get("1")
    out: dict[str, Any] = {"bandwidth_gbs": bandwidth, "bandwidth_samples_gbs": [bw_before, bw_after],
                           "weight_bytes_per_token": per_token,
                           "roofline_tokens_per_s": bandwidth * GB / per_token}
    if one is not None:
        out["prefill_s"] = one["prefill_s"]
        out["prefill_tokens"] = one["prompt_tokens"]
        out["decode_tokens_per_s"] = one["tokens_per_s"]
        out["achieved_gbs"] = one["tokens_per_s"] * per_token / GB
        out["roofline_ratio"] = out["achieved_gbs"] / bandwidth
    else:
        out["roofline_ratio"] = None
    return out


def _describe(model: VisualGLM, opts: BenchOptions, kind: str, device: torch.device) -> dict[str, Any]:
    c = model.config
    weights = {id(t): t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())}
    glm_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("glm."))
    return {
        "model": opts.model, "weights": kind, "device": str(device), "dtype": str(model.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "compile": opts.compile,
        "quant": asdict(c.quant) if c.quant.enabled else None,
        "glm_layers": c.glm.num_layers, "hidden_size": c.glm.hidden_size,
        "tied_lm_head": c.glm.tie_word_embeddings, "glm_float_params": glm_params,
        "weights_gb": sum(weights.values()) / GB, "max_new_tokens": opts.max_new_tokens,
        "prompt_len": opts.prompt_len, "batch_prompt_len": opts.batch_prompt_len, "image": opts.image,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
