"""visualglm.kernels.cpu: the matrix-vector kernels of gemv.c (every weight kind, both builds), their build
cache, the F.linear routing used by decoding, and the float32 GEMMs for bf16/fp16 weights."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F

from conftest import decode_to_end
from visualglm.generation.engine import Engine, Request, cpu_kernels
from visualglm.generation.sampling import SamplingParams
from visualglm.kernels import cpu
from visualglm.quant import quant_config, quantize_model
from visualglm.quant.int4 import quantize_int4, unpack_int4
from visualglm.quant.int8 import quantize_int8

N, K = 1030, 512  # N not a multiple of the 4-row blocks: the tail rows take the short path


@pytest.fixture(scope="module")
def portable_lib():
    """The kernels built without -march: the portable vector code on x86 (what a processor without AVX2 or
    an arm64 machine runs), the tuned build's fallback."""
    return cpu._declare(ctypes.CDLL(str(cpu.build([[]]))))


def _reference(x: torch.Tensor, w: torch.Tensor, kind: int, scale: torch.Tensor | None) -> torch.Tensor:
    values = unpack_int4(w) if kind == cpu.INT4 else w
    y = x.double() @ values.double().T
    return y * scale.double() if scale is not None else y


def _weights(kind: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.randn(N, K, generator=g)
    if kind == cpu.INT8:
        return quantize_int8(w)
    if kind == cpu.INT4:
        return quantize_int4(w)
    dtype = {v: k for k, v in cpu.FLOAT_KINDS.items()}[kind]
    return w.to(dtype), None


@pytest.mark.parametrize("build", ["native", "portable"])
@pytest.mark.parametrize("kind", [0, 1, 2, cpu.INT8, cpu.INT4])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_gemv_matches_float64(kind, rows, build, portable_lib, monkeypatch):
    monkeypatch.setenv("VISUALGLM_CPU_GEMV", "1")
    lib = portable_lib if build == "portable" else cpu.library()
    assert lib is not None, "the kernels must build on this machine (a C compiler is part of the test setup)"
    g = torch.Generator().manual_seed(kind * 10 + rows)
    w, scale = _weights(kind, g)
    x = torch.randn(rows, K, generator=g)
    y = cpu.gemv(x, w, kind, scale, lib=lib)
    if not lib.vg_supports(kind):  # float16 needs F16C: the portable build has no float16 loop
        assert kind == 2 and build == "portable" and y is None
        return
    ref = _reference(x, w, kind, scale)
    assert y is not None and y.shape == (rows, N) and y.dtype == torch.float32
    assert float((y.double() - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("threads", [1, 2, 7])
def test_gemv_threads_split_rows_exactly(threads, monkeypatch):
    """Any thread count gives the same bits: each row is summed by one thread in one order."""
    monkeypatch.setenv("VISUALGLM_CPU_GEMV", "1")
    g = torch.Generator().manual_seed(5)
    w = torch.randn(N, K, generator=g).bfloat16()
    x = torch.randn(2, K, generator=g)
    assert torch.equal(cpu.gemv(x, w, 1, threads=threads), cpu.gemv(x, w, 1, threads=1))


def test_unsupported_cases_fall_back(monkeypatch):
    monkeypatch.setenv("VISUALGLM_CPU_GEMV", "1")
    w = torch.randn(64, 40).bfloat16()  # K % 16 != 0 (the loops' step)
    assert cpu.gemv(torch.randn(1, 40), w, 1) is None
    packed, scale = quantize_int4(torch.randn(64, 48))  # INT4: K % 32 != 0
    assert cpu.gemv(torch.randn(1, 48), packed, cpu.INT4, scale) is None
    assert cpu.gemv(torch.randn(1, 64), torch.randn(64, 128).bfloat16()[:, ::2], 1) is None  # not contiguous
    assert cpu.linear(torch.randn(1, 40).bfloat16(), w) is None
    big = torch.randn(1024, 512).bfloat16()
    assert cpu.linear(torch.randn(cpu.MAX_ROWS + 1, 512).bfloat16(), big) is None  # a GEMM: torch's
    with torch.enable_grad():
        assert cpu.linear(torch.randn(1, 512).bfloat16(), big.requires_grad_()) is None


def test_switches(monkeypatch):
    monkeypatch.setenv("VISUALGLM_CPU_GEMV", "0")
    assert not cpu.enabled() and cpu.library() is None
    monkeypatch.setenv("VISUALGLM_CPU_GEMV", "sometimes")
    with pytest.raises(ValueError, match="VISUALGLM_CPU_GEMV must be auto, 1 or 0"):
        cpu.enabled()
    monkeypatch.setenv("VISUALGLM_CPU_UPCAST", "0")
    assert not cpu.upcast_enabled()
    monkeypatch.setenv("VISUALGLM_CPU_UPCAST", "1")
    assert cpu.upcast_enabled()


def test_build_is_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv("VISUALGLM_CACHE", str(tmp_path))
    first = cpu.build()
    stamp = first.stat().st_mtime_ns
    assert cpu.build() == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temporary left behind
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("VISUALGLM_CACHE", str(tmp_path / "other"))
    with pytest.raises((RuntimeError, OSError)):
        cpu.build()


def test_unpack_int4_matches_torch_ops(monkeypatch):
    monkeypatch.setenv("VISUALGLM_CPU_GEMV", "1")
    packed, _ = quantize_int4(torch.randn(37, 96))
    assert torch.equal(cpu.unpack_int4(packed), unpack_int4(packed).float())


def test_inference_linears_route_linear_calls(monkeypatch):
    """Few rows go to the matrix-vector kernel, many rows of bf16 to float32 GEMMs; results as F.linear's."""
    monkeypatch.setenv("VISUALGLM_CPU_GEMV", "1")
    monkeypatch.setenv("VISUALGLM_CPU_UPCAST", "1")
    calls = {"gemv": 0, "upcast": 0}
    gemv, upcast = cpu.gemv, cpu.upcast_linear

    def counted_gemv(*a, **k):
        calls["gemv"] += 1
        return gemv(*a, **k)

    def counted_upcast(*a, **k):
        calls["upcast"] += 1
        return upcast(*a, **k)

    monkeypatch.setattr(cpu, "gemv", counted_gemv)
    monkeypatch.setattr(cpu, "upcast_linear", counted_upcast)
    lin = torch.nn.Linear(512, 1024).bfloat16()
    for rows, route in ((1, "gemv"), (40, "upcast")):
        x = torch.randn(rows, 512).bfloat16()
        with torch.no_grad():
            expected = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        before = dict(calls)
        with torch.inference_mode(), cpu.inference_linears():
            got = lin(x)
        assert calls[route] == before[route] + 1
        assert got.dtype == torch.bfloat16 and got.shape == (rows, 1024)
        assert float((got.float() - expected).abs().max()) <= 2 ** -7 * float(expected.abs().max())
    with torch.inference_mode(), cpu.inference_linears(matvec=False):  # under torch.compile: torch's
        lin(torch.randn(1, 512).bfloat16())
    assert calls["gemv"] == 1


@pytest.mark.parametrize("quant", [None, 8, 4])
def test_decoding_with_the_kernels_equals_torch(tiny_model, quant, monkeypatch):
    """The tiny model's greedy decode: same tokens, logits within float32 summation error, kernels or not."""
    monkeypatch.setattr(cpu, "MIN_WEIGHT_ELEMENTS", 0)  # the tiny matrices too
    model = quantize_model(tiny_model, quant_config(quant)) if quant else tiny_model
    v = model.config.glm.vocab_size
    ids = [5, 6, 7, 8, 9, v - 3, v - 2]  # ..., [gMASK], <sop> of a small vocabulary
    runs = {}
    for mode in ("0", "1"):
        monkeypatch.setenv("VISUALGLM_CPU_GEMV", mode)
        engine = Engine(model, eos_token_id=v - 1, bos_token_id=v - 2, mask_token_ids=(v - 4, v - 3))
        params = SamplingParams(max_length=len(ids) + 12, do_sample=False, repetition_penalty=1.0,
                                banned=((v - 1, v),))
        runs[mode] = decode_to_end(engine, Request(ids, params))
    (tokens0, logits0), (tokens1, logits1) = runs["0"], runs["1"]
    assert tokens0 == tokens1 and len(tokens0) == 12
    assert float((logits0 - logits1).abs().max()) <= 1e-4 * max(1.0, float(logits0.abs().max()))


def test_engine_routes_on_cpu_only(monkeypatch):
    monkeypatch.setenv("VISUALGLM_CPU_GEMV", "1")
    with cpu_kernels(torch.device("meta"), torch.bfloat16, 1):
        assert not torch.overrides._get_current_function_mode_stack()
    with cpu_kernels(torch.device("cpu"), torch.bfloat16, 1):
        assert torch.overrides._get_current_function_mode_stack()


def test_small_models_skip_the_routing(monkeypatch):
    """No matrix of the demo model is large enough, so its engine never enters the per-call routing."""
    from visualglm.config import VisualGLMConfig
    from visualglm.model.init import random_model

    demo = random_model(VisualGLMConfig.from_name("visualglm-demo"), seed=0)
    assert not cpu.worth_routing(demo)
    monkeypatch.setattr(cpu, "MIN_WEIGHT_ELEMENTS", 0)
    assert cpu.worth_routing(demo)
