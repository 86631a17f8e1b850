"""The engine loop: ONE background thread drives :class:`~visualglm.generation.engine.Engine` for all requests.

Each iteration: apply aborts (a disconnected client's slot is freed before the next step), let the
:class:`Scheduler` admit waiting requests (one batched, left-padded prefill), decode one token for every
running slot, and route the new tokens to their requests. Text is decoded exactly as
:func:`visualglm.prompt.extract_answer` does for ``model.chat``, so a greedy answer is the same text whether
it came from the library, from one HTTP request alone, or batched with 31 others. Updates reach the asyncio
side through ``loop.call_soon_threadsafe``; no exception ends the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from ..generation.engine import Engine, Request
from ..prompt import extract_answer
from .scheduler import Scheduler, SchedulerConfig

log = logging.getLogger("visualglm.serving")

# process_response() turns these into full-width forms when a CJK character follows, so a streamed answer
# holds a trailing one back until the next token shows what comes after it.
_MAY_CHANGE = frozenset(",!:;?")


@dataclass
class Update:
    """What the loop tells a request: a text delta while streaming, then one final update."""

    delta: str = ""
    done: bool = False
    text: str = ""  # the whole answer, on the final update
    finish_reason: str | None = None  # "stop" (end of text or stop string), "length", "abort", "error"
    completion_tokens: int = 0
    error: BaseException | None = None


@dataclass
class Job:
    """One request's state inside the loop (only the loop thread mutates it after ``submit``)."""

    rid: int
    request: Request
    english: bool
    stream: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    ids: list[int] = field(default_factory=list)
    emitted: str = ""
    slot: int | None = None
    finished: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.input_ids)


