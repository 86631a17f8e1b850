"""CPU inference kernels: matrix-vector products for decoding (``gemv.c``, built once per machine with the
system C compiler), and float32 GEMMs for bf16/fp16 models on processors without native bf16/fp16 math.

Why the first: decoding one token reads every weight once, and on processors without AVX-512 torch's kernels
convert weights slower than memory delivers them (2 AVX2 cores: bf16 ~16 GB/s, INT8 ~12, INT4 ~6, against
~30 GB/s). ``gemv.c`` keeps up much better (``benchmarks/cpu_kernels.py`` prints both side by side). It is
plain C (AVX2 intrinsics where the compiler targets them, portable vector code elsewhere), compiled in about
a second on first use and cached under ``$VISUALGLM_CACHE`` (default ``~/.cache/visualglm``), keyed by the
source, the compiler and the flags. No compiler, a failed build or an unsupported shape: torch's kernels.
``VISUALGLM_CPU_GEMV``: ``auto`` (default: used where torch's CPU kernels are not the AVX-512 ones, which
keep up on their own), ``1`` (always), ``0`` (never; no compiled code at all).

Why the second: without AVX512_BF16/AMX, torch's bf16 GEMM on x86 is emulated and runs about 5x slower than
float32 (2 AVX2 cores, 256x4096x4096: 19 vs 95 GFLOP/s), which made a ViT-g image encoding take ~30 s.
Many-row products (prefill, image encoding) of such models therefore cast their weights to float32 a block
at a time (bf16/fp16 values are exact in float32, accumulation is float32 either way, the output is
rounded once as before). ``VISUALGLM_CPU_UPCAST``: ``auto`` (default: where the processor lacks native
bf16/fp16), ``1``, ``0``.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

SOURCE = Path(__file__).with_name("gemv.c")
FLOAT_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
INT8, INT4 = 3, 4
MAX_ROWS = 8  # rows of x (batch x tokens) served; more rows are GEMMs, where torch's kernels win
MIN_WEIGHT_ELEMENTS = 1 << 18  # smaller matrices sit in cache and torch's call overhead is lower
UPCAST_BLOCK_ELEMENTS = 1 << 24  # float32 copy of at most this many weights at a time (64 MB)

_lock = threading.Lock()
_state: dict[str, ctypes.CDLL | None] = {}  # "lib": the loaded library (None once a build failed)


def _mode(var: str) -> str:
    mode = os.environ.get(var, "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return "0"
    if mode in ("1", "on", "true", "yes"):
        return "1"
    if mode != "auto":
        raise ValueError(f"{var} must be auto, 1 or 0, got {mode!r}")
    return mode


def enabled() -> bool:
    """Use the matrix-vector kernels in this process? (The environment switch, then the processor.)"""
    mode = _mode("VISUALGLM_CPU_GEMV")
    if mode == "auto" and torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False
    return library() is not None


def library() -> ctypes.CDLL | None:
    """The built kernels (building them on first call), or None where they cannot be built here or
    ``VISUALGLM_CPU_GEMV=0`` turns compiled code off."""
    if _mode("VISUALGLM_CPU_GEMV") == "0":
        return None
    with _lock:
        if "lib" not in _state:
            _state["lib"] = _load()
        return _state["lib"]


def _load() -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"visualglm: CPU decoding kernels unavailable ({e}); using torch's", stacklevel=3)
        return None
    return _declare(lib)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, n = ctypes.c_void_p, ctypes.c_long
    lib.vg_gemv.restype = ctypes.c_int
    lib.vg_gemv.argtypes = [ctypes.c_int, p, n, p, p, p, n, n, ctypes.c_int]
    lib.vg_supports.restype = ctypes.c_int
    lib.vg_supports.argtypes = [ctypes.c_int]
    lib.vg_unpack_i4.restype = None
    lib.vg_unpack_i4.argtypes = [p, p, n, n, ctypes.c_int]
    return lib


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc/clang)")
    return cc


def arch_flags() -> list[list[str]]:
    """Flag sets to try, best first: tuned for this processor, then generic (portable vector code)."""
    native = "-mcpu=native" if platform.machine().lower() in ("arm64", "aarch64") else "-march=native"
    return [[native], []]


def cache_dir() -> Path:
    root = os.environ.get("VISUALGLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "visualglm")
    return Path(root) / "kernels"


def build(flag_sets: list[list[str]] | None = None) -> Path:
    """Compile gemv.c into the cache with the first flag set that works; a built library is reused. Written
    atomically (compiled to a temporary name, then renamed), so a half-written library is never loaded."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    errors = []
    for arch in arch_flags() if flag_sets is None else flag_sets:
        flags = ["-O3", "-shared", "-fPIC", "-pthread", *arch]
        key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(),
                                         platform.machine().encode()])).hexdigest()[:16]
        target = cache_dir() / f"gemv-{key}.so"
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode == 0:
                os.replace(tmp, target)
                return target
            err = done.stderr.strip().splitlines()
            errors.append(err[-1] if err else f"exit {done.returncode}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {'; '.join(errors)}")


# ----- matrix-vector products ------------------------------------------------------------------------
def serves(x: torch.Tensor, rows: int, k: int) -> bool:
    """Is this product one for the kernels (CPU, inference, few rows, K a multiple of 32)?"""
    return (x.device.type == "cpu" and rows <= MAX_ROWS and k % 32 == 0 and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling() and enabled())


