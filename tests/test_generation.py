"""The generation loop: sampling semantics, limits, batching, streaming, KV cache and dtypes."""

from __future__ import annotations

import pytest
import torch

from visualglm.config import VisualGLMConfig
from visualglm.generation.chat import make_engine, make_request, sampling_params
from visualglm.generation.engine import PromptTooLongError
from visualglm.generation.sampling import RowSampler, SamplingParams, sample_rows
from visualglm.model.visualglm import VisualGLM

QUERIES = [("描述这张图片。", True), ("这是什么动物？", True), ("Hello, who are you?", False), ("Hi", False)]
GREEDY = {"top_k": 1, "temperature": 0.95, "repetition_penalty": 1.2}


def _sampler(vocab: int = 8, **kw) -> RowSampler:
    return RowSampler(SamplingParams(**kw), vocab, torch.device("cpu"))


def test_visualglm_6b_preset_has_the_released_parameter_count():
    with torch.device("meta"):
        model = VisualGLM(VisualGLMConfig.from_name("visualglm-6b"))
    assert sum(p.numel() for p in model.parameters()) == 7_802_193_408


def test_repetition_penalty_divides_negative_logits_too():
    """sat semantics: a generated id's logit is divided by the penalty, so a negative one moves UP."""
    logits = torch.tensor([[-1.0, -1.1, -5.0, -6.0]])
    row = _sampler(4, do_sample=False, repetition_penalty=2.0)
    assert sample_rows(logits, [row]).item() == 0
    row.observe(1)  # -1.1 / 2 = -0.55 now beats -1.0
    assert sample_rows(logits, [row]).item() == 1
    row.observe(1)  # each id is penalised once, however often it occurred
    assert row.generated.sum().item() == 1


def test_banned_ranges_top_k_top_p_and_seed():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0, -1.0, -2.0, 9.0, 8.0]])
    assert sample_rows(logits, [_sampler(do_sample=False, banned=((6, 8),))]).item() == 0
    # top_k=2 keeps ids {6, 7}; many seeded draws never leave them and hit both
    draws = {sample_rows(logits, [_sampler(top_k=2, top_p=1.0, temperature=1.0, seed=s)]).item() for s in range(40)}
    assert draws == {6, 7}
    # top_p: p(6) = e^9 / (e^9 + e^8 + ...) ~ 0.73 > 0.5, so only id 6 survives the nucleus
    assert {sample_rows(logits, [_sampler(top_k=0, top_p=0.5, seed=s)]).item() for s in range(20)} == {6}
    a = [sample_rows(logits, [_sampler(top_k=8, top_p=1.0, temperature=2.0, seed=7)]).item() for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw
    # temperature 0 means greedy even with do_sample=True
    assert sample_rows(logits, [_sampler(temperature=0.0)]).item() == 6


def test_sampling_rows_are_independent_of_batching():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = {"top_k": 20, "top_p": 0.9, "temperature": 1.0}
    alone = [sample_rows(logits[i:i + 1], [_sampler(50, seed=i, **params)]).item() for i in range(3)]
    together = sample_rows(logits, [_sampler(50, seed=i, **params) for i in range(3)]).tolist()
    assert alone == together


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"max_length": 0}, "max_length"), ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_prompt_longer_than_max_length_is_a_clear_error(reference_model, reference_dir):
    model, tok = reference_model
    with pytest.raises(PromptTooLongError, match=r"the prompt is 49 tokens.*max_length=49"):
        model.chat(tok, reference_dir / "chelsea.png", "描述这张图片。", max_length=49)
    response, _ = model.chat(tok, reference_dir / "chelsea.png", "描述这张图片。", max_length=50, do_sample=False)
    assert response == "头"  # exactly one token: the reference's first greedy token for this prompt


def test_max_new_tokens_and_stop_strings(reference_model):
    model, tok = reference_model
    full, _ = model.chat(tok, None, "Hello, who are you?", english=True, do_sample=False, max_length=40)
    short, _ = model.chat(tok, None, "Hello, who are you?", english=True, do_sample=False, max_new_tokens=3)
    assert full.startswith(short) and len(short) < len(full)
    word = full.split()[1]
    stopped, history = model.chat(tok, None, "Hello, who are you?", english=True, do_sample=False,
                                  max_length=40, stop=[word])
    assert stopped == full[: full.index(word)] and history[-1] == ("Hello, who are you?", stopped)


