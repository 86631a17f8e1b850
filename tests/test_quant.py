"""Weight-only INT8/INT4: the original's scheme and layout, the kernels, loading, saving and the CLI flag.

Quality on the reference fixtures' prompts (tiny reference model, float32):

* INT8 greedy answers equal full precision for the plain greedy runs (repetition penalty 1.0). With the
  sat penalty (1.2) the recorded top-1/top-2 margins go down to 0.02, far below INT8's logit error on this
  random 64-wide model, so there the check is margin-aware: along the full-precision greedy path, INT8
  picks the same token at every step whose margin exceeds twice INT8's logit error.
* Logit error bounds, relative L2 over the prompt logits: INT8 <= 3 %, INT4 <= 50 % (per-row INT4 on 64-wide
  rows of a random model is the worst case for the scheme: 15 levels per row; measured ~25-35 %).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import visualglm
from visualglm.config import QuantConfig, VisualGLMConfig
from visualglm.generation.chat import make_request, sampling_params
from visualglm.generation.engine import prompt_positions
from visualglm.quant import QuantizedEmbedding, QuantizedLinear, quant_config, quantize_model
from visualglm.quant.handlers import resolve_quant
from visualglm.quant.int4 import (
    _emulate_cpu_layout,
    cpu_block_rows,
    cpu_layout_rows,
    cpu_layout_to_int8,
    dequantize_int4,
    from_cpu_layout,
    pack_int4,
    quantize_int4,
    to_cpu_layout,
    unpack_int4,
)
from visualglm.quant.int8 import dequantize_int8, quantize_int8

INT8_REL_BOUND = 0.03
INT4_REL_BOUND = 0.5


# ----- the scheme -----------------------------------------------------------------------------------------
def test_int8_round_trip_per_row_symmetric():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 50, generator=g) * torch.linspace(0.01, 3, 37)[:, None]
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16 and q.shape == w.shape
    expected = (w.abs().amax(1) / 127).to(torch.float16)
    nonzero = torch.arange(37) != 5
    assert torch.equal(scale[nonzero], expected[nonzero])
    assert int(q.abs().max()) <= 127 and bool((q[5] == 0).all())
    err = (dequantize_int8(q, scale) - w).abs()
    assert bool((err <= scale.float()[:, None] * 0.5 + 1e-6).all())  # half a step at most


def test_int4_packing_layout_even_element_in_high_nibble():
    q = torch.tensor([[1, -2, 7, -8], [-1, 0, 3, 5]], dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.int8 and packed.shape == (2, 2)
    as_bytes = packed.view(torch.uint8).tolist()
    assert as_bytes == [[0x1E, 0x78], [0xF0, 0x35]]  # (q[2i] << 4) | (q[2i+1] & 0xF)
    assert torch.equal(unpack_int4(packed), q)


def test_int4_round_trip():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 64, generator=g)
    packed, scale = quantize_int4(w)
    assert packed.shape == (20, 32) and scale.dtype == torch.float16
    q = unpack_int4(packed)
    assert int(q.abs().max()) == 7 and int(q.min()) >= -7  # symmetric: -8 is never produced
    assert torch.equal(scale, (w.abs().amax(1) / 7).to(torch.float16))
    err = (dequantize_int4(packed, scale) - w).abs()
    assert bool((err <= scale.float()[:, None] * 0.5 + 1e-6).all())


def test_cpu_kernel_layout_is_inverted_exactly():
    """Our reading of torch's CPU int4 layout (blocks of 64 rows with AVX-512, 32 with AVX2, found by a probe);
    rows not a multiple of the block are padded."""
    block = cpu_block_rows()
    assert block in (64, 32, 16)  # every x86-64 / arm64 torch wheel has a vectorised int4 packer
    g = torch.Generator().manual_seed(2)
    q = torch.randint(-8, 8, (200, 96), generator=g, dtype=torch.int8)
    kernel = to_cpu_layout(pack_int4(q))
    assert kernel.shape == (-(-200 // block) * block, 48)
    assert torch.equal(cpu_layout_to_int8(kernel, 200), q)
    assert torch.equal(from_cpu_layout(kernel, 200), pack_int4(q))
    for lo, hi in ((0, 200), (5, 77), (64, 128), (190, 200)):  # unaligned row ranges read whole blocks
        assert torch.equal(cpu_layout_rows(kernel, lo, hi), q[lo:hi])


def test_cpu_layout_emulation_tells_block_sizes_apart():
    """The probe can only pick the right block size if the candidates' layouts differ on it."""
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    layouts = [_emulate_cpu_layout(q, b) for b in (64, 32, 16)]
    assert not any(torch.equal(a, b) for i, a in enumerate(layouts) for b in layouts[i + 1:])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert sum(torch.equal(packed, x) for x in layouts) == 1


