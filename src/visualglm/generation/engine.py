"""The one generation loop: slots in a KV cache, a batched prefill, then one decode step for all slots.

``Engine.add`` prefills any number of requests together (left-padded to a common length), each into its own
cache slot; ``Engine.step`` decodes one token for every running slot, whatever its length, and returns what
each produced. Blocking, streaming and batched generation (``generation.chat``) and the server's continuous
batching are thin drivers over these two calls.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..image import image_hash
from ..kernels import cpu as kernels
from ..model.kv_cache import KVCache
from ..model.visualglm import VisualGLM
from .cuda_graphs import DecodeGraphs
from .sampling import RowSampler, SamplingParams, sample_rows


def prompt_positions(ids: list[int], bos_id: int, mask_ids: tuple[int, ...]) -> tuple[list[int], list[int], int]:
    """GLM 2-D positions of a prompt: (positions, block positions, position of generated tokens).

    Positions count 0.. up to ``<sop>``, which takes the index of the ``[gMASK]``/``[MASK]`` token (as does
    every generated token); block positions are 0 over the context and 1, 2, ... from ``<sop>`` on.
    """
    context = ids.index(bos_id)
    mask_pos = next((ids.index(m) for m in mask_ids if m in ids[:context]), context - 1)
    positions = list(range(context)) + [mask_pos] * (len(ids) - context)
    blocks = [0] * context + list(range(1, len(ids) - context + 1))
    return positions, blocks, mask_pos


# Attention kernels for generation: every one but cuDNN's, which builds a new plan for every new key length,
# i.e. every decode step (measured on an H100: 17 ms of host time per layer call, 12 tok/s for the 6B model).
GENERATION_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextmanager
def cpu_kernels(device: torch.device, dtype: torch.dtype, rows: int, compiled: bool = False,
                route_linears: bool = True) -> Iterator[None]:
    """An inference step of ``rows`` rows (batch x tokens) on CPU: pick the kernels that keep up.

    ``visualglm.kernels.cpu`` serves float Linears (``route_linears``: the model has some large enough) where
    it is enabled: matrix-vector kernels for a few rows
    (decoding; not under ``torch.compile``), float32 GEMMs for many rows of bf16/fp16 on processors without
    native half math. For one row of bf16/fp16 that torch still computes, oneDNN is left out: for a
    matrix-vector product it reads the weights at about half the speed of the MKL path it falls back to
    (measured ~20 vs ~33 GB/s for 16384x4096 bf16 on AVX-512); for many rows oneDNN is far faster. The oneDNN
    flag is process-wide: a concurrent prefill in another thread is slower meanwhile, never wrong.
    """
    if device.type != "cpu":
        yield
        return
    with ExitStack() as stack:
        if route_linears:
            stack.enter_context(kernels.inference_linears(matvec=not compiled))
        if rows == 1 and dtype in (torch.bfloat16, torch.float16):
            before = torch.backends.mkldnn.enabled
            torch.backends.mkldnn.enabled = False
            stack.callback(setattr, torch.backends.mkldnn, "enabled", before)
        yield


def check_compile(compile: bool | str, device: torch.device) -> None:
    if compile not in (False, True, "graphs"):
        raise ValueError(f"compile must be True, False or 'graphs', got {compile!r}")
    if compile == "graphs" and device.type != "cuda":
        raise ValueError(f"compile='graphs' (CUDA graphs) needs a model on a CUDA device, not {device.type}")


class ImageEmbeddingCache:
    """LRU of image embeddings keyed by the pixels' hash: a follow-up turn about the same image skips the
    vision tower (a ViT-g forward). Thread-safe, so several engines of one model can share it."""

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get_or_compute(self, pixels: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = image_hash(pixels)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = compute()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


class PromptTooLongError(ValueError):
    """The prompt alone does not fit into ``max_length`` (or the model's context)."""


@dataclass
class Request:
    """A tokenised prompt (from ``visualglm.prompt.build_prompt``) plus its image and sampling knobs."""

    input_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    image: torch.Tensor | None = None  # (1, 3, 224, 224) preprocessed pixels
    pre_image: int = 0  # index of the first placeholder id
    image_embeds: torch.Tensor | None = None  # (32, C): skip the vision tower


@dataclass
class _Slot:
    request: Request
    sampler: RowSampler
    start: int  # first non-pad cache index
    length: int  # next cache index to write
    context: int  # absolute index of <sop>
    mask_position: int  # 2-D position of every generated token
    generated: list[int] = field(default_factory=list)
    done: bool = False


class Engine:
    def __init__(self, model: VisualGLM, *, eos_token_id: int, mask_token_ids: tuple[int, ...],
                 bos_token_id: int, max_batch_size: int = 1, image_cache: ImageEmbeddingCache | None = None,
                 compile: bool | str = False) -> None:
        self.model = model
        self.eos = eos_token_id
        self.bos = bos_token_id
        self.mask_ids = mask_token_ids
        self.max_batch_size = max_batch_size
        self.cache: KVCache | None = None
        self.slots: dict[int, _Slot] = {}
        self.image_cache = image_cache if image_cache is not None else ImageEmbeddingCache()
        # Sees the raw logits (B, V) each sampled token came from: for tests, debugging, logit comparisons.
        self.logits_observer: Callable[[list[int], torch.Tensor], None] | None = None
        # ``compile``: the decode step (not the prefill, whose shapes vary) through torch.compile; the key
        # length is a symbolic size, so one graph serves every step of a given batch size. On CUDA the
        # compiled step is also captured as CUDA graphs (one launch per token instead of hundreds);
        # "graphs" captures the eager step instead (no compiler, starts in seconds).
        check_compile(compile, model.device)
        self._decode = torch.compile(model, dynamic=True) if compile is True else model
        self._graphs = DecodeGraphs(self._decode) if compile and model.device.type == "cuda" else None
        self._route_linears = model.device.type == "cpu" and kernels.worth_routing(model)

    # ----- admission ----------------------------------------------------------------------------
    def free_slots(self) -> list[int]:
        return [s for s in range(self.max_batch_size) if s not in self.slots]

    def validate(self, request: Request) -> None:
        n, p = len(request.input_ids), request.params
        limit = self.model.config.glm.max_sequence_length
        if n >= p.max_length:
            raise PromptTooLongError(f"the prompt is {n} tokens, which leaves no room to answer within "
                                     f"max_length={p.max_length}; shorten the history/query or raise max_length")
        if n >= limit:
            raise PromptTooLongError(f"the prompt is {n} tokens, more than the model's context of {limit}")
        if self.bos not in request.input_ids:
            raise ValueError("the prompt has no <sop> token: build it with visualglm.prompt.build_prompt")
        if request.image is not None or request.image_embeds is not None:
            length = self.model.config.image_length
            if request.pre_image + length > request.input_ids.index(self.bos):
                raise ValueError(f"pre_image={request.pre_image} leaves no room for {length} image tokens")

    @torch.inference_mode()
    @sdpa_kernel(GENERATION_ATTENTION)
    def add(self, requests: list[Request]) -> dict[int, int]:
        """Prefill ``requests`` into free slots; returns {slot: first generated id}."""
        if not requests:
            return {}
        free = self.free_slots()
        if len(requests) > len(free):
            raise RuntimeError(f"{len(requests)} requests but only {len(free)} free slots")
        for r in requests:
            self.validate(r)
        slots = free[: len(requests)]
        width = max(len(r.input_ids) for r in requests)
        self._ensure_cache(width)
        with cpu_kernels(self.model.device, self.model.dtype, len(requests) * width,
                         route_linears=self._route_linears):
            return self._prefill(requests, slots, width)

    def _prefill(self, requests: list[Request], slots: list[int], width: int) -> dict[int, int]:
        dev = self.model.device
        ids = torch.full((len(requests), width), 0, dtype=torch.long)
        pos = torch.zeros((len(requests), 2, width), dtype=torch.long)
        starts, contexts, offsets, embeds = [], [], [], []
        for row, (slot, r) in enumerate(zip(slots, requests, strict=True)):
            n = len(r.input_ids)
            start = width - n
            ids[row, start:] = torch.tensor(r.input_ids)
            context_rel = r.input_ids.index(self.bos)
            p0, p1, mask_pos = prompt_positions(r.input_ids, self.bos, self.mask_ids)
            pos[row, 0, start:] = torch.tensor(p0)
            pos[row, 1, start:] = torch.tensor(p1)
            starts.append(start)
            contexts.append(start + context_rel)
            emb = self._image_embeds(r)
            if emb is not None:
                offsets.append((row, start + r.pre_image))
                embeds.append(emb)
            self.slots[slot] = _Slot(r, RowSampler(r.params, self.model.config.glm.vocab_size, dev),
                                     start=start, length=width, context=start + context_rel,
                                     mask_position=mask_pos, generated=[])
        logits = self.model(
            ids.to(dev), pos.to(dev), context_lengths=torch.tensor(contexts, device=dev),
            starts=torch.tensor(starts, device=dev),
            image_embeds=torch.stack(embeds) if embeds else None,
            image_offsets=torch.tensor(offsets, device=dev) if offsets else None,
            cache=self.cache, cache_pos=torch.arange(width, device=dev).expand(len(requests), width),
            slots=self._slot_index(slots), kv_len=width, logits="last",
        )[:, -1]
        return self._accept(slots, logits)

    # ----- decoding -------------------------------------------------------------------------------
    @torch.inference_mode()
    @sdpa_kernel(GENERATION_ATTENTION)
    def step(self) -> dict[int, int]:
        """One token for every running slot; returns {slot: id}. Finished slots are released."""
        running = sorted(s for s, st in self.slots.items() if not st.done)
        if not running:
            return {}
        dev = self.model.device
        states = [self.slots[s] for s in running]
        last = torch.tensor([[st.generated[-1]] for st in states], device=dev)  # (B, 1)
        block = [st.length - st.context + 1 for st in states]
        pos = torch.tensor([[[st.mask_position], [b]] for st, b in zip(states, block, strict=True)],
                           device=dev)  # (B, 2, 1)
        where = torch.tensor([[st.length] for st in states], device=dev)  # (B, 1)
        kv_len = max(st.length for st in states) + 1
        self._ensure_cache(kv_len)
        inputs = {"input_ids": last, "position_ids": pos,
                  "context_lengths": torch.tensor([st.context for st in states], device=dev),
                  "starts": torch.tensor([st.start for st in states], device=dev), "cache_pos": where,
                  "slots": self._slot_index(running)}
        with cpu_kernels(dev, self.model.dtype, len(states), compiled=self._decode is not self.model,
                         route_linears=self._route_linears):
            if self._graphs is not None:
                logits = self._graphs(self.cache, kv_len, **inputs)[:, -1]
            else:
                logits = self._decode(**inputs, cache=self.cache, kv_len=kv_len, logits="last")[:, -1]
        for st in states:
            st.length += 1
        return self._accept(running, logits)

    def finish(self, slot: int) -> None:
        """Release a slot (finished, aborted or disconnected)."""
        self.slots.pop(slot, None)

    def release_finished(self) -> None:
        for s in [s for s, st in self.slots.items() if st.done]:
            self.finish(s)

    # ----- internals ------------------------------------------------------------------------------
    def _accept(self, slots: list[int], logits: torch.Tensor) -> dict[int, int]:
        if self.logits_observer is not None:
            self.logits_observer(slots, logits)
        states = [self.slots[s] for s in slots]
        ids = sample_rows(logits, [st.sampler for st in states]).tolist()
        out = {}
        for s, st, tok in zip(slots, states, ids, strict=True):
            st.generated.append(tok)
            st.sampler.observe(tok)
            p = st.request.params
            total = len(st.request.input_ids) + len(st.generated)
            if tok == self.eos or total >= p.max_length or (
                    p.max_new_tokens is not None and len(st.generated) >= p.max_new_tokens):
                st.done = True
            out[s] = tok
        return out

    def _slot_index(self, slots: list[int]) -> torch.Tensor | None:
        """None when the slots are exactly 0..B-1, so the cache is read through views (no gather)."""
        if slots == list(range(len(slots))):
            return None
        return torch.tensor(slots, device=self.model.device)

    def _ensure_cache(self, length: int) -> None:
        if self.cache is None:
            self.cache = self.model.new_cache(self.max_batch_size, 0)
        self.cache.reserve(length)

    def _image_embeds(self, r: Request) -> torch.Tensor | None:
        if r.image_embeds is not None:
            return r.image_embeds
        if r.image is None:
            return None
        return self.image_cache.get_or_compute(r.image, lambda: self.model.encode_image(r.image)[0])
