"""LoRA / QLoRA / P-tuning modules, adapter folders (PEFT layout), merging, ``load(adapter=)``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import visualglm
from visualglm.checkpoint.write import write_checkpoint
from visualglm.cli import main as cli_main
from visualglm.config import VisualGLMConfig
from visualglm.model.init import random_model
from visualglm.peft import LoRAConfig, LoRALinear, PTuningConfig, apply_lora, apply_ptuning, merge_lora
from visualglm.peft.adapters import (
    AdapterError,
    attach_adapter,
    from_peft_key,
    get_adapter_params,
    lora_config_record,
    ptuning_config_record,
    save_adapter,
    to_peft_key,
)
from visualglm.peft.lora import find_targets, is_nf4


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer_dir):
    """A random tiny model written as our checkpoint folder (float32, with the tokenizer)."""
    model = random_model(VisualGLMConfig.from_name("tiny"), seed=3)
    folder = tmp_path_factory.mktemp("peft") / "base"
    write_checkpoint(folder, model.config, model.state_dict().items(), tokenizer_dir=tokenizer_dir)
    return folder


def _inputs(seed: int = 0, batch: int = 2, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 20000, (batch, length), generator=g)
    pos = torch.zeros(batch, 2, length, dtype=torch.long)
    pos[:, 0] = torch.arange(length).clamp(max=length - 3)
    pos[:, 1, length - 2:] = torch.arange(1, 3)
    ctx = torch.full((batch,), length - 2)
    return ids, pos, ctx


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids, pos, ctx = _inputs(seed)
    with torch.no_grad():
        return model(ids, pos, context_lengths=ctx)


def _randomize_adapters(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in get_adapter_params(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_lora_linear_starts_as_base_and_merges_exactly():
    base = nn.Linear(16, 24)
    lora = LoRALinear.from_linear(base, rank=4, alpha=8.0)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(lora(x), base(x), rtol=0, atol=0)  # B = 0 at start
    with torch.no_grad():
        lora.lora_b.weight.normal_()
    assert not torch.allclose(lora(x), base(x))
    merged = nn.Linear(16, 24)
    merged.weight.data, merged.bias.data = lora.merged_weight(), lora.bias.data
    torch.testing.assert_close(merged(x), lora(x), rtol=0, atol=1e-5)
    assert set(dict(lora.named_parameters())) == {"weight", "bias", "lora_a.weight", "lora_b.weight"}


def test_default_targets_cover_all_glm_layers_and_layers_filter(tiny_model):
    names = find_targets(tiny_model, LoRAConfig())
    n = tiny_model.config.glm.num_layers
    assert sorted(names) == sorted(f"glm.layers.{i}.attention.{m}" for i in range(n)
                                   for m in ("query_key_value", "dense"))
    original = find_targets(tiny_model, LoRAConfig(layers=[0, 2]))
    assert sorted(original) == sorted(f"glm.layers.{i}.attention.{m}" for i in (0, 2)
                                      for m in ("query_key_value", "dense"))
    mlp_qformer = find_targets(tiny_model, LoRAConfig(targets=["glm.mlp", "qformer.attention", "glm_proj"]))
    assert "glm.layers.1.mlp.dense_4h_to_h" in mlp_qformer and "glm_proj" in mlp_qformer
    assert "qformer.layers.3.attention.query_key_value" in mlp_qformer
    with pytest.raises(ValueError, match="matches no Linear"):
        find_targets(tiny_model, LoRAConfig(targets=["glm.attn"]))
    with pytest.raises(ValueError, match="out of range"):
        find_targets(tiny_model, LoRAConfig(layers=[0, 14]))


def test_base_checkpoint_names_unchanged_by_lora(tiny_model):
    before = set(tiny_model.state_dict())
    apply_lora(tiny_model, LoRAConfig(rank=2))
    after = set(tiny_model.state_dict())
    assert before <= after
    assert all(".lora_" in k for k in after - before)


def test_peft_key_names_round_trip(tiny_model):
    apply_lora(tiny_model, LoRAConfig(rank=2, targets=["glm.attention", "qformer.cross_attention", "glm_proj"]))
    apply_ptuning(tiny_model, PTuningConfig(pre_seq_len=3))
    for name in get_adapter_params(tiny_model):
        assert from_peft_key(to_peft_key(name)) == name
    assert to_peft_key("glm.layers.0.attention.query_key_value.lora_a.weight") == \
        "base_model.model.transformer.layers.0.attention.query_key_value.lora_A.weight"
    assert to_peft_key("glm.prefix_encoder.embedding.weight") == "prompt_embeddings"


def test_lora_adapter_save_load_and_merge_cli_equal(tiny_ckpt, tmp_path):
    model, _ = visualglm.load(tiny_ckpt, device="cpu", dtype="float32")
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=["glm.attention", "glm.mlp", "qformer.attention", "glm_proj"])
    names = apply_lora(model, cfg)
    _randomize_adapters(model)
    expected = _logits(model)
    adapter = save_adapter(model, tmp_path / "adapter", lora_config_record(cfg, names, str(tiny_ckpt), "lora"))
    record = json.loads((adapter / "adapter_config.json").read_text())
    assert record["peft_type"] == "LORA" and record["r"] == 4 and record["base_model_name_or_path"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        assert all(k.startswith("base_model.model.") for k in f.keys())  # noqa: SIM118

    # load(adapter=) without the base path: the adapter records it
    again, _ = visualglm.load(None, device="cpu", dtype="float32", adapter=adapter)
    torch.testing.assert_close(_logits(again), expected, rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(visualglm.load(tiny_ckpt, device="cpu", dtype="float32")[0]), expected)

    # in-memory merge
    torch.testing.assert_close(_logits(merge_lora(again)), expected, rtol=0, atol=1e-5)

    # merge-lora CLI (base taken from the adapter) -> standalone checkpoint equal to base + adapter
    assert cli_main(["merge-lora", str(adapter), str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged, _ = visualglm.load(tmp_path / "merged", device="cpu", dtype="float32")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-5)
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(merged.encode_image(pixels), again.encode_image(pixels), rtol=0, atol=1e-5)
    # explicit BASE ADAPTER OUT form
    assert cli_main(["merge-lora", str(tiny_ckpt), str(adapter), str(tmp_path / "merged2")]) == 0


def test_qlora_base_is_nf4_and_trains_on_cpu(tiny_model):
    reference = _logits(tiny_model)
    apply_lora(tiny_model, LoRAConfig(rank=4, quantize_base=True), adapter_dtype=torch.float32)
    glm_weights = {n: p for n, p in tiny_model.named_parameters() if n.startswith("glm.layers.")
                   and n.endswith("weight") and p.dim() == 2 and ".lora_" not in n}
    assert glm_weights and all(is_nf4(p) for p in glm_weights.values())
    assert not is_nf4(tiny_model.glm.lm_head.weight) and not is_nf4(tiny_model.glm_proj.weight)
    quantized = _logits(tiny_model)
    assert (quantized - reference).abs().max() < 0.5 * reference.abs().max()  # 4-bit: close, not equal
    params = list(get_adapter_params(tiny_model).values())
    for n, p in tiny_model.named_parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, pos, ctx = _inputs()
    losses = []
    for _ in range(5):
        logits = tiny_model(ids, pos, context_lengths=ctx)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(is_nf4(p) for n, p in tiny_model.named_parameters() if n in glm_weights)


def test_prefix_encoder_shapes_and_effect(tiny_model):
    reference = _logits(tiny_model)
    enc = apply_ptuning(tiny_model, PTuningConfig(pre_seq_len=5))
    kv = enc(2)
    g = tiny_model.config.glm
    assert len(kv) == g.num_layers
    assert all(k.shape == v.shape == (2, g.num_heads, 5, g.head_dim) for k, v in kv)
    assert not torch.allclose(_logits(tiny_model), reference)
    assert list(get_adapter_params(tiny_model)) == ["glm.prefix_encoder.embedding.weight"]


def test_ptuning_adapter_loads_and_generates_with_cache(tiny_ckpt, tmp_path):
    model, tok = visualglm.load(tiny_ckpt, device="cpu", dtype="float32")
    enc = apply_ptuning(model, PTuningConfig(pre_seq_len=4), seed=5)
    expected = _logits(model)
    folder = save_adapter(model, tmp_path / "prefix", ptuning_config_record(enc, str(tiny_ckpt)))
    record = json.loads((folder / "adapter_config.json").read_text())
    assert record["peft_type"] == "PREFIX_TUNING" and record["num_virtual_tokens"] == 4
    loaded, tok = visualglm.load(tiny_ckpt, device="cpu", dtype="float32", adapter=folder)
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-6)

    # the KV-cached generation path sees the prefix too: greedy ids equal a full recomputation's argmax
    image = torch.randn(1, 3, 224, 224)
    from visualglm.generation.chat import make_engine, make_request, sampling_params
    params = sampling_params(tok, do_sample=False, repetition_penalty=1.0, max_new_tokens=4)
    request = make_request(loaded, tok, image, "描述这张图片。", [], params, english=False)
    engine = make_engine(loaded, tok)
    slot = next(iter(engine.add([request])))
    while not engine.slots[slot].done:
        engine.step()
    generated = engine.slots[slot].generated
    ids = list(request.input_ids)
    with torch.no_grad():
        embeds = loaded.encode_image(image)
        for tok_id in generated:
            n = len(ids)
            c = ids.index(tok.bos_token_id)
            pos = torch.zeros(1, 2, n, dtype=torch.long)
            pos[0, 0] = torch.arange(n).clamp(max=c - 1)
            pos[0, 1, c:] = torch.arange(1, n - c + 1)
            logits = loaded(torch.tensor([ids]), pos, context_lengths=torch.tensor([c]), image_embeds=embeds,
                            image_offsets=torch.tensor([[0, request.pre_image]]), logits="last")
            assert int(logits[0, -1].argmax()) == tok_id
            ids.append(tok_id)


def test_attach_adapter_rejects_mismatch(tiny_ckpt, tmp_path):
    model, _ = visualglm.load(tiny_ckpt, device="cpu", dtype="float32")
    enc = apply_ptuning(model, PTuningConfig(pre_seq_len=2))
    folder = save_adapter(model, tmp_path / "p", ptuning_config_record(enc, None))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["num_layers"] = 28
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    fresh, _ = visualglm.load(tiny_ckpt, device="cpu", dtype="float32")
    with pytest.raises(AdapterError, match="layers, heads, hidden"):
        attach_adapter(fresh, folder)
    with pytest.raises(AdapterError, match="records no base"):
        visualglm.load(None, adapter=folder)