# ----- the modules and kernels -----------------------------------------------------------------------------
@pytest.mark.parametrize("gemv", ["0", "1"])  # torch's CPU kernels / visualglm's (kernels/gemv.c)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])  # fused kernel (few rows) and dense path (many rows)
def test_quantized_linear_equals_dequantized_weight(bits, dtype, rows, gemv, monkeypatch):
    monkeypatch.setenv("VISUALGLM_CPU_GEMV", gemv)
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(96, 200).to(dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(200, 96, generator=g))
        lin.bias.copy_(torch.randn(200, generator=g))
    qlin = QuantizedLinear.from_linear(lin, bits)
    if bits == 4:  # visualglm's kernel reads the storage layout; torch's wants its own
        assert qlin.layout == ("storage" if gemv == "1" else "cpu_int4")
    x = torch.randn(rows, 2, 96, generator=g).to(dtype)
    with torch.no_grad():
        expected = F.linear(x.float(), qlin.dequantized(torch.float32), lin.bias.float())
        got = qlin(x)
    assert got.shape == (rows, 2, 200) and got.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 0.05 * float(expected.abs().max())
    assert float((got.float() - expected).abs().max()) <= tol


@pytest.mark.parametrize("bits", [8, 4])
def test_dense_path_in_row_blocks(bits, monkeypatch):
    """Many rows (or autograd) take the dense path, which casts the weight a block of rows at a time."""
    import visualglm.quant.int8 as int8_module

    monkeypatch.setattr(int8_module, "_DENSE_BLOCK_ELEMENTS", 64 * 96)  # 64-row blocks
    lin = torch.nn.Linear(96, 200)
    qlin = QuantizedLinear.from_linear(lin, bits)
    x = torch.randn(3, 96, requires_grad=True)  # autograd: never the fused kernel
    expected = F.linear(x.detach(), qlin.dequantized(torch.float32), lin.bias)
    assert torch.allclose(qlin(x), expected, atol=1e-4)


def test_quantized_linear_backward_to_inputs():
    lin = torch.nn.Linear(64, 32)
    qlin = QuantizedLinear.from_linear(lin, 4)
    x = torch.randn(2, 64, requires_grad=True)
    qlin(x).sum().backward()
    expected = qlin.dequantized(torch.float32).sum(0).expand(2, 64)
    assert torch.allclose(x.grad, expected, atol=1e-5)


@pytest.mark.parametrize("gemv", ["0", "1"])
def test_state_dict_is_the_storage_layout(gemv, monkeypatch):
    monkeypatch.setenv("VISUALGLM_CPU_GEMV", gemv)
    lin = torch.nn.Linear(64, 100)
    qlin = QuantizedLinear.from_linear(lin, 4)
    packed, _ = quantize_int4(lin.weight.detach())
    sd = qlin.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias"} and torch.equal(sd["weight"], packed)
    other = QuantizedLinear.from_linear(torch.nn.Linear(64, 100), 4)
    other.load_state_dict(sd)
    x = torch.randn(1, 64)
    assert torch.equal(other(x), qlin(x)) and other.layout == ("storage" if gemv == "1" else "cpu_int4")


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_embedding(bits):
    emb = torch.nn.Embedding(50, 16)
    qemb = QuantizedEmbedding.from_embedding(emb, bits)
    ids = torch.tensor([[0, 7, 49], [3, 3, 1]])
    weight = (dequantize_int8 if bits == 8 else dequantize_int4)(qemb.weight, qemb.weight_scale)
    assert torch.allclose(qemb(ids), weight[ids], atol=1e-6)


