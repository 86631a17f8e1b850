"""Rank 0 drives, the other ranks follow: how interactive programs run under tensor parallelism.

Every rank must run the same forward passes (each holds only part of the model), but only rank 0 reads the
terminal, serves HTTP, samples and prints. :func:`lead` makes that transparent to the caller: on rank 0 it
wraps the model so each call of ``model(...)`` / ``model.encode_image(...)`` is first broadcast to the other
ranks; on the other ranks it replays those calls until rank 0 is done. Nothing above the model changes:
the engine, ``chat``/``stream_chat``/``batch_chat`` and a server's scheduler run on rank 0 only, so sampling
(and its random numbers) happens once and no two ranks can ever pick different tokens.

Contract: on rank 0, call the model from one thread, and touch a KV cache only through the model (its
contents) or ``reserve`` (its capacity); followers rebuild each cache from the calls they replay.
"""

from __future__ import annotations

import atexit
import itertools
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..model.kv_cache import KVCache
from . import env
from .tp import TensorParallel

STOP = "stop"
_MIRRORED = ("forward", "encode_image")


@dataclass(frozen=True)
class _CacheRef:
    """Stands for rank 0's KV cache in a message: followers keep their own cache under the same id."""

    id: int
    batch: int
    capacity: int


class Leader:
    """Rank 0's side: broadcasts each model call, then runs it."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup | None) -> None:
        self.model = model
        self.group = group
        self.closed = False
        self._ids: weakref.WeakKeyDictionary[KVCache, int] = weakref.WeakKeyDictionary()
        self._next_id = itertools.count()
        for op in _MIRRORED:
            setattr(model, op, self._mirror(op, getattr(model, op)))

    def _mirror(self, op: str, call: Callable[..., Any]) -> Callable[..., Any]:
        def mirrored(*args: Any, **kwargs: Any) -> Any:
            if self.closed:
                raise RuntimeError("the other ranks have stopped following (Leader.close was called)")
            packed = [op, self._pack(args), self._pack(kwargs)]
            _send([*packed, list(self._ids.values())], self.group)  # live caches, after packing new ones
            return call(*args, **kwargs)
        mirrored.__wrapped__ = call  # type: ignore[attr-defined]
        return mirrored

    def _pack(self, value: Any) -> Any:
        """Tensors to CPU (a pickled CUDA tensor would land on rank 0's GPU), caches to references."""
        if isinstance(value, torch.Tensor):
            return value.detach().cpu()
        if isinstance(value, KVCache):
            if value not in self._ids:
                self._ids[value] = next(self._next_id)
            return _CacheRef(self._ids[value], value.batch, value.capacity)
        if isinstance(value, (list, tuple)):
            return type(value)(self._pack(v) for v in value)
        if isinstance(value, dict):
            return {k: self._pack(v) for k, v in value.items()}
        return value

    def close(self) -> None:
        """Release the followers (idempotent); the model must not be called afterwards."""
        if self.closed:
            return
        self.closed = True
        if env.is_initialized():
            _send([STOP, (), {}, []], self.group)
            dist.barrier(group=self.group)  # the followers have the message before rank 0 may exit
        for op in _MIRRORED:
            self.model.__dict__.pop(op, None)


def follow(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """A follower's whole life: replay rank 0's model calls until it sends STOP.

    Errors that rank 0 also meets (checked before any collective, e.g. a prompt that is too long) are
    reported on stderr and the loop goes on, as rank 0's command goes on.
    """
    from ..kernels.cpu import worth_routing

    caches: dict[int, KVCache] = {}
    device = next(model.parameters()).device
    route_linears = worth_routing(model)  # as the engine decides once for its model
    while True:
        op, args, kwargs, live = _receive(group)
        if op == STOP:
            dist.barrier(group=group)
            return
        for cid in [c for c in caches if c not in live]:
            del caches[cid]
        args, kwargs = _unpack(args, caches, model, device), _unpack(kwargs, caches, model, device)
        if op == "forward":
            kwargs["logits"] = "none"  # lm_head is replicated: only rank 0 needs logits
        try:
            with torch.inference_mode(), _kernels_like_rank0(model, op, args, route_linears):
                (model if op == "forward" else getattr(model, op))(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 (rank 0 raised the same and carries on)
            print(f"[rank {env.rank()}] {op} failed as on rank 0: {type(e).__name__}: {e}", file=sys.stderr)


def _kernels_like_rank0(model: nn.Module, op: str, args: tuple, route_linears: bool) -> AbstractContextManager:
    """The engine picks CPU matmul kernels for its inference steps; pick the same, so no rank lags or
    computes a replicated tensor differently. ``forward`` gets its rows (input_ids (B, T): B*T)."""
    from ..generation.engine import cpu_kernels

    rows = args[0].numel() if op == "forward" and args else 0
    return cpu_kernels(model.device, model.dtype, rows, route_linears=route_linears)


def _unpack(value: Any, caches: dict[int, KVCache], model: nn.Module, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, _CacheRef):
        cache = caches.get(value.id)
        if cache is None:
            cache = caches[value.id] = model.new_cache(value.batch, 0)
        cache.reserve(value.capacity)
        return cache
    if isinstance(value, (list, tuple)):
        return type(value)(_unpack(v, caches, model, device) for v in value)
    if isinstance(value, dict):
        return {k: _unpack(v, caches, model, device) for k, v in value.items()}
    return value


def _send(message: list[Any], group: dist.ProcessGroup | None) -> None:
    dist.broadcast_object_list([message], src=_src(group), group=group)


def _receive(group: dist.ProcessGroup | None) -> list[Any]:
    box: list[Any] = [None]
    dist.broadcast_object_list(box, src=_src(group), group=group)
    return box[0]


def _src(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


# Followers wait for rank 0 as long as a user thinks or a server idles: far beyond the default 30 minutes.
CONTROL_TIMEOUT = timedelta(days=365)
_CONTROL: dict[int, dist.ProcessGroup] = {}


def control_group() -> dist.ProcessGroup:
    """The group rank 0's messages travel on: gloo (CPU) even when the model talks over nccl, and with a
    timeout long enough for an idle chat or server. Collective: every rank calls it; later calls reuse it."""
    key = id(dist.group.WORLD)
    if key not in _CONTROL:
        _CONTROL[key] = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return _CONTROL[key]


def _split(model: nn.Module) -> TensorParallel | None:
    tp = getattr(model, "tensor_parallel", None)
    return tp if tp is not None and tp.world_size > 1 else None


@contextmanager
def session(model: nn.Module) -> Iterator[bool]:
    """``with session(model) as driving:`` -- rank 0 (or a single process) gets True and runs the body; the
    other ranks replay its model calls while it does, then get False (skip the body). The process group
    stays up, so sessions can follow one another (one per model).
    """
    tp = _split(model)
    if tp is None:
        yield True
        return
    group = control_group()
    if tp.rank != 0:
        follow(model, group)
        yield False
        return
    leader = Leader(model, group)
    try:
        yield True
    finally:
        leader.close()


def lead(model: nn.Module) -> bool:
    """For a command's ``run``: call once after loading, on every rank. True: this process runs the program
    (rank 0, or no TP). False: this process was a follower, rank 0 has finished, the caller should return.

    Rank 0 releases the followers and leaves the process group when the process exits (``atexit``), so every
    return path of the command is covered; ``model.leader.close()`` releases them earlier.
    """
    tp = _split(model)
    if tp is None:
        return True
    group = control_group()
    if tp.rank != 0:
        try:
            follow(model, group)
        finally:
            env.destroy()
        return False
    leader = Leader(model, group)
    model.leader = leader

    def finish() -> None:
        leader.close()
        env.destroy()
    atexit.register(finish)
    return True
