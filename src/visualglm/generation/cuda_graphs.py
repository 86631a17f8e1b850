"""The decode step as replayed CUDA graphs.

A 6B decode step is ~300 small kernels after ``torch.compile`` (over 1,000 in eager mode); launched one by one
from Python they take longer than the GPU needs to read the weights. Captured once into a CUDA graph, a step
is one launch. A graph fixes every shape and address, so:

* the key length is a bucket (a multiple of ``BUCKET`` positions, at most the cache's capacity) instead of
  the exact length: the prefix-LM mask hides the not-yet-written positions, so the result is the same;
* inputs are copied into static tensors the graph reads; the KV cache is written in place at its fixed
  addresses (a cache that grows gets new ones, which drops every graph);
* one graph per (batch size, bucket, slot addressing), recorded the first time it is needed.

``capture=False`` keeps the shapes (buckets) but calls the step directly: the same arithmetic on any device,
which is how the CPU tests check that bucketing does not change a single logit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..model.kv_cache import GROW_CHUNK, KVCache

BUCKET = GROW_CHUNK  # key-length granularity: the cache grows by this much, so a bucket never exceeds it
WARMUP_CALLS = 2  # before capture: compiles, autotunes and allocates outside the graph


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor | None]
    output: torch.Tensor


class DecodeGraphs:
    def __init__(self, step: Callable[..., torch.Tensor], *, capture: bool = True) -> None:
        self.step = step  # model-like: step(input_ids, position_ids, ..., cache=, kv_len=, logits=)
        self.capture = capture
        self._graphs: dict[tuple[int, int, bool], _Graph] = {}
        self._cache_id: tuple[int, int] | None = None
        self._pool: Any = None

    def __len__(self) -> int:
        return len(self._graphs)

    @staticmethod
    def key_length(needed: int, capacity: int) -> int:
        return min(capacity, -(-needed // BUCKET) * BUCKET)

    def __call__(self, cache: KVCache, kv_len: int, **inputs: torch.Tensor | None) -> torch.Tensor:
        """inputs: input_ids, position_ids, context_lengths, starts, cache_pos, slots (tensors or None)."""
        length = self.key_length(kv_len, cache.capacity)
        if not self.capture:
            return self.step(**inputs, cache=cache, kv_len=length, logits="last")
        cache_id = (cache.k[0].data_ptr(), cache.capacity)
        if cache_id != self._cache_id:  # a new or regrown cache: the recorded addresses are stale
            self._graphs.clear()
            self._cache_id = cache_id
        key = (inputs["input_ids"].shape[0], length, inputs["slots"] is None)
        g = self._graphs.get(key)
        if g is None:
            g = self._graphs[key] = self._record(cache, length, inputs)
        else:
            for name, t in inputs.items():
                if t is not None:
                    g.inputs[name].copy_(t, non_blocking=True)
        g.graph.replay()
        return g.output.clone()  # the next replay overwrites the graph's output

    def _record(self, cache: KVCache, length: int, inputs: dict[str, torch.Tensor | None]) -> _Graph:
        static = {k: (v.clone() if v is not None else None) for k, v in inputs.items()}

        def run() -> torch.Tensor:
            return self.step(**static, cache=cache, kv_len=length, logits="last")

        # Warm-up on a side stream (as torch.cuda.graph expects). It computes this very step: the cache
        # writes land where the replay below writes the same values again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_CALLS):
                run()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # graphs share memory: they never run concurrently
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = run()
        return _Graph(graph, static, output)