def test_bad_bits_and_shapes_are_rejected():
    with pytest.raises(ValueError, match="8 or 4"):
        QuantizedLinear(16, 16, bits=3)
    with pytest.raises(ValueError, match="even"):
        QuantizedLinear(15, 16, bits=4)
    with pytest.raises(ValueError, match="even number of columns"):
        quantize_int4(torch.randn(4, 5))
    with pytest.raises(ValueError, match="quant.bits"):
        QuantConfig(bits=2)
    with pytest.raises(ValueError, match="unknown quantization target"):
        QuantConfig(bits=8, targets=["glm", "everything"])
    with pytest.raises(ValueError, match="quantize must be 8 or 4"):
        quant_config(16)
    with pytest.raises(ValueError, match="needs a bit width"):
        quant_config(None, lm_head=True)
    with pytest.raises(ValueError, match="unknown quantization extra"):
        resolve_quant(QuantConfig(), 8, ["lm_head", "attention"])
    with pytest.raises(ValueError, match="already quantized"):
        resolve_quant(QuantConfig(bits=8), 4)


# ----- whole models on the fixtures ------------------------------------------------------------------------------
def _load(reference_dir, **kwargs):
    return visualglm.load(reference_dir / "tiny-visualglm-hf", device="cpu", dtype="float32", **kwargs)[0]


@pytest.fixture(scope="module")
def int8_model(reference_dir):
    return _load(reference_dir, quantize=8)


@pytest.fixture(scope="module")
def int4_model(reference_dir):
    return _load(reference_dir, quantize=4)


def _request(model, tok, reference_dir, case, penalty):
    image = reference_dir / case["image"] if case["image"] else None
    params = sampling_params(tok, english=case["english"], do_sample=False, repetition_penalty=penalty,
                             max_length=case["prompt_length"] + 24)
    return make_request(model, tok, image, case["query"], [tuple(h) for h in case["history_in"]], params,
                        case["english"])


@torch.no_grad()
def _sequence_logits(model, tok, request, generated: list[int]) -> torch.Tensor:
    """Logits that chose each of ``generated`` (teacher forcing, one full forward): (len(generated), V)."""
    ids = request.input_ids + generated[:-1]
    p0, p1, mask_pos = prompt_positions(request.input_ids, tok.bos_token_id,
                                        (tok.mask_token_id, tok.gmask_token_id))
    n = len(generated) - 1
    positions = torch.tensor([[p0 + [mask_pos] * n, p1 + list(range(p1[-1] + 1, p1[-1] + 1 + n))]])
    embeds = None if request.image is None else model.encode_image(request.image)
    out = model(torch.tensor([ids]), positions, context_lengths=torch.tensor([ids.index(tok.bos_token_id)]),
                image_embeds=embeds, image_offsets=None if embeds is None else torch.tensor([[0, request.pre_image]]))
    return out[0, len(request.input_ids) - 1:]


def test_quantized_modules_and_memory(reference_model, int8_model, int4_model):
    for model, bits in ((int8_model, 8), (int4_model, 4)):
        qkv = model.glm.layers[0].attention.query_key_value
        assert isinstance(qkv, QuantizedLinear) and qkv.bits == bits
        assert type(model.glm.lm_head) is torch.nn.Linear  # default: GLM block linears only
        assert type(model.vision.layers[0].attention.query_key_value) is torch.nn.Linear
        assert model.config.quant.bits == bits
    assert int4_model.glm.layers[0].mlp.dense_h_to_4h.weight.numel() * 2 == 64 * 256  # two values per byte


