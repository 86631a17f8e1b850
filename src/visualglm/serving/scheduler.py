"""Admission decisions for continuous batching, in plain Python (no torch, no model: unit-testable alone).

The server's engine loop asks, between two decode steps, which waiting requests to prefill now. The rules:

* first come, first served: a request is never overtaken by a later one (no starvation of long prompts);
* at most ``max_batch_size`` requests run at once (one KV-cache slot each);
* one admission round prefills at most ``max_prefill_tokens`` *padded* tokens (requests are prefilled
  together, left-padded to the longest, so k requests cost k x longest), which bounds how long running
  requests wait for the next token; a single prompt over the budget still runs, alone;
* aborted requests leave at once: waiting ones are dropped, running ones are reported so the caller frees
  their slot before the next step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_waiting`` allows (the server answers 503)."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 16
    max_prefill_tokens: int = 8192
    max_waiting: int = 1024

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_prefill_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Scheduler:
    """Tracks waiting and running request ids; ``schedule()`` moves some from waiting to running."""

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        self.config = config or SchedulerConfig()
        self.waiting: OrderedDict[Hashable, int] = OrderedDict()  # id -> prompt tokens, in arrival order
        self.running: set[Hashable] = set()

    @property
    def free_slots(self) -> int:
        return self.config.max_batch_size - len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, rid: Hashable, num_tokens: int) -> None:
        if rid in self.waiting or rid in self.running:
            raise ValueError(f"request {rid!r} is already scheduled")
        if num_tokens < 1:
            raise ValueError(f"a request needs at least one prompt token, got {num_tokens}")
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are already waiting "
                                 f"(max_waiting={self.config.max_waiting}); try again later")
        self.waiting[rid] = num_tokens

    def schedule(self) -> list[Hashable]:
        """Admit waiting requests in arrival order into free slots, within the padded prefill budget."""
        admitted: list[Hashable] = []
        longest = 0
        for rid, n in self.waiting.items():
            if len(admitted) >= self.free_slots:
                break
            width = max(longest, n)
            if admitted and width * (len(admitted) + 1) > self.config.max_prefill_tokens:
                break
            admitted.append(rid)
            longest = width
        for rid in admitted:
            del self.waiting[rid]
            self.running.add(rid)
        return admitted

    def finish(self, rid: Hashable) -> None:
        """A running request ended (end of text, length, stop string, abort or error)."""
        self.running.discard(rid)

    def abort(self, rid: Hashable) -> str | None:
        """Drop a request. Returns "waiting" or "running" (the caller must then free its slot), or None."""
        if self.waiting.pop(rid, None) is not None:
            return "waiting"
        if rid in self.running:
            self.running.discard(rid)
            return "running"
        return None
