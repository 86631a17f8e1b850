"""``visualglm bench`` runs end to end and reports what the issue asks for (correctness only: no timings)."""

from __future__ import annotations

import json

import pytest
import torch

from visualglm.bench import BenchOptions, decode_bytes_per_token, random_model_streamed
from visualglm.cli import main
from visualglm.config import VisualGLMConfig
from visualglm.quant import quant_config

REQUIRED = ("roofline_ratio", "peak_rss_gb", "bandwidth_gbs", "decode_tokens_per_s", "prefill_s",
            "image_encode_s", "weight_bytes_per_token", "decode")


def _bench(capsys, *args: str) -> dict:
    assert main(["bench", "--model", "tiny", "--max-new-tokens", "2", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_json_has_the_required_keys(capsys):
    r = _bench(capsys)
    for key in REQUIRED:
        assert key in r, key
    assert set(r["decode"]) == {"1", "8", "32"}
    assert r["roofline_ratio"] > 0 and r["peak_rss_gb"] > 0 and r["bandwidth_gbs"] > 0
    assert r["decode"]["32"]["batch"] == 32 and r["decode"]["1"]["prompt_tokens"] == 64
    assert r["quant"] is None and r["tied_lm_head"] is True


def test_bench_quantized_random_model(capsys):
    r = _bench(capsys, "--quant", "4", "--quant-extras", "lm_head,vision", "--batch-sizes", "1,2", "--no-image")
    assert r["quant"] == {"bits": 4, "targets": ["glm", "lm_head", "vision"], "extra_bits": 8}
    assert "image_encode_s" not in r and set(r["decode"]) == {"1", "2"}


def test_bench_checkpoint_and_small_vocabulary(capsys, reference_dir):
    """A checkpoint's prompts use its tokenizer's special ids; a named config with its own small vocabulary
    (the demo's) gets ids inside it."""
    args = ["bench", "--max-new-tokens", "2", "--json", "--batch-sizes", "1", "--no-image"]
    assert main([*args, "--model", str(reference_dir / "tiny-visualglm-hf"), "--quant", "8"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["weights"] == "checkpoint" and r["quant"]["bits"] == 8 and r["decode"]["1"]["decode_steps"] == 1
    assert main([*args, "--model", "visualglm-demo"]) == 0
    assert json.loads(capsys.readouterr().out)["decode"]["1"]["tokens_per_s"] > 0


def test_bench_rejects_bad_options(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", "tiny", "--max-new-tokens", "1"])
    with pytest.raises(SystemExit):
        main(["bench", "--model", "tiny", "--batch-sizes", "1,x"])


def test_bytes_per_token_counts_the_decode_path():
    """Float tiny model: every GLM tensor except the (tied) table is read once, the table as lm_head."""
    cfg = VisualGLMConfig.from_name("tiny")
    cfg.glm.tie_word_embeddings = True
    model = random_model_streamed(cfg, dtype=torch.float32, device=torch.device("cpu"))
    expected = sum(p.numel() * 4 for p in model.glm.parameters())  # parameters() yields a tied tensor once
    assert decode_bytes_per_token(model) == expected
    cfg.quant = quant_config(8)
    q = random_model_streamed(cfg, dtype=torch.float32, device=torch.device("cpu"))
    layer_bytes = sum(t.numel() * t.element_size() for t in q.glm.layers.state_dict().values())
    assert decode_bytes_per_token(q) == expected - sum(p.numel() * 4 for p in model.glm.layers.parameters()) + layer_bytes


def test_options_defaults_match_the_issue():
    opts = BenchOptions()
    assert opts.model == "visualglm-6b" and opts.batch_sizes == (1, 8, 32) and opts.prompt_len == 64