def test_stream_chat_grows_to_the_chat_answer(reference_model, reference_dir):
    model, tok = reference_model
    image = reference_dir / "chelsea.png"
    settings = {**GREEDY, "repetition_penalty": 1.0, "max_length": 70}
    chunks = list(model.stream_chat(tok, image, "这是什么动物？", **settings))
    texts = [c[0] for c in chunks]
    assert len(texts) > 3 and all(b.startswith(a) or len(b) >= len(a) for a, b in zip(texts, texts[1:], strict=False))
    final, history = model.chat(tok, image, "这是什么动物？", **settings)
    assert texts[-1] == final and chunks[-1][1] == history == [("这是什么动物？", final)]


def test_batched_generation_equals_one_by_one(reference_model, reference_dir):
    """Left-padded batch of mixed image/text prompts of different lengths: same greedy answers."""
    model, tok = reference_model
    image = reference_dir / "chelsea.png"
    items = [(image if with_image else None, q) for q, with_image in QUERIES]
    items.append((image, "这是什么动物？", [("描述这张图片。", "一只猫。")]))
    alone = [model.chat(tok, *item, max_length=90, english=False, **GREEDY)[0] for item in items]
    batched = model.batch_chat(tok, items, max_length=90, english=False, **GREEDY)
    assert [r for r, _ in batched] == alone
    assert batched[-1][1] == [("描述这张图片。", "一只猫。"), ("这是什么动物？", alone[-1])]


def test_requests_joining_mid_decode_give_the_same_answers(reference_model, reference_dir):
    """Continuous batching: a request admitted while others decode changes nobody's greedy tokens."""
    model, tok = reference_model
    params = sampling_params(tok, max_length=70, do_sample=False)
    reqs = [make_request(model, tok, reference_dir / "chelsea.png" if img else None, q, None, params, False)
            for q, img in QUERIES[:3]]
    engine = make_engine(model, tok, max_batch_size=3)

    def run_alone(r):
        out = [engine.add([r])[0]]
        while not engine.slots[0].done:
            out.append(engine.step()[0])
        engine.finish(0)
        return out

    alone = [run_alone(r) for r in reqs]
    got: dict[int, list[int]] = {}
    for slot, tok_id in engine.add([reqs[0]]).items():
        got[slot] = [tok_id]
    step = 0
    while engine.slots or step <= 2:
        step += 1
        if step == 2:
            for slot, tok_id in engine.add([reqs[1], reqs[2]]).items():
                got[slot] = [tok_id]
        for slot, tok_id in engine.step().items():
            got[slot].append(tok_id)
        engine.release_finished()
    assert [got[s] for s in sorted(got)] == alone


