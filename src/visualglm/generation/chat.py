"""Chat over the engine: ``chat`` (blocking), ``stream_chat`` (yields as text grows), ``batch_chat``.

All three build prompts with :mod:`visualglm.prompt`, run :class:`Engine` and decode answers the way the
original ``chat()`` does, so their outputs agree with each other and with the reference.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..image import image_to_tensor
from ..prompt import History, build_prompt, extract_answer
from .engine import Engine, ImageEmbeddingCache, Request
from .sampling import SamplingParams

ENGLISH_BANNED_DEFAULT = ((63823, 130000),)  # the original cli_demo --english: no Chinese ids


def sampling_params(tokenizer: Any, *, english: bool = False, max_length: int = 2048, top_p: float = 0.4,
                    top_k: int = 100, temperature: float = 0.8, repetition_penalty: float = 1.2,
                    do_sample: bool = True, seed: int | None = None, max_new_tokens: int | None = None,
                    stop: Sequence[str] = (), banned: Sequence[tuple[int, int]] | None = None) -> SamplingParams:
    if banned is None:
        banned = english_banned_ranges(tokenizer) if english else ()
    # The model's vocabulary is padded past the tokenizer's (130528 > 130344); such ids have no text and
    # would make decoding fail, so they are never sampled.
    banned = (*banned, (tokenizer.vocab_size, 1 << 31))
    return SamplingParams(max_length=max_length, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, do_sample=do_sample,
                          banned=tuple(banned), seed=seed, stop=tuple(stop))


def english_banned_ranges(tokenizer: Any) -> tuple[tuple[int, int], ...]:
    """The original bans ids 63823..129999 in English mode; tokenizers may name their own ranges."""
    ranges = tokenizer.config.get("english_banned_ranges")
    if ranges is not None:
        return tuple((int(lo), int(hi)) for lo, hi in ranges)
    return ENGLISH_BANNED_DEFAULT if tokenizer.vocab_size > ENGLISH_BANNED_DEFAULT[0][1] else ()


_POOL_LOCK = threading.Lock()


def make_engine(model: Any, tokenizer: Any, max_batch_size: int = 1,
                image_cache: ImageEmbeddingCache | None = None) -> Engine:
    """A new engine; all engines of one model share its image-embedding cache."""
    with _POOL_LOCK:
        if image_cache is None:
            image_cache = model.__dict__.setdefault("_image_cache", ImageEmbeddingCache())
    return Engine(model, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                  mask_token_ids=(tokenizer.mask_token_id, tokenizer.gmask_token_id),
                  max_batch_size=max_batch_size, image_cache=image_cache,
                  compile=getattr(model, "compile_decode", False))


@contextmanager
def borrow_engine(model: Any, tokenizer: Any, max_batch_size: int = 1) -> Iterator[Engine]:
    """An idle engine of this model (its KV cache is reused across calls), or a new one; safe to use from
    several threads at once (e.g. a web UI serving several users): each call gets its own engine."""
    with _POOL_LOCK:
        pool: list[Engine] = model.__dict__.setdefault("_engine_pool", [])
        engine = next((e for e in pool if e.max_batch_size >= max_batch_size), None)
        if engine is not None:
            pool.remove(engine)
    if engine is None:
        engine = make_engine(model, tokenizer, max_batch_size)
    try:
        yield engine
    finally:
        for slot in list(engine.slots):
            engine.finish(slot)
        with _POOL_LOCK:
            pool.append(engine)
            del pool[:-2]  # keep a couple of idle caches, not one per past caller


def make_request(model: Any, tokenizer: Any, image: Any, query: str, history: History | None,
                 params: SamplingParams, english: bool, **image_kwargs: Any) -> Request:
    pixels = None if image is None else image_to_tensor(image, size=model.config.vision.image_size,
                                                        **image_kwargs)
    prompt = build_prompt(tokenizer, query, history or (), english=english, image=pixels is not None,
                          image_length=model.config.image_length)
    return Request(prompt.input_ids, params, image=pixels, pre_image=prompt.pre_image)


def stream_chat(model: Any, tokenizer: Any, image: Any, query: str, history: History | None = None, *,
                english: bool = False, image_kwargs: dict | None = None, **sampling: Any
                ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Yield (response so far, history including it) each time the visible text grows."""
    history = list(history or [])
    params = sampling_params(tokenizer, english=english, **sampling)
    request = make_request(model, tokenizer, image, query, history, params, english, **(image_kwargs or {}))
    shown = ""
    with borrow_engine(model, tokenizer) as engine:
        for answer, done in _run(engine, tokenizer, [request], english):
            text = answer[0]
            if text != shown or done:
                shown = text
                yield text, history + [(query, text)]


def chat(model: Any, tokenizer: Any, image: Any, query: str, history: History | None = None,
         **kwargs: Any) -> tuple[str, list[tuple[str, str]]]:
    last = ("", list(history or []) + [(query, "")])
    for last in stream_chat(model, tokenizer, image, query, history, **kwargs):  # noqa: B007
        pass
    return last


def batch_chat(model: Any, tokenizer: Any, items: Sequence[tuple], *, english: bool = False,
               image_kwargs: dict | None = None, **sampling: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    """Answer several (image, query[, history]) items in one batch (left-padded prefill, shared decode)."""
    params = sampling_params(tokenizer, english=english, **sampling)
    requests, histories = [], []
    for item in items:
        image, query, history = (*item, None)[:3] if len(item) == 2 else item
        histories.append((query, list(history or [])))
        requests.append(make_request(model, tokenizer, image, query, history, params, english,
                                     **(image_kwargs or {})))
    final: list[str] = [""] * len(requests)
    with borrow_engine(model, tokenizer, max_batch_size=max(len(requests), 1)) as engine:
        for final, _ in _run(engine, tokenizer, requests, english):  # noqa: B007
            pass
    return [(text, hist + [(q, text)]) for text, (q, hist) in zip(final, histories, strict=True)]


def _run(engine: Engine, tokenizer: Any, requests: list[Request], english: bool
         ) -> Iterator[tuple[list[str], bool]]:
    """Drive the engine to completion; yields (answers so far, all done) after every step."""
    slots = sorted(engine.add(requests))
    ids: dict[int, list[int]] = {s: [] for s in slots}
    texts = [""] * len(requests)
    stopped = [False] * len(requests)
    try:
        new = {s: engine.slots[s].generated[-1] for s in slots}
        while True:
            for i, s in enumerate(slots):
                if s in new and not stopped[i]:
                    ids[s].append(new[s])
                    text = extract_answer(tokenizer, requests[i].input_ids, ids[s], english)
                    cut = _stop_at(text, requests[i].params.stop)
                    if cut is not None:
                        text, stopped[i] = cut, True
                        engine.finish(s)
                    if not text.endswith("\ufffd"):  # hold back an incomplete multi-byte character
                        texts[i] = text
                    if s in engine.slots and engine.slots[s].done:
                        stopped[i] = True
                        texts[i] = text
                        engine.finish(s)
            done = all(stopped)
            yield list(texts), done
            if done:
                return
            new = engine.step()
    finally:
        for s in slots:
            engine.finish(s)


def _stop_at(text: str, stops: Sequence[str]) -> str | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None

