"""torchrun's environment and the process group on top of it.

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) for every
process it starts; everything here reads those, or the already-initialised process group when a caller (a
test, a notebook) set one up itself.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


class DistributedError(RuntimeError):
    """A multi-process setup that cannot work as asked; the message says what is missing."""


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Number of processes in the job (1 without torchrun)."""
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """Rank on this machine: which GPU this process drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device(device: torch.device) -> torch.device:
    """One GPU per process: ``cuda`` (any index) becomes ``cuda:LOCAL_RANK``; CPU stays CPU."""
    if device.type == "cuda":
        return torch.device("cuda", local_rank())
    if device.type != "cpu":
        raise DistributedError(f"multi-process inference runs on cuda (nccl) or cpu (gloo), not {device.type}; "
                               "pass --device cuda or --device cpu")
    return device


def init(device: torch.device) -> bool:
    """Join the job's process group: nccl for CUDA, gloo for CPU. Returns True if this call created it.

    A group that already exists (set up by the caller) is used as it is.
    """
    if is_initialized():
        return False
    if world_size() <= 1:
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world_size()} but {', '.join(missing)} not set: start the job with "
                               "`torchrun --nproc-per-node N ...` or initialise torch.distributed yourself")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return True


def destroy() -> None:
    """Leave the process group (a no-op when none exists)."""
    if is_initialized():
        dist.destroy_process_group()


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only: N processes share one terminal."""
    if rank() == 0:
        print(*args, **kwargs)