def test_kv_cache_decoding_equals_full_recompute(reference_model):
    model, tok = reference_model
    req = make_request(model, tok, None, "Hello, who are you?", None, sampling_params(tok, max_length=30,
                                                                                         do_sample=False), True)
    engine = make_engine(model, tok)
    captured: list[torch.Tensor] = []
    engine.logits_observer = lambda _slots, logits: captured.append(logits.clone())
    ids = [engine.add([req])[0]]
    for _ in range(5):
        ids.append(engine.step()[0])
    engine.logits_observer = None
    engine.finish(0)
    seq = req.input_ids + ids[:-1]
    n, ctx = len(req.input_ids), len(req.input_ids) - 1
    pos = list(range(ctx)) + [ctx - 1] * (len(seq) - ctx)
    block = [0] * ctx + list(range(1, len(seq) - ctx + 1))
    with torch.inference_mode():
        full = model(torch.tensor([seq]), torch.tensor([[pos, block]]), context_lengths=torch.tensor([ctx]))
    for i, step_logits in enumerate(captured):
        assert (full[0, n - 1 + i] - step_logits[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_close_to_float32(reference_model, dtype):
    model32, tok = reference_model
    from visualglm.model.init import random_model

    model = random_model(model32.config, dtype=dtype)
    model.load_state_dict(model32.state_dict())
    ids = torch.tensor([tok.encode("Hello, who are you?")])
    n = ids.shape[1]
    pos = torch.tensor([[list(range(n - 1)) + [n - 2], [0] * (n - 1) + [1]]])
    with torch.inference_mode():
        ref = model32(ids, pos, context_lengths=torch.tensor([n - 1]), logits="last")
        low = model(ids, pos, context_lengths=torch.tensor([n - 1]), logits="last")
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    response, _ = model.chat(tok, None, "Hello", english=True, max_length=20, do_sample=False)
    assert isinstance(response, str)


def test_follow_up_turns_reuse_the_image_embedding(reference_model, reference_dir, monkeypatch):
    model, tok = reference_model
    calls = []
    encode = model.encode_image
    monkeypatch.setattr(model, "encode_image", lambda px: (calls.append(1), encode(px))[1])
    image = reference_dir / "chelsea.png"
    _, history = model.chat(tok, image, "描述这张图片。", max_length=60, do_sample=False)
    model.chat(tok, image, "这是什么动物？", history, max_length=90, do_sample=False)
    assert len(calls) <= 1  # at most once: an earlier test may already have cached this image


def test_concurrent_chats_from_threads_do_not_interfere(reference_model, reference_dir):
    import threading

    model, tok = reference_model
    jobs = [(reference_dir / "chelsea.png", "描述这张图片。", False), (None, "Hello, who are you?", True)] * 2
    expected = [model.chat(tok, img, q, english=en, max_length=70, do_sample=False)[0] for img, q, en in jobs]
    results: list[str | None] = [None] * len(jobs)

    def work(i: int) -> None:
        img, q, en = jobs[i]
        results[i] = model.chat(tok, img, q, english=en, max_length=70, do_sample=False)[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected


def test_compiled_decode_gives_the_eager_answers(reference_model, reference_dir):
    """``load(compile=True)`` (``--compile``): every engine of the model runs its decode step through
    torch.compile, with the same greedy answers, one request or a batch of mixed lengths."""
    import visualglm

    model, tok = reference_model
    compiled, _ = visualglm.load(reference_dir / "tiny-visualglm-hf", device="cpu", dtype="float32", compile=True)
    engine = make_engine(compiled, tok)
    assert engine._decode is not compiled and hasattr(engine._decode, "_orig_mod")  # torch.compile's wrapper
    assert not hasattr(make_engine(model, tok)._decode, "_orig_mod")
    image = reference_dir / "chelsea.png"
    items = [(image, "描述这张图片。"), (None, "Hello, who are you?")]
    want = [model.chat(tok, *item, max_length=80, **GREEDY)[0] for item in items]
    assert compiled.chat(tok, *items[0], max_length=80, **GREEDY)[0] == want[0]
    assert [r for r, _ in compiled.batch_chat(tok, items, max_length=80, **GREEDY)] == want


def test_bucketed_key_length_gives_the_same_logits(reference_model, reference_dir):
    """CUDA graphs decode with a key length rounded up to a bucket (the mask hides the unwritten positions):
    the same step without capture must give the exact-length logits, one request and a batch of two."""
    from conftest import decode_to_end
    from visualglm.generation.chat import _run
    from visualglm.generation.cuda_graphs import BUCKET, DecodeGraphs

    model, tok = reference_model
    assert DecodeGraphs.key_length(1, 1024) == BUCKET and DecodeGraphs.key_length(BUCKET + 1, 300) == 300
    params = sampling_params(tok, max_length=60, do_sample=False)
    request = make_request(model, tok, reference_dir / "chelsea.png", "描述这张图片。", None, params, False)
    exact_ids, exact = decode_to_end(make_engine(model, tok), request)
    bucketed = make_engine(model, tok)
    bucketed._graphs = DecodeGraphs(model, capture=False)
    ids, logits = decode_to_end(bucketed, request)
    assert bucketed.cache.capacity == BUCKET  # the bucket reached past every written position
    assert ids == exact_ids and (logits - exact).abs().max().item() < 1e-4
    items = [(None, "Hello, who are you?"), (reference_dir / "chelsea.png", "这是什么动物？")]
    want = [model.chat(tok, *item, max_length=70, do_sample=False)[0] for item in items]
    engine = make_engine(model, tok, max_batch_size=2)
    engine._graphs = DecodeGraphs(model, capture=False)
    reqs = [make_request(model, tok, img, q, None, sampling_params(tok, max_length=70, do_sample=False), False)
            for img, q in items]
    *_, (answers, _) = _run(engine, tok, reqs, False)
    assert answers == want