def test_int8_greedy_equals_full_precision(reference_model, int8_model, reference_dir, reference_cases):
    fp32, tok = reference_model
    for case in reference_cases:
        image = reference_dir / case["image"] if case["image"] else None
        history = [tuple(h) for h in case["history_in"]]
        kwargs = {"do_sample": False, "repetition_penalty": 1.0, "english": case["english"],
                  "max_length": case["prompt_length"] + 24}
        want = fp32.chat(tok, image, case["query"], history, **kwargs)[0]
        assert int8_model.chat(tok, image, case["query"], history, **kwargs)[0] == want, case["name"]


@pytest.mark.parametrize("penalty_index", [0, 1])
def test_int8_agrees_wherever_the_margin_allows(reference_model, int8_model, reference_dir, reference_cases,
                                                penalty_index):
    fp32, tok = reference_model
    decisive_steps = total_steps = 0
    for case in reference_cases:
        run = case["greedy"][penalty_index]
        request = _request(fp32, tok, reference_dir, case, run["repetition_penalty"])
        gen = run["generated_ids"]
        want, got = _sequence_logits(fp32, tok, request, gen), _sequence_logits(int8_model, tok, request, gen)
        # the sat penalty as applied at each step: ids generated before step i divided by the penalty
        seen = torch.zeros_like(want, dtype=torch.bool)
        for i in range(1, len(gen)):
            seen[i:, gen[i - 1]] = True
        pen = run["repetition_penalty"]
        want_p, got_p = torch.where(seen, want / pen, want), torch.where(seen, got / pen, got)
        for lo, hi in request.params.banned:
            want_p[:, lo:hi] = got_p[:, lo:hi] = float("-inf")
        top2 = want_p.topk(2, dim=-1).values
        margin = top2[:, 0] - top2[:, 1]
        err = (got - want).abs().max(dim=-1).values
        decisive = margin > 2 * err
        assert torch.equal(want_p.argmax(-1), torch.tensor(gen)), case["name"]  # the recorded path
        assert torch.equal(got_p.argmax(-1)[decisive], want_p.argmax(-1)[decisive]), case["name"]
        decisive_steps, total_steps = decisive_steps + int(decisive.sum()), total_steps + len(gen)
    assert decisive_steps >= total_steps // 5, "too few steps with a clear margin for the check to mean anything"


@torch.no_grad()
def test_logit_error_bounds(reference_model, int8_model, int4_model, reference_dir, reference_cases):
    fp32, tok = reference_model
    for case in reference_cases:
        request = _request(fp32, tok, reference_dir, case, 1.0)
        gen = case["greedy"][1]["generated_ids"]
        want = _sequence_logits(fp32, tok, request, gen)
        for model, bound in ((int8_model, INT8_REL_BOUND), (int4_model, INT4_REL_BOUND)):
            got = _sequence_logits(model, tok, request, gen)
            rel = float((got - want).norm() / want.norm())
            assert rel <= bound, (case["name"], rel)


def test_extras_lm_head_embeddings_vision(reference_model, reference_dir, reference_cases):
    fp32, tok = reference_model
    model = _load(reference_dir, quantize=4, quantize_extras=["lm_head", "embeddings", "vision"])
    assert model.config.glm.tie_word_embeddings  # HF layout: one matrix, quantized once (INT8)
    assert isinstance(model.glm.word_embeddings, QuantizedEmbedding) and model.glm.word_embeddings.bits == 8
    assert isinstance(model.glm.lm_head, QuantizedLinear) and model.glm.lm_head.weight is model.glm.word_embeddings.weight
    assert isinstance(model.vision.layers[0].mlp.dense_h_to_4h, QuantizedLinear)
    assert isinstance(model.qformer.layers[0].cross_attention.key_value, QuantizedLinear)
    assert type(model.glm_proj) is torch.nn.Linear
    assert not [k for k in model.state_dict() if k.startswith("glm.lm_head")]
    case = reference_cases[0]
    request = _request(fp32, tok, reference_dir, case, 1.0)
    gen = case["greedy"][1]["generated_ids"]
    want, got = _sequence_logits(fp32, tok, request, gen), _sequence_logits(model, tok, request, gen)
    assert float((got - want).norm() / want.norm()) <= INT4_REL_BOUND


