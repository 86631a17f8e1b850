"""Fine-tuning: data built like the original, bad records, every method learns, exact resume, outputs, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import visualglm
from visualglm.checkpoint.write import write_checkpoint
from visualglm.cli import main as cli_main
from visualglm.config import VisualGLMConfig
from visualglm.finetune.config import from_dict
from visualglm.finetune.data import IGNORE, DataError, build_sample, collate, load_samples
from visualglm.finetune.recipe import FinetuneRecipe, LossModule
from visualglm.model.init import random_model
from visualglm.peft.lora import is_nf4

RECORDS = [
    {"img": "red.png", "prompt": "图片是什么颜色？", "label": "红色。"},
    {"img": "blue.png", "prompt": "What color is the image?", "label": "Blue."},
    {"img": "green.png", "prompt": "图片是什么颜色？", "label": "绿色。"},
    {"img": "red.png", "prompt": "Describe the image.", "label": "A red picture."},
]


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tokenizer_dir) -> Path:
    model = random_model(VisualGLMConfig.from_name("tiny"), seed=7)
    folder = tmp_path_factory.mktemp("ft") / "base"
    write_checkpoint(folder, model.config, model.state_dict().items(), tokenizer_dir=tokenizer_dir)
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for name, rgb in (("red", (230, 20, 20)), ("blue", (20, 20, 230)), ("green", (20, 200, 20))):
        Image.new("RGB", (40, 30), rgb).save(folder / f"{name}.png")
    (folder / "train.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    from visualglm.tokenizer import ChatGLMTokenizer
    return ChatGLMTokenizer.from_dir(tokenizer_dir)


def _cfg(tiny_ckpt: Path, data_dir: Path, out: Path, method: str, **train) -> object:
    lr = {"lora": 2e-2, "qlora": 2e-2, "ptuning": 0.3, "full": 3e-3}[method]
    t = {"steps": 6, "batch_size": 4, "micro_batch_size": 2, "progress": False, "eval_generate": False, **train}
    return from_dict({"method": method, "model": str(tiny_ckpt), "output_dir": str(out),
                      "data": {"train": str(data_dir / "train.json")}, "lora": {"rank": 4},
                      "optim": {"lr": lr, "warmup_steps": 0}, "train": t})


# ----- data -------------------------------------------------------------------------------------------------
def _original_sample(tok, prompt: str, label: str) -> tuple[list[int], list[int], int]:
    """The construction in THUDM/VisualGLM-6B finetune_visualglm.py (FewShotDataset), written out."""
    input0 = tok.encode("<img>", add_special_tokens=False)
    input1 = [tok.pad_token_id] * 32
    input2 = tok.encode("</img>问：" + prompt + "\n答：", add_special_tokens=False)
    a_ids = input0 + input1 + input2
    b_ids = tok.encode(label, add_special_tokens=False)
    input_ids = tok.build_inputs_with_special_tokens(a_ids, b_ids)
    context_length = input_ids.index(tok.bos_token_id)
    labels = [-100] * context_length + input_ids[context_length:]
    return input_ids, labels, len(input0)


def _sat_position_ids(ids: list[int], bos: int) -> torch.Tensor:
    """sat ChatGLM get_position_ids (2-D): positions with the [gMASK] index from <sop> on; block 0 then 1, 2..."""
    n, c = len(ids), ids.index(bos)
    pos = torch.arange(n)
    pos[c:] = c - 1
    block = torch.cat([torch.zeros(c, dtype=torch.long), torch.arange(1, n - c + 1)])
    return torch.stack([pos, block])[None]  # (1, 2, n)


def test_sample_matches_original_construction_and_loss(tok, data_dir, reference_model):
    model, _ = reference_model
    sample = build_sample(tok, "这是什么动物？", [], "这是一只猫。", english=False, image=data_dir / "red.png",
                          image_length=32)
    ids, labels, pre_image = _original_sample(tok, "这是什么动物？", "这是一只猫。")
    assert sample.input_ids == ids and sample.labels == labels and sample.pre_image == pre_image
    assert sample.input_ids[sample.mask_position] == tok.gmask_token_id
    assert sample.input_ids[sample.context_length] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # loss on <sop> (predicted from [gMASK]), the answer and <eop> only
    assert sample.num_targets == len(ids) - sample.context_length

    batch = collate([sample], tok.pad_token_id, images=None)
    assert torch.equal(batch.position_ids, _sat_position_ids(ids, tok.bos_token_id))
    embeds = torch.randn(1, 32, model.config.glm.hidden_size)
    offsets = torch.tensor([[0, pre_image]])
    with torch.no_grad():
        logits = model(torch.tensor([ids]), _sat_position_ids(ids, tok.bos_token_id),
                       context_lengths=torch.tensor([sample.context_length]), image_embeds=embeds,
                       image_offsets=offsets)
        original = F.cross_entropy(logits[0, :-1], torch.tensor(labels[1:]), ignore_index=-100)
        ours = LossModule(model)(batch.input_ids, batch.position_ids, batch.context_lengths, batch.targets,
                                 image_offsets=offsets, image_embeds=embeds) / batch.num_targets
    torch.testing.assert_close(ours, original, rtol=1e-5, atol=1e-5)


def test_right_padding_does_not_change_targets(tok):
    a = build_sample(tok, "Q1?", [], "short", english=True, image=None, image_length=32)
    b = build_sample(tok, "A much longer question here?", [], "a longer answer", english=True, image=None,
                     image_length=32)
    batch = collate([a, b], tok.pad_token_id, images=None)
    assert batch.num_targets == a.num_targets + b.num_targets
    row = batch.targets[0]
    assert row[: a.context_length - 1].eq(IGNORE).all() and row[len(a.input_ids) - 1:].eq(IGNORE).all()
    assert row[a.context_length - 1].item() == tok.bos_token_id


def test_jsonl_and_multiturn_records(tok, data_dir, tmp_path):
    conv = {"image": str(data_dir / "red.png"), "conversations": [
        {"from": "human", "value": "<image>\n图片是什么颜色？"}, {"from": "gpt", "value": "红色。"},
        {"from": "human", "value": "What shape?"}, {"from": "gpt", "value": "A rectangle."}]}
    text = json.dumps(RECORDS[1], ensure_ascii=False) + "\n\n" + json.dumps(conv, ensure_ascii=False) + "\n"
    (tmp_path / "imgs").mkdir()
    shutil.copy(data_dir / "blue.png", tmp_path / "imgs" / "blue.png")
    (tmp_path / "d.jsonl").write_text(text, encoding="utf-8")
    samples = load_samples(tmp_path / "d.jsonl", tok, image_length=32, max_length=512,
                           image_root=tmp_path / "imgs")
    assert [s.query for s in samples] == ["What color is the image?", "图片是什么颜色？", "What shape?"]
    assert [s.english for s in samples] == [True, False, True]
    assert samples[2].history == [("图片是什么颜色？", "红色。")] and samples[2].where.endswith(":3")
    assert samples[0].image == tmp_path / "imgs" / "blue.png"
    turn2 = build_sample(tok, "What shape?", [("图片是什么颜色？", "红色。")], "A rectangle.", english=True,
                         image=samples[2].image, image_length=32)
    assert samples[2].input_ids == turn2.input_ids


def test_bad_records_are_all_reported_before_training(tok, data_dir, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    shutil.copy(data_dir / "red.png", tmp_path / "red.png")
    lines = [
        json.dumps({"img": "red.png", "prompt": "ok?", "label": "fine"}),
        '{"img": "red.png", "prompt": "unterminated',
        json.dumps({"img": "missing.png", "prompt": "q", "label": "a"}),
        json.dumps({"img": "broken.png", "prompt": "q", "label": "a"}),
        json.dumps({"img": "red.png", "prompt": "q", "label": "  "}),
        json.dumps({"img": "red.png", "prompt": "q", "label": "word " * 300}),
        json.dumps({"image": "red.png", "conversations": [{"from": "human", "value": "hi"}]}),
        json.dumps({"img": "red.png", "label": "no prompt"}),
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_samples(tmp_path / "bad.jsonl", tok, image_length=32, max_length=256)
    where = dict(err.value.problems)
    f = str(tmp_path / "bad.jsonl")
    assert set(where) == {f"{f}:{n}" for n in range(2, 9)}
    assert "bad JSON" in where[f"{f}:2"] and "image not found" in where[f"{f}:3"]
    assert "unreadable image" in where[f"{f}:4"] and "empty label" in where[f"{f}:5"]
    assert "too long" in where[f"{f}:6"] and "no gpt answer" in where[f"{f}:7"]
    assert "'prompt' is missing" in where[f"{f}:8"]
    warnings: list[str] = []
    kept = load_samples(tmp_path / "bad.jsonl", tok, image_length=32, max_length=256, skip_bad=True,
                        warn=warnings.append)
    assert len(kept) == 1 and "skipped 7 bad record(s) of 8" in warnings[0]
    (tmp_path / "list.json").write_text('[{"img": "red.png", "prompt": "q", "label": "a"}, 3]')
    with pytest.raises(DataError, match=r"list\.json\[1\]: a record must be a JSON object"):
        load_samples(tmp_path / "list.json", tok, image_length=32, max_length=256)


# ----- methods ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "qlora", "ptuning", "full"])
def test_each_method_reduces_loss(method, tiny_ckpt, data_dir, tmp_path):
    recipe = FinetuneRecipe(_cfg(tiny_ckpt, data_dir, tmp_path / method, method), log=lambda m: None).setup()
    base = {n: p.detach().clone() for n, p in recipe.model.named_parameters() if not p.requires_grad
            and not is_nf4(p)}  # (torchao's NF4 clone re-quantizes with default block sizes)
    losses = recipe.train()
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    for n, p in recipe.model.named_parameters():  # frozen stays frozen
        if n in base:
            assert torch.equal(p, base[n]), n
    out = recipe.save()
    recipe.cleanup()
    if method == "full":
        model, _ = visualglm.load(out, device="cpu", dtype="float32")
        batch = collate(recipe.train_samples[:2], recipe.tokenizer.pad_token_id, recipe.images)
        args = (batch.input_ids, batch.position_ids, batch.context_lengths, batch.targets, batch.pixels,
                batch.image_offsets)
        with torch.no_grad():
            torch.testing.assert_close(LossModule(model)(*args), recipe.module.eval()(*args))
    else:
        assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
        model, _ = visualglm.load(None, device="cpu", dtype="float32", adapter=out)
        assert sum(p.numel() for p in model.parameters()) > 0


def test_resume_equals_uninterrupted(tiny_ckpt, data_dir, tmp_path):
    kw = {"steps": 6, "batch_size": 2, "micro_batch_size": 1}
    full = FinetuneRecipe(_cfg(tiny_ckpt, data_dir, tmp_path / "a", "lora", **kw), log=lambda m: None).setup()
    expected = full.train()

    cfg = _cfg(tiny_ckpt, data_dir, tmp_path / "b", "lora", save_every=3, **kw)
    first = FinetuneRecipe(cfg, log=lambda m: None).setup()
    assert first.train(until=4) == expected[:4]  # then "crashes": step 4 is after the last checkpoint
    assert (tmp_path / "b" / "checkpoints" / "step-000003" / "adapter_config.json").is_file()

    cfg = _cfg(tiny_ckpt, data_dir, tmp_path / "b", "lora", **kw)
    resumed = FinetuneRecipe(cfg, log=lambda m: None).setup(resume=True)
    assert resumed.step == 3
    assert resumed.train() == expected
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_with_dropout_and_changed_batch(tiny_ckpt, data_dir, tmp_path):
    kw = {"steps": 4, "batch_size": 2, "micro_batch_size": 1}
    cfg = _cfg(tiny_ckpt, data_dir, tmp_path / "a", "lora", **kw)
    cfg.lora.dropout = 0.3
    expected = FinetuneRecipe(cfg, log=lambda m: None).setup().train()
    cfg = _cfg(tiny_ckpt, data_dir, tmp_path / "b", "lora", save_every=2, **kw)
    cfg.lora.dropout = 0.3
    run = FinetuneRecipe(cfg, log=lambda m: None).setup()
    run.train()
    cfg = _cfg(tiny_ckpt, data_dir, tmp_path / "b", "lora", **kw)
    cfg.lora.dropout = 0.3
    again = FinetuneRecipe(cfg, log=lambda m: None).setup(resume=str(tmp_path / "b/checkpoints/step-000002"))
    assert again.train() == expected
    cfg = _cfg(tiny_ckpt, data_dir, tmp_path / "b", "lora", steps=4, batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        FinetuneRecipe(cfg, log=lambda m: None).setup(resume=True)


def test_eval_exact_match_through_generation(tiny_ckpt, data_dir, tmp_path):
    data = [{"img": "red.png", "prompt": "颜色？", "label": "红"}]
    (data_dir / "one.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    cfg = from_dict({"method": "full", "model": str(tiny_ckpt), "output_dir": str(tmp_path / "o"),
                     "data": {"train": str(data_dir / "one.json"), "eval": str(data_dir / "one.json")},
                     "optim": {"lr": 1e-2, "warmup_steps": 0},
                     "train": {"steps": 12, "batch_size": 1, "progress": False, "eval_max_new_tokens": 4}})
    recipe = FinetuneRecipe(cfg, log=lambda m: None).setup()
    before = recipe.evaluate()
    recipe.train()
    after = recipe.evaluate()
    assert before["eval_exact_match"] == 0.0 and after["eval_exact_match"] == 1.0
    assert after["eval_loss"] < before["eval_loss"]


# ----- command line -------------------------------------------------------------------------------------------
def test_cli_finetune_chat_adapter_and_config_file(tiny_ckpt, data_dir, tmp_path, capsys):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("method: lora\nlora:\n  rank: 2\n  layers: [0, 2]\noptim:\n  lr: 0.01\n"
                         "train:\n  steps: 2\n  batch_size: 2\n")
    out = tmp_path / "adapter"
    argv = ["finetune", "--config", str(yaml_file), "--model", str(tiny_ckpt), "--data",
            str(data_dir / "train.json"), "--output", str(out), "--lora-alpha", "4", "--no-progress",
            "--eval-fraction", "0.25", "--eval-max-new-tokens", "2", "--save-every", "1"]
    assert cli_main(argv) == 0
    record = json.loads((out / "adapter_config.json").read_text())
    assert record["r"] == 2 and record["lora_alpha"] == 4.0 and record["visualglm"]["layers"] == [0, 2]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2] and "eval_loss" in lines[-1]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert cli_main(argv) == 2  # checkpoints exist: refuses to start over silently
    assert "--resume" in capsys.readouterr().err
    assert cli_main(["chat", "--adapter", str(out), "--prompt", "你好", "--json", "--device", "cpu",
                     "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert "response" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    bad = ["finetune", "--model", str(tiny_ckpt), "--data", str(data_dir / "nope.json"), "--output",
           str(tmp_path / "x"), "--steps", "1"]
    assert cli_main(bad) == 2 and "not found" in capsys.readouterr().err


def test_random_init_full_output_is_a_loadable_checkpoint(tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "scratch"
    argv = ["finetune", "--model", "tiny", "--init", "random", "--tokenizer", str(tokenizer_dir), "--method",
            "full", "--train", "vision,qformer,proj,glm", "--data", str(data_dir / "train.json"), "--output",
            str(out), "--steps", "2", "--batch-size", "2", "--no-progress", "--no-eval-generate",
            "--save-dtype", "bfloat16"]
    assert cli_main(argv) == 0
    assert (out / "config.json").is_file() and (out / "ice_text.model").is_file()
    model, tok = visualglm.load(out, device="cpu", dtype="float32")
    assert model.config.name == "tiny" and tok.vocab_size > 0


def test_shipped_configs_parse():
    from visualglm.finetune.config import load_yaml

    root = Path(__file__).resolve().parents[1] / "configs" / "finetune"
    methods = {}
    for file in sorted(root.glob("*.yaml")):
        cfg = from_dict(load_yaml(file))
        cfg.model, cfg.data.train, cfg.output_dir = "m", "d.json", "o"
        cfg.validate()
        methods[file.stem] = cfg.method
    assert methods == {"full": "full", "lora": "lora", "ptuning": "ptuning", "qlora": "qlora"}
    with pytest.raises(ValueError, match="unknown key"):
        from_dict({"train": {"stepz": 3}})