def gemv(x: torch.Tensor, weight: torch.Tensor, kind: int, scale: torch.Tensor | None = None,
         threads: int | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor | None:
    """x (M, K) float -> (M, N) float32 = x @ W^T (times ``scale`` per row for INT8/INT4), or None when the
    kernels do not serve this case. ``weight``: (N, K) in the float kind's dtype, int8 (N, K), or INT4's
    storage layout (N, K/2). ``lib``: another build of the kernels (tests)."""
    lib = lib or library()
    m, k = x.shape
    n = weight.shape[0]
    if lib is None or not lib.vg_supports(kind) or not weight.is_contiguous():
        return None
    xf = x.to(torch.float32)
    if kind == INT4:  # even columns, then odd ones: the nibbles come out that way
        xf = torch.cat((xf[:, 0::2], xf[:, 1::2]), dim=1)
    xf = xf.contiguous()
    sf = scale.to(torch.float32).contiguous() if scale is not None else None
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.vg_gemv(kind, xf.data_ptr(), m, weight.data_ptr(), sf.data_ptr() if sf is not None else None,
                     y.data_ptr(), n, k, threads or torch.get_num_threads())
    return y if rc == 0 else None


def unpack_int4(packed: torch.Tensor) -> torch.Tensor | None:
    """INT4 storage layout (N, K/2) -> float32 (N, K) values in [-8, 7] (no scale), or None without the
    kernels: the many-rows path's GEMM input, at memory speed (torch's shifts + stack + cast are ~10x
    slower)."""
    lib = library()
    if lib is None or packed.device.type != "cpu" or not packed.is_contiguous():
        return None
    n, half = packed.shape
    out = torch.empty(n, 2 * half, dtype=torch.float32)
    lib.vg_unpack_i4(packed.data_ptr(), out.data_ptr(), n, 2 * half, torch.get_num_threads())
    return out


def _plain(weight: torch.Tensor) -> bool:
    """A 2-D dense tensor (no subclass such as an NF4 weight) that autograd does not track."""
    return weight.dim() == 2 and type(weight) in (torch.Tensor, torch.nn.Parameter)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.linear`` through the matrix-vector kernels for a plain float weight, or None where they do not
    serve it (too many rows, small or odd-shaped weights, autograd, other dtypes)."""
    if not _plain(weight) or weight.dtype not in FLOAT_KINDS or x.dtype != weight.dtype:
        return None
    n, k = weight.shape
    rows = x.numel() // k
    if weight.numel() < MIN_WEIGHT_ELEMENTS or not serves(x, rows, k):
        return None
    y = gemv(x.reshape(rows, k), weight, FLOAT_KINDS[weight.dtype])
    if y is None:
        return None
    if bias is not None:
        y += bias
    return y.to(x.dtype).view(*x.shape[:-1], n)


# ----- float32 GEMMs for bf16/fp16 weights --------------------------------------------------------------
@functools.cache
def native_half_math() -> bool:
    """Does this processor multiply bf16/fp16 natively (AVX512_BF16, AMX, AVX512_FP16; any non-x86)?"""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True  # not measured elsewhere: leave torch's choice alone
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True
    return bool({"avx512_bf16", "amx_bf16", "avx512_fp16"} & set(flags))


def upcast_enabled() -> bool:
    mode = _mode("VISUALGLM_CPU_UPCAST")
    return not native_half_math() if mode == "auto" else mode == "1"


def upcasts(x: torch.Tensor) -> bool:
    """Does a GEMM of this input (bf16/fp16 on CPU, eager) run in float32 here? Autograd is the caller's check."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
            and not torch.compiler.is_compiling() and upcast_enabled())


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """``F.linear`` of a bf16/fp16 CPU weight as float32 GEMMs over blocks of output rows, or None where it
    does not apply (other dtypes, autograd, tensor subclasses)."""
    if not _plain(weight) or x.dtype != weight.dtype or torch.is_grad_enabled() or not upcasts(x):
        return None
    n, k = weight.shape
    xf = x.reshape(-1, k).to(torch.float32)
    out = torch.empty(xf.shape[0], n, dtype=x.dtype)
    block = max(64, UPCAST_BLOCK_ELEMENTS // max(k, 1))
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        b = bias[lo:hi].to(torch.float32) if bias is not None else None
        out[:, lo:hi] = F.linear(xf, weight[lo:hi].to(torch.float32), b)
    return out.view(*x.shape[:-1], n)


# ----- routing ---------------------------------------------------------------------------------------
class _InferenceLinears(TorchFunctionMode):
    """Routes ``F.linear`` (what ``nn.Linear`` calls) to :func:`linear` / :func:`upcast_linear` where they
    serve the call; every other function runs unchanged."""

    def __init__(self, matvec: bool, upcast: bool) -> None:
        super().__init__()
        self.matvec, self.upcast = matvec, upcast

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.linear:
            y = linear(*args, **kwargs) if self.matvec else None
            if y is None and self.upcast:
                y = upcast_linear(*args, **kwargs)
            if y is not None:
                return y
        return func(*args, **kwargs)


def worth_routing(model: torch.nn.Module) -> bool:
    """Has ``model`` a float Linear that the routing below can serve? Small models (the demo) skip it: the
    mode sees every torch call of a step, which costs more than it gives when no matrix is large."""
    return any(isinstance(m, torch.nn.Linear) and _plain(m.weight) and m.weight.numel() >= MIN_WEIGHT_ELEMENTS
               for m in model.modules())


@contextmanager
def inference_linears(matvec: bool = True) -> Iterator[None]:
    """Float ``F.linear`` calls of inference through these kernels where they serve the call: matrix-vector
    kernels for up to ``MAX_ROWS`` rows (``matvec``; off under torch.compile, which sees torch's ops), float32
    GEMMs for more rows of bf16/fp16 where the processor lacks native half math. Decided call by call."""
    matvec = matvec and enabled()
    upcast = upcast_enabled()
    if not (matvec or upcast):
        yield
        return
    with _InferenceLinears(matvec, upcast):
        yield