@pytest.mark.parametrize("bits", [8, 4])
def test_convert_quantized_then_load_without_requantizing(reference_dir, tmp_path, bits):
    from visualglm.checkpoint.convert import convert

    src = reference_dir / "tiny-visualglm-hf"
    dst = convert(src, tmp_path / f"int{bits}", quantize=bits)
    record = json.loads((dst / "config.json").read_text())
    assert record["quant"] == {"bits": bits, "targets": ["glm"], "extra_bits": 8}
    dtypes = {}
    for f in dst.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            names = list(sf.keys())
            dtypes.update({k: sf.get_tensor(k).dtype for k in names})
    name = "glm.layers.1.mlp.dense_4h_to_h"
    assert dtypes[f"{name}.weight"] == torch.int8 and dtypes[f"{name}.weight_scale"] == torch.float16
    assert dtypes["glm.word_embeddings.weight"].is_floating_point  # not targeted: as stored

    import visualglm.quant.handlers as handlers

    calls = []
    original = handlers.quantize_tensor

    def spy(name, tensor, cfg):
        if tensor.is_floating_point() and handlers.weight_bits(name, tensor.shape, cfg):
            calls.append(name)
        return original(name, tensor, cfg)

    handlers.quantize_tensor = spy
    try:
        stored, tok = visualglm.load(dst, device="cpu", dtype="float32")
    finally:
        handlers.quantize_tensor = original
    assert calls == [], "a quantized checkpoint must load as stored"
    on_load = _load(reference_dir, quantize=bits)
    ids = torch.tensor([tok.encode("Q:hello\nA:")])
    pos = torch.stack([torch.arange(ids.shape[1]), torch.zeros(ids.shape[1], dtype=torch.long)])[None]
    with torch.no_grad():
        a = stored(ids, pos, context_lengths=torch.tensor([ids.shape[1]]))
        b = on_load(ids, pos, context_lengths=torch.tensor([ids.shape[1]]))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="already quantized"):
        visualglm.load(dst, device="cpu", dtype="float32", quantize=12 - bits)


def test_quantize_model_in_memory_matches_load(reference_dir):
    model = visualglm.load(reference_dir / "tiny-visualglm-hf", device="cpu", dtype="float32")[0]
    quantize_model(model, quant_config(8))
    loaded = _load(reference_dir, quantize=8)
    for (name, a), (_, b) in zip(sorted(model.state_dict().items()), sorted(loaded.state_dict().items()),
                                 strict=True):
        assert torch.equal(a, b), name


def test_quant_flag_on_the_command_line(reference_dir):
    import argparse

    from visualglm.commands.common import add_model_args, load_from_args

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    args = parser.parse_args(["--model", str(reference_dir / "tiny-visualglm-hf"), "--dtype", "float32",
                              "--device", "cpu", "--quant", "4", "--quant-extras", "vision"])
    model, _ = load_from_args(args)
    assert model.config.quant.bits == 4 and model.config.quant.targets == ["glm", "vision"]
    assert isinstance(model.glm.layers[2].attention.dense, QuantizedLinear)
    with pytest.raises(SystemExit):
        parser.parse_args(["--quant", "3"])


def test_random_config_quantizes_in_place():
    from visualglm.model.init import random_model

    model = random_model(VisualGLMConfig.from_name("tiny"), seed=0)
    quantize_model(model, quant_config(4, lm_head=True))
    assert isinstance(model.glm.lm_head, QuantizedLinear) and model.glm.lm_head.bits == 8
    assert type(model.glm.word_embeddings) is torch.nn.Embedding  # untied: the table stays float
    ids = torch.tensor([[5, 6, 130001, 130004]])
    pos = torch.tensor([[[0, 1, 2, 2], [0, 0, 0, 1]]])
    assert torch.isfinite(model(ids, pos, context_lengths=torch.tensor([3]))).all()
