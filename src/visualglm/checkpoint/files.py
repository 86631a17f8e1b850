"""Raw weight files: memory-mapped safetensors and pickles, read tensor by tensor, pages handed back.

Each tensor is copied into its final place in slices and the slice's pages of the mapping are released right
away, so neither a whole file nor a second copy of a tensor is ever resident.
"""


import ctypes
import mmap
import os
import pickle
import sys
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .keymaps import interleaved_view

_CHUNK_BYTES = 64 * 1024**2  # copy granularity: the most of a source tensor resident at once


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used as it is; the message names the file and key."""


# ----- reading tensors ---------------------------------------------------------------------------------
class WeightFile:
    """One open weight file.

    ``view(name)`` is zero-copy and usually memory-mapped: read it, never keep it. ``take(name)`` returns
    an owned tensor (cast, placed, GLM QKV rows reordered) and hands the source pages back to the kernel
    slice by slice, so the file itself never stays resident.
    """

    def __init__(self, path: Path, names: list[str], get: Callable[[str], torch.Tensor],
                 mapped: bool) -> None:
        self.path = path
        self.names = names
        self._get = get
        self._ranges = _private_file_mappings(path) if mapped else []

    def view(self, name: str) -> torch.Tensor:
        return self._get(name)

    def take(self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
             qkv_heads: int | None = None) -> torch.Tensor:
        """An owned copy of ``name`` in ``dtype`` (default: as stored) on ``device``. ``qkv_heads``:
        the stored rows are contiguous [Q | K | V]; reorder them per head (our layout) while copying."""
        src = self._get(name)
        out = torch.empty(src.shape, dtype=dtype or src.dtype, device=device)
        if qkv_heads:
            if src.dim() == 0 or src.shape[0] % (3 * qkv_heads):
                raise CheckpointError(f"{name!r} in {self.path} has shape {list(src.shape)}: a "
                                      f"query_key_value tensor needs 3 x {qkv_heads} heads x d rows")
            per_head = out.view(qkv_heads, 3, -1, *src.shape[1:])  # (H, 3, d, ...)
            per_head.copy_(interleaved_view(src, qkv_heads))
            self.release(src)
        elif src.dim() and src.is_contiguous():
            rows = max(1, _CHUNK_BYTES // max(1, src[0].numel() * src.element_size()))
            for start in range(0, src.shape[0], rows):
                out[start:start + rows].copy_(src[start:start + rows])
                self.release(src[start:start + rows])
        else:
            out.copy_(src)
            self.release(src)
        return out

    def equal(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """torch.equal for two views of this file, slice by slice, releasing pages as it goes."""
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.dim() == 0:
            return torch.equal(a, b)
        rows = max(1, _CHUNK_BYTES // max(1, a[0].numel() * a.element_size()))
        for start in range(0, a.shape[0], rows):
            same = torch.equal(a[start:start + rows], b[start:start + rows])
            self.release(a[start:start + rows])
            self.release(b[start:start + rows])
            if not same:
                return False
        return True

    def release(self, t: torch.Tensor) -> None:
        """Drop the resident pages of a view we are done with. Only whole pages inside ``t`` and inside a
        private (copy-on-write, never written) mapping of this file are dropped: their contents stay in
        the file and come back on the next access. A no-op for tensors in ordinary memory."""
        if not self._ranges or _MADVISE is None or t.numel() == 0:
            return
        extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
        start = t.data_ptr()
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (start + extent * t.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo and any(a <= lo and hi <= b for a, b in self._ranges):
            _MADVISE(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


def _load_madvise() -> Callable[..., int] | None:
    linux = sys.platform.startswith("linux") and sys.byteorder == "little"
    if not linux or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _load_madvise()


def _private_file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` privately (Linux /proc/self/maps)."""
    if _MADVISE is None:
        return []
    real = os.path.realpath(path)
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.rstrip("\n").split(maxsplit=5)
                if len(parts) == 6 and parts[5] == real and parts[1].endswith("p"):
                    lo, hi = parts[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


@contextmanager
def open_weights(file: Path, *, trust_pickle: bool = False) -> Iterator[WeightFile]:
    """Open one safetensors file or torch pickle (sat: weights under ``module``) for reading."""
    if file.suffix == ".safetensors":
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error type for every malformed header
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e
        with handle as f:
            yield WeightFile(file, list(f.keys()), f.get_tensor, mapped=True)
        return
    sd, mapped = _load_pickle(file, trust_pickle)
    tensors = _tensors_of(sd, file)
    del sd
    try:
        yield WeightFile(file, list(tensors), tensors.__getitem__, mapped=mapped and _little_endian(file))
    finally:
        tensors.clear()


def _tensors_of(sd: Any, file: Path) -> dict[str, torch.Tensor]:
    if not isinstance(sd, dict):
        raise CheckpointError(f"{file} holds a {type(sd).__name__}, expected a dict of weights")
    if isinstance(sd.get("module"), dict):  # sat: weights under "module", maybe beside "args" etc.
        sd = sd["module"]
    tensors = {k: v for k, v in sd.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{file} holds no tensors (top-level keys: {sorted(map(str, sd))[:8]}); "
                              "expected a state dict, or sat's {'module': state dict}")
    return tensors


def _little_endian(file: Path) -> bool:
    """torch writes a ``byteorder`` record; a big-endian file is byte-swapped in its (private) mapping, so
    its pages must never be dropped."""
    try:
        with zipfile.ZipFile(file) as z:
            records = [n for n in z.namelist() if n.endswith("/byteorder")]
            return not records or z.read(records[0]).decode().strip() == "little"
    except (OSError, zipfile.BadZipFile):
        return False


def _load_pickle(file: Path, trust_pickle: bool) -> tuple[Any, bool]:
    """(loaded object, memory-mapped?). Legacy (pre-zip) pickles cannot be mapped and load whole."""
    try:
        return _torch_load(file, trust_pickle, mmap=True), True
    except _NotMappable:
        return _torch_load(file, trust_pickle, mmap=False), False


class _NotMappable(Exception):
    pass


def _torch_load(file: Path, trust_pickle: bool, *, mmap: bool) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower() or "Unsupported operand" in str(e):
            reason = _unpickler_reason(e) if "WeightsUnpickler" in str(e) else _first_line(e)
            raise CheckpointError(f"{file} is not a readable PyTorch checkpoint ({reason})") from e
        raise CheckpointError(
            f"{file} contains pickled Python objects besides tensors ({_unpickler_reason(e)}), which are "
            "not loaded by default because unpickling them can run arbitrary code. If you trust this file, "
            "pass trust_pickle=True (command line: --trust-pickle), or convert it once with "
            "`visualglm convert --trust-pickle SRC DST` and use the safetensors copy."
        ) from e
    except RuntimeError as e:
        if mmap and "mmap can only be used" in str(e):
            raise _NotMappable from e
        raise CheckpointError(f"{file} is not a readable PyTorch checkpoint: {_first_line(e)}") from e
    except (OSError, EOFError, KeyError, ValueError, AttributeError, ImportError) as e:
        raise CheckpointError(f"{file} is not a readable PyTorch checkpoint: {type(e).__name__}: "
                              f"{_first_line(e)}") from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unpickler_reason(e: BaseException) -> str:
    """'Unsupported global: GLOBAL argparse.Namespace' out of torch's long weights-only message."""
    rest = str(e).partition("WeightsUnpickler error:")[2].strip()
    if not rest:
        return _first_line(e)
    return rest.splitlines()[0].split(" was not an allowed global")[0].strip().rstrip(".")


