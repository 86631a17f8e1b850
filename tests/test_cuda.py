"""CUDA paths: the Triton weight-only kernel and the CUDA-graph decode step.

Skipped without a CUDA GPU (CI has none); run on a GPU machine with ``pytest -q tests/test_cuda.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from visualglm.quant import QuantizedLinear, cuda_kernel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or cuda_kernel.triton is None,
                                reason="needs a CUDA GPU and Triton")

GREEDY = {"do_sample": False, "max_length": 80}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 16, 40, 64, 65])  # 65: past the kernel, the cuBLAS path
@pytest.mark.parametrize("shape", [(200, 96), (4104, 4160)])  # (N, K): tails in both directions
def test_weight_only_kernels_match_the_dequantized_weight(bits, dtype, rows, shape, monkeypatch):
    """INT8/INT4 Linears on CUDA: <= MAX_ROWS rows run the Triton kernel on the storage layout (bias fused),
    except INT4 in bf16, repacked for torch's tinygemm; every path agrees with the dequantized weight."""
    n, k = shape
    g = torch.Generator(device="cuda").manual_seed(rows * 7 + bits)
    lin = torch.nn.Linear(k, n, device="cuda", dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g, device="cuda"))
        lin.bias.copy_(torch.randn(n, generator=g, device="cuda"))
    qlin = QuantizedLinear.from_linear(lin, bits)
    tinygemm = bits == 4 and dtype == torch.bfloat16
    assert qlin.layout == ("cuda_int4" if tinygemm else "storage")
    launches = []
    real = cuda_kernel.launch
    monkeypatch.setattr(cuda_kernel, "launch", lambda *a, **kw: launches.append(a[0].shape) or real(*a, **kw))
    x = torch.randn(rows, k, generator=g, device="cuda").to(dtype)
    with torch.no_grad():
        got = qlin(x)
    expected = F.linear(x.float(), qlin.dequantized(torch.float32), lin.bias.float())
    assert got.shape == (rows, n) and got.dtype == dtype and torch.isfinite(got).all()
    assert bool(launches) == (rows <= cuda_kernel.MAX_ROWS and not tinygemm)
    rel = ((got.float() - expected).norm() / expected.norm()).item()
    assert rel < (2e-3 if dtype == torch.float16 else 1e-2), rel


def _two_requests(model, tok, reference_dir):
    from visualglm.generation.chat import make_request, sampling_params

    no_eos = ((tok.eos_token_id, tok.eos_token_id + 1),)  # each decodes exactly max_new_tokens
    return [make_request(model, tok, reference_dir / "chelsea.png", "描述这张图片。", None,
                         sampling_params(tok, max_new_tokens=4, do_sample=False, banned=no_eos), False),
            make_request(model, tok, None, "Hello, who are you?", None,
                         sampling_params(tok, max_new_tokens=12, do_sample=False, banned=no_eos), False)]


def _staggered(engine, requests) -> list[list[int]]:
    """Two requests added one after the other; the first finishes early, so the second decodes alone in
    slot 1 (the gathered-slots path) after decoding beside it (the first-rows path)."""
    engine.add([requests[0]])
    engine.add([requests[1]])
    while any(not st.done for st in engine.slots.values()):
        engine.step()
    return [engine.slots[s].generated for s in (0, 1)]


@pytest.mark.parametrize(("quant", "mode"), [(None, "graphs"), (8, "graphs"), (4, "graphs"), (None, True), (4, True)])
def test_cuda_graph_decode_gives_the_eager_answers(reference_dir, quant, mode):
    """``--compile graphs`` (eager step captured) and ``--compile`` (torch.compile, then captured; the Triton
    kernel as a custom op inside): the eager answers, with rows together and a slot decoding alone."""
    import visualglm
    from visualglm.generation.chat import make_engine

    path = reference_dir / "tiny-visualglm-hf"
    eager, tok = visualglm.load(path, device="cuda", dtype="float16", quantize=quant)
    graphed, _ = visualglm.load(path, device="cuda", dtype="float16", quantize=quant, compile=mode)
    want = _staggered(make_engine(eager, tok, max_batch_size=2), _two_requests(eager, tok, reference_dir))
    engine = make_engine(graphed, tok, max_batch_size=2)
    got = _staggered(engine, _two_requests(graphed, tok, reference_dir))
    assert got == want
    keys = set(engine._graphs._graphs)
    assert {(2, 256, True), (1, 256, False)} <= keys, keys  # both rows together, then slot 1 gathered
    item = (reference_dir / "chelsea.png", "描述这张图片。")
    assert graphed.chat(tok, *item, **GREEDY)[0] == eager.chat(tok, *item, **GREEDY)[0]