class EngineWorker:
    """Owns the Engine and the Scheduler; HTTP handlers call ``submit`` / ``abort`` from the event loop."""

    def __init__(self, engine: Engine, tokenizer: Any, config: SchedulerConfig | None = None) -> None:
        config = config or SchedulerConfig(max_batch_size=engine.max_batch_size)
        if config.max_batch_size > engine.max_batch_size:
            raise ValueError(f"scheduler max_batch_size {config.max_batch_size} > engine slots "
                             f"{engine.max_batch_size}")
        self.engine, self.tokenizer = engine, tokenizer
        self.scheduler = Scheduler(config)
        self._cond = threading.Condition()
        self._jobs: dict[Hashable, Job] = {}
        self._aborts: set[int] = set()
        self._ids = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "steps": 0, "step_rows": 0, "prefills": 0, "generated_tokens": 0,
                         "peak_running": 0, "aborted": 0, "errors": 0}

    # ----- called from other threads ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="visualglm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, request: Request, *, english: bool, stream: bool,
               loop: asyncio.AbstractEventLoop) -> Job:
        """Queue a validated request; raises QueueFullError when too many are waiting."""
        job = Job(next(self._ids), request, english, stream, loop, asyncio.Queue())
        with self._cond:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self.scheduler.add(job.rid, len(request.input_ids))
            self._jobs[job.rid] = job
            self.counters["requests"] += 1
            self._cond.notify_all()
        return job

    def abort(self, job: Job) -> None:
        """Stop a request (client gone); its slot is freed before the next decode step."""
        with self._cond:
            if not job.finished:
                self._aborts.add(job.rid)
                self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                    "max_batch_size": self.scheduler.config.max_batch_size, **self.counters}

    def wait_until_idle(self, timeout: float) -> bool:
        """Block until no request waits or runs (for tests and shutdown); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self.scheduler.has_unfinished(), timeout)

    # ----- the loop thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or self._aborts or self.scheduler.waiting
                                    or self.scheduler.running)
                if self._stopping:
                    break
                self._apply_aborts()
                admitted = [self._jobs[rid] for rid in self.scheduler.schedule()]
            try:
                self._iterate(admitted)
            except Exception as e:  # never let one bad batch end the loop: fail what ran, go on
                log.exception("engine step failed")
                self._fail_running(e)
        self._fail_all(RuntimeError("the server is shutting down"))

    def _iterate(self, admitted: list[Job]) -> None:
        if admitted:
            self._prefill(admitted)
        running = self._running_jobs()
        if running:
            new = self.engine.step()
            with self._cond:
                self.counters["steps"] += 1
                self.counters["step_rows"] += len(new)
            by_slot = {j.slot: j for j in running}
            for slot, token in new.items():
                self._route(by_slot[slot], token)

    def _prefill(self, jobs: list[Job]) -> None:
        try:
            self.engine.add([j.request for j in jobs])
        except Exception as e:
            log.exception("prefill failed")
            for slot, st in list(self.engine.slots.items()):
                if any(st.request is j.request for j in jobs):
                    self.engine.finish(slot)
            for j in jobs:
                self._finish(j, Update(done=True, finish_reason="error", error=e))
            return
        slot_of = {id(st.request): slot for slot, st in self.engine.slots.items()}
        with self._cond:
            self.counters["prefills"] += 1
            self.counters["peak_running"] = max(self.counters["peak_running"], len(self.scheduler.running))
        for j in jobs:
            j.slot = slot_of[id(j.request)]
            self._route(j, self.engine.slots[j.slot].generated[-1])

    def _route(self, job: Job, token: int) -> None:
        """Accept a token; a failure there (e.g. decoding) ends this request only."""
        try:
            self._accept(job, token)
        except Exception as e:
            log.exception("request %s failed", job.rid)
            if not job.finished:
                self._finish(job, Update(done=True, finish_reason="error", error=e,
                                         completion_tokens=len(job.ids)))

    def _accept(self, job: Job, token: int) -> None:
        """Route one new token: stop checks, incremental text, final update when done."""
        job.ids.append(token)
        state = self.engine.slots.get(job.slot)
        done = state is None or state.done
        stops = job.request.params.stop
        text = None
        if job.stream or stops or done:
            text = extract_answer(self.tokenizer, job.request.input_ids, job.ids, job.english)
        reason = None
        if stops:
            hits = [text.find(s) for s in stops if s in text]
            if hits:
                text, reason, done = text[: min(hits)], "stop", True
        if done:
            reason = reason or ("stop" if token == self.engine.eos else "length")
            self._finish(job, Update(delta=self._delta(job, text, True) if job.stream else "", done=True,
                                     text=text, finish_reason=reason, completion_tokens=len(job.ids)))
        elif job.stream:
            delta = self._delta(job, text, False)
            if delta:
                self._send(job, Update(delta=delta, completion_tokens=len(job.ids)))

    @staticmethod
    def _delta(job: Job, text: str, done: bool) -> str:
        """The part of ``text`` safe to send now; sent text is never taken back."""
        target = text
        if not done:
            if text.endswith("\ufffd"):  # an incomplete multi-byte character
                return ""
            if text and text[-1] in _MAY_CHANGE:
                target = text[:-1]
            target = target[: len(target) - _stop_prefix(target, job.request.params.stop)]
        if not target.startswith(job.emitted):
            return ""  # the original's split on the turn marker rewrote earlier text; nothing safe to add
        delta, job.emitted = target[len(job.emitted):], target
        return delta

    # ----- endings -----------------------------------------------------------------------------------------
    def _finish(self, job: Job, update: Update) -> None:
        if job.slot is not None:
            self.engine.finish(job.slot)
        job.finished = True
        with self._cond:
            self.scheduler.abort(job.rid)  # out of running (or waiting, at shutdown)
            self._jobs.pop(job.rid, None)
            self._aborts.discard(job.rid)
            self.counters["generated_tokens"] += len(job.ids)
            self.counters["errors"] += update.error is not None
            self._cond.notify_all()
        self._send(job, update)

    def _apply_aborts(self) -> None:
        """(holding the lock) drop aborted requests; running ones free their engine slot now."""
        for rid in list(self._aborts):
            job = self._jobs.pop(rid, None)
            self.scheduler.abort(rid)
            if job is None:
                continue
            if job.slot is not None:
                self.engine.finish(job.slot)
            job.finished = True
            self.counters["aborted"] += 1
            self._send(job, Update(done=True, finish_reason="abort", completion_tokens=len(job.ids)))
        self._aborts.clear()
        self._cond.notify_all()

    def _running_jobs(self) -> list[Job]:
        with self._cond:  # handlers add jobs from the event loop thread
            return [j for j in self._jobs.values() if j.slot is not None and not j.finished]

    def _fail_running(self, error: BaseException) -> None:
        for job in self._running_jobs():
            self._finish(job, Update(done=True, finish_reason="error", error=error,
                                     completion_tokens=len(job.ids)))

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            jobs = list(self._jobs.values())
        for job in jobs:
            self._finish(job, Update(done=True, finish_reason="error", error=error))

    @staticmethod
    def _send(job: Job, update: Update) -> None:
        with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
            job.loop.call_soon_threadsafe(job.queue.put_nowait, update)


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that may be the start of a stop string (held back)."""
    return max((k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
               default=0)
