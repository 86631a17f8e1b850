"""Checkpoint loading and conversion: every supported layout gives the reference model, errors name the
key and the file, and conversion writes atomically.

Every variant is derived in ``tmp_path`` from the reference fixtures (sat: contiguous GLM QKV, current sat;
HF: interleaved), and compared with the ``reference_model`` fixture (the HF safetensors copy) weight by
weight and through a forward pass of reference case a (image + text).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import visualglm
from visualglm.checkpoint import convert as convert_module
from visualglm.checkpoint.convert import convert
from visualglm.checkpoint.files import CheckpointError, _private_file_mappings, open_weights
from visualglm.checkpoint.io import detect_qkv_layout, inspect, iter_canonical, load_into
from visualglm.checkpoint.keymaps import canonical_name, foreign_name
from visualglm.cli import main as cli_main
from visualglm.model.visualglm import VisualGLM

SAT = "tiny-visualglm-sat"
HF = "tiny-visualglm-hf"
SAT_FILE = Path("1") / "mp_rank_00_model_states.pt"
SAT_QKV = re.compile(r"^transformer\.layers\.\d+\.attention\.query_key_value\.(weight|bias)$")
HEADS = 4  # GLM heads of the tiny reference model
CASE = "a_image_zh_turn1"


# ----- helpers ---------------------------------------------------------------------------------------
def _load(path: Path, tokenizer: Path | None = None, **kw) -> VisualGLM:
    return visualglm.load(path, device="cpu", dtype="float32", tokenizer=tokenizer, **kw)[0]


@cache
def _case_tensors(reference_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(reference_dir / "cases.safetensors"))


def _forward(model: VisualGLM, reference_dir: Path) -> torch.Tensor:
    """Logits of reference case a (image spliced in at pre_image): (1, L, vocab)."""
    t = _case_tensors(reference_dir)
    ids, pos = t[f"{CASE}.input_ids"], t[f"{CASE}.position_ids"]
    with torch.no_grad():
        embeds = model.encode_image(t[f"{CASE}.image"])  # (1, 32, C)
        return model(ids, pos, context_lengths=torch.tensor([ids.shape[1] - 1]), image_embeds=embeds,
                     image_offsets=torch.tensor([[0, 3]]))


@pytest.fixture(scope="module")
def reference_logits(reference_model, reference_dir: Path) -> torch.Tensor:
    return _forward(reference_model[0], reference_dir)


def _assert_same_model(model: VisualGLM, reference_model, reference_logits, reference_dir: Path,
                       *, rounded_to: torch.dtype | None = None) -> None:
    """Same weights exactly (after rounding the reference to ``rounded_to``), same tied lm_head, and for
    same-precision weights the same logits (atol 1e-6)."""
    ref = reference_model[0].state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        want = v.to(rounded_to).float() if rounded_to is not None and v.is_floating_point() else v
        assert got[k].dtype == want.dtype, k
        assert torch.equal(got[k], want), f"{k} differs"
    assert model.glm.lm_head.weight is model.glm.word_embeddings.weight
    if rounded_to is None:
        torch.testing.assert_close(_forward(model, reference_dir), reference_logits, atol=1e-6, rtol=0)


def _sat_sd(reference_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(reference_dir / SAT / SAT_FILE, weights_only=True)["module"]


def _hf_sd(reference_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(reference_dir / HF / "pytorch_model.bin", weights_only=True)


def _write_sat(folder: Path, reference_dir: Path, payload: dict) -> Path:
    (folder / "1").mkdir(parents=True)
    shutil.copyfile(reference_dir / SAT / "model_config.json", folder / "model_config.json")
    (folder / "latest").write_text("1")
    torch.save(payload, folder / SAT_FILE)
    return folder


def _hf_folder(folder: Path, reference_dir: Path) -> Path:
    """config.json + tokenizer files of the HF fixture, no weights yet."""
    folder.mkdir(parents=True)
    for name in ("config.json", "ice_text.model", "tokenizer_config.json"):
        shutil.copyfile(reference_dir / HF / name, folder / name)
    return folder


def _to_interleaved(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The pre-July-2023 sat layout, written independently of the loader: rows (part, head, d) of the
    contiguous matrix become rows (head, part, d)."""
    out = dict(sd)
    for k, v in sd.items():
        if SAT_QKV.match(k):
            out[k] = v.reshape(3, HEADS, -1, *v.shape[1:]).transpose(0, 1).reshape(v.shape).clone()
    return out


def _scale_v(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Make V rows 4x larger (exact in fp16) in a contiguous-layout sd, as trained Q/K/V norms differ."""
    out = dict(sd)
    for k, v in sd.items():
        if SAT_QKV.match(k) and k.endswith("weight"):
            v = v.clone()
            v[2 * v.shape[0] // 3:] *= 4
            out[k] = v
    return out


def _write_index(path: Path, weight_map: dict[str, str]) -> None:
    path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _split_hf_bins(folder: Path, sd: dict[str, torch.Tensor], parts: int) -> None:
    keys = sorted(sd)
    weight_map = {}
    for i in range(parts):
        name = f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin"
        chunk = {k: sd[k].clone() for k in keys[i::parts]}
        torch.save(chunk, folder / name)
        weight_map.update(dict.fromkeys(chunk, name))
    _write_index(folder / "pytorch_model.bin.index.json", weight_map)


# ----- sat ----------------------------------------------------------------------------------------------
def test_sat_contiguous_fixture(reference_dir, tokenizer_dir, reference_model, reference_logits, caplog):
    src = inspect(reference_dir / SAT)
    assert src.format == "sat" and src.config.glm.tie_word_embeddings  # lm_head shares the embedding
    assert detect_qkv_layout(src) is None  # random weights: undecidable, falls back to contiguous
    for layout in ("auto", "contiguous"):
        model = _load(reference_dir / SAT, tokenizer_dir, qkv_layout=layout)
        _assert_same_model(model, reference_model, reference_logits, reference_dir)
    assert "assuming contiguous" in caplog.text and "qkv_layout='interleaved'" in caplog.text


def test_sat_interleaved_explicit(tmp_path, reference_dir, tokenizer_dir, reference_model, reference_logits):
    old = _write_sat(tmp_path / "old", reference_dir, {"module": _to_interleaved(_sat_sd(reference_dir))})
    model = _load(old, tokenizer_dir, qkv_layout="interleaved")
    _assert_same_model(model, reference_model, reference_logits, reference_dir)
    # undecidable weights fall back to contiguous, which is wrong for this file: the flag matters
    assert detect_qkv_layout(inspect(old)) is None
    wrong = _load(old, tokenizer_dir)
    qkv = "glm.layers.0.attention.query_key_value.weight"
    assert not torch.equal(wrong.state_dict()[qkv], reference_model[0].state_dict()[qkv])


def test_sat_layout_auto_detected(tmp_path, reference_dir, tokenizer_dir):
    scaled = _scale_v(_sat_sd(reference_dir))
    new = _write_sat(tmp_path / "new", reference_dir, {"module": scaled})
    old = _write_sat(tmp_path / "old", reference_dir, {"module": _to_interleaved(scaled)})
    assert detect_qkv_layout(inspect(new)) == "contiguous"
    assert detect_qkv_layout(inspect(old)) == "interleaved"
    auto_new, auto_old = _load(new, tokenizer_dir), _load(old, tokenizer_dir)
    explicit = _load(old, tokenizer_dir, qkv_layout="interleaved").state_dict()
    for k, v in auto_new.state_dict().items():
        assert torch.equal(v, auto_old.state_dict()[k]), k
        assert torch.equal(v, explicit[k]), k
    qkv = auto_new.glm.layers[0].attention.query_key_value.weight  # ours: per head [q_h | k_h | v_h]
    norms = qkv.norm(dim=1).view(HEADS, 3, -1).mean(dim=(0, 2))
    assert norms[2] > 3 * norms[0] and norms[2] > 3 * norms[1]  # the scaled V rows sit in the V slots


def test_sat_released_extras_are_ignored(tmp_path, reference_dir, tokenizer_dir, reference_model,
                                         reference_logits):
    """The released sat file also has transformer.position_embeddings.weight (unused by ChatGLM)."""
    sd = _sat_sd(reference_dir)
    sd["transformer.position_embeddings.weight"] = torch.randn(512, 64).half()
    folder = _write_sat(tmp_path / "released", reference_dir, {"module": sd})
    _assert_same_model(_load(folder, tokenizer_dir), reference_model, reference_logits, reference_dir)


def test_sat_untied_lm_head_kept_separate(tmp_path, reference_dir, tokenizer_dir, reference_model):
    sd = _sat_sd(reference_dir)
    sd["mixins.chatglm-final.lm_head.weight"] = sd["mixins.chatglm-final.lm_head.weight"].clone() * 2
    folder = _write_sat(tmp_path / "untied", reference_dir, {"module": sd})
    assert not inspect(folder).config.glm.tie_word_embeddings
    model = _load(folder, tokenizer_dir)
    assert model.glm.lm_head.weight is not model.glm.word_embeddings.weight
    assert torch.equal(model.glm.lm_head.weight, reference_model[0].glm.lm_head.weight * 2)


def test_sat_pickle_with_objects_needs_trust(tmp_path, reference_dir, tokenizer_dir, reference_model,
                                             reference_logits):
    payload = {"module": _sat_sd(reference_dir), "args": argparse.Namespace(lr=1e-4)}
    folder = _write_sat(tmp_path / "legacy", reference_dir, payload)
    with pytest.raises(CheckpointError) as err:
        _load(folder, tokenizer_dir)
    msg = str(err.value)
    assert str(folder / SAT_FILE) in msg and "argparse.Namespace" in msg
    assert "trust_pickle=True" in msg and "--trust-pickle" in msg
    model = _load(folder, tokenizer_dir, trust_pickle=True)
    _assert_same_model(model, reference_model, reference_logits, reference_dir)


# ----- HF -----------------------------------------------------------------------------------------------
def test_hf_single_bin(tmp_path, reference_dir, reference_model, reference_logits):
    folder = _hf_folder(tmp_path / "hf", reference_dir)
    shutil.copyfile(reference_dir / HF / "pytorch_model.bin", folder / "pytorch_model.bin")
    src = inspect(folder)
    assert src.format == "hf" and [f.name for f in src.files] == ["pytorch_model.bin"]
    _assert_same_model(_load(folder), reference_model, reference_logits, reference_dir)


def test_hf_sharded_bin_with_index(tmp_path, reference_dir, reference_model, reference_logits):
    folder = _hf_folder(tmp_path / "hf", reference_dir)
    _split_hf_bins(folder, _hf_sd(reference_dir), parts=3)
    assert len(inspect(folder).files) == 3
    _assert_same_model(_load(folder), reference_model, reference_logits, reference_dir)


def test_hf_safetensors_without_lm_head(tmp_path, reference_dir, reference_model, reference_logits):
    folder = _hf_folder(tmp_path / "hf", reference_dir)
    shutil.copyfile(reference_dir / HF / "model.safetensors", folder / "model.safetensors")
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = list(f.keys())
    assert "lm_head.weight" not in stored  # tied: the word embedding is the output matrix
    _assert_same_model(_load(folder), reference_model, reference_logits, reference_dir)


def test_hf_sharded_safetensors_with_index(tmp_path, reference_dir, reference_model, reference_logits):
    folder = _hf_folder(tmp_path / "hf", reference_dir)
    sd = load_file(str(reference_dir / HF / "model.safetensors"))
    keys, weight_map = sorted(sd), {}
    for i in range(2):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: sd[k] for k in keys[i::2]}, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys[i::2], name))
    _write_index(folder / "model.safetensors.index.json", weight_map)
    assert len(inspect(folder).files) == 2
    _assert_same_model(_load(folder), reference_model, reference_logits, reference_dir)


def test_key_maps_round_trip(reference_dir):
    for fmt, sd in (("sat", _sat_sd(reference_dir)), ("hf", _hf_sd(reference_dir))):
        for key in sd:
            name = canonical_name(key, fmt)
            if name is not None:
                assert foreign_name(name, fmt) == key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_loaded_model_keeps_no_file_mapping(tmp_path, reference_dir, tokenizer_dir):
    """Weights are copied out of the memory-mapped files: nothing keeps a file (a second copy) mapped."""
    st, pt = _hf_folder(tmp_path / "st", reference_dir), _hf_folder(tmp_path / "pt", reference_dir)
    shutil.copyfile(reference_dir / HF / "model.safetensors", st / "model.safetensors")
    shutil.copyfile(reference_dir / HF / "pytorch_model.bin", pt / "pytorch_model.bin")
    models = [_load(st), _load(pt), _load(reference_dir / SAT, tokenizer_dir)]
    for file in (st / "model.safetensors", pt / "pytorch_model.bin", reference_dir / SAT / SAT_FILE):
        assert _private_file_mappings(file) == [], file
    assert all(p.device.type == "cpu" for m in models for p in m.parameters())


def _resident_bytes_of(file: Path) -> int:
    """Resident bytes of this process's mappings of ``file`` (/proc/self/smaps)."""
    real, total, inside = str(file.resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = len(fields) >= 6 and fields[5] == real
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_take_hands_file_pages_back(tmp_path, suffix):
    """Reading a tensor leaves (almost) none of the file resident: the loader never holds a second copy."""
    weights = {"big": torch.randn(1024, 4096), "small": torch.randn(7)}  # 16 MiB + a few bytes
    file = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file(weights, str(file))
    else:
        torch.save(weights, file)
    with open_weights(file) as wf:
        view = wf.view("big")
        assert float(view.sum()) == pytest.approx(float(weights["big"].sum()), rel=1e-5)
        touched = _resident_bytes_of(file)
        wf.release(view)
        del view
        released = _resident_bytes_of(file)
        big = wf.take("big", dtype=torch.bfloat16)
        after_take = _resident_bytes_of(file)
        assert torch.equal(big, weights["big"].bfloat16()) and torch.equal(wf.take("small"), weights["small"])
    assert touched >= 16 * 1024**2  # reading the view paged the file in ...
    assert released < 1024**2 and after_take < 1024**2  # ... release and take give it back


# ----- our layout and convert --------------------------------------------------------------------------
def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


def test_convert_sat_to_ours(tmp_path, reference_dir, tokenizer_dir, reference_model, reference_logits):
    out = convert(reference_dir / SAT, tmp_path / "ours", tokenizer=tokenizer_dir, shard_bytes=4 * 1024**2)
    shards = _shards(out)
    assert len(shards) > 1 and shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                                           for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert "glm.lm_head.weight" not in index["weight_map"]  # tied
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "visualglm" and config["torch_dtype"] == "float16"
    assert (out / "ice_text.model").is_file() and (out / "tokenizer_config.json").is_file()
    assert inspect(out).format == "visualglm"
    _assert_same_model(_load(out), reference_model, reference_logits, reference_dir)  # own tokenizer
    assert [p.name for p in tmp_path.iterdir()] == ["ours"]  # no temp dirs left behind


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_convert_hf_to_ours_dtype(tmp_path, dtype, reference_dir, reference_model, reference_logits):
    out = convert(reference_dir / HF, tmp_path / "ours", dtype=dtype, shard_bytes=256 * 1024)
    assert len(_shards(out)) > 2
    for shard in _shards(out):
        with safe_open(str(out / shard), framework="pt") as f:
            keys = list(f.keys())
            assert all(f.get_tensor(k).dtype == dtype for k in keys)
    # the fixture's values are fp16-exact: fp16 keeps them, bf16 rounds them
    model = _load(out)
    rounded = None if dtype == torch.float16 else dtype
    _assert_same_model(model, reference_model, reference_logits, reference_dir, rounded_to=rounded)
    native = visualglm.load(out, device="cpu", dtype=dtype)[0]
    assert native.glm.word_embeddings.weight.dtype == dtype


def test_convert_ours_to_ours_and_iter_canonical(tmp_path, reference_dir, reference_model):
    first = convert(reference_dir / HF, tmp_path / "a", shard_bytes=2 * 1024**2)
    second = convert(first, tmp_path / "b", dtype=torch.float32)
    names = {name for _, name, _ in iter_canonical(inspect(second))}
    assert names == set(reference_model[0].state_dict()) - {"glm.lm_head.weight"}
    for _, name, t in iter_canonical(inspect(second), dtype=torch.bfloat16):
        assert t.dtype == torch.bfloat16
        assert torch.equal(t, reference_model[0].state_dict()[name].bfloat16()), name


def test_load_into_transform_sees_every_tensor(reference_dir, reference_model):
    src = inspect(reference_dir / HF)
    with torch.device("meta"):
        model = VisualGLM(src.config)
    seen = []

    def record(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        seen.append(name)
        return {name: tensor}

    load_into(model, src, device="cpu", dtype=torch.float32, transform=record)
    assert sorted(seen) == sorted(set(reference_model[0].state_dict()) - {"glm.lm_head.weight"})
    word = reference_model[0].glm.word_embeddings.weight
    assert torch.equal(model.glm.word_embeddings.weight, word)
    assert model.glm.lm_head.weight is model.glm.word_embeddings.weight


def test_convert_failure_leaves_nothing(tmp_path, reference_dir, monkeypatch):
    real = convert_module.iter_canonical

    def failing(*args, **kwargs):
        for i, item in enumerate(real(*args, **kwargs)):
            if i == 40:
                raise RuntimeError("disk on fire")
            yield item

    monkeypatch.setattr(convert_module, "iter_canonical", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(reference_dir / HF, tmp_path / "out" / "dst", shard_bytes=64 * 1024)
    assert list((tmp_path / "out").iterdir()) == []  # no DST, no temp dir


def test_convert_refuses_existing_dst_unless_overwrite(tmp_path, reference_dir, reference_model,
                                                        reference_logits):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(reference_dir / HF, dst)
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    convert(reference_dir / HF, dst, overwrite=True)
    assert not (dst / "keep.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dst"]  # the old folder and temp dirs are gone
    _assert_same_model(_load(dst), reference_model, reference_logits, reference_dir)


def test_cli_convert(tmp_path, reference_dir, tokenizer_dir, reference_model, reference_logits, capsys):
    dst = tmp_path / "cli"
    rc = cli_main(["convert", str(reference_dir / SAT), str(dst), "--tokenizer", str(tokenizer_dir),
                   "--dtype", "float16", "--shard-size", "3MB", "--qkv-layout", "contiguous"])
    assert rc == 0 and f"wrote {dst}" in capsys.readouterr().out
    assert len(_shards(dst)) > 1
    model, tok = visualglm.load(dst, device="cpu", dtype="float32")  # offline, its own tokenizer
    _assert_same_model(model, reference_model, reference_logits, reference_dir)
    assert tok.encode("描述这张图片。") == reference_model[1].encode("描述这张图片。")
    assert cli_main(["convert", str(reference_dir / SAT), str(dst)]) == 1  # exists
    assert "already exists" in capsys.readouterr().err


def test_cli_convert_trust_pickle(tmp_path, reference_dir, tokenizer_dir, capsys):
    folder = _write_sat(tmp_path / "legacy", reference_dir,
                        {"module": _sat_sd(reference_dir), "args": argparse.Namespace(lr=1e-4)})
    argv = ["convert", str(folder), str(tmp_path / "out"), "--tokenizer", str(tokenizer_dir)]
    assert cli_main(argv) == 1
    assert "--trust-pickle" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert cli_main([*argv, "--trust-pickle"]) == 0
    assert inspect(tmp_path / "out").format == "visualglm"


# ----- errors: each names what was wrong and where -----------------------------------------------------
def _hf_safetensors_folder(tmp_path: Path, reference_dir: Path, edit) -> Path:
    folder = _hf_folder(tmp_path / "hf", reference_dir)
    sd = load_file(str(reference_dir / HF / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_error_missing_key(tmp_path, reference_dir):
    key = "transformer.final_layernorm.bias"
    folder = _hf_safetensors_folder(tmp_path, reference_dir, lambda sd: sd.pop(key))
    with pytest.raises(CheckpointError, match="missing") as err:
        _load(folder)
    assert "'glm.final_layernorm.bias'" in str(err.value) and f"'{key}'" in str(err.value)
    assert str(folder / "model.safetensors") in str(err.value)


def test_error_missing_key_in_indexed_shard(tmp_path, reference_dir):
    out = convert(reference_dir / HF, tmp_path / "ours", shard_bytes=1024**2)
    key = "glm.layers.1.mlp.dense_4h_to_h.weight"
    shard = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"][key]
    sd = load_file(str(out / shard))
    del sd[key]
    save_file(sd, str(out / shard))
    with pytest.raises(CheckpointError) as err:
        _load(out)
    assert f"'{key}'" in str(err.value) and f"puts it in {shard}" in str(err.value)


def test_error_unexpected_key(tmp_path, reference_dir):
    folder = _hf_safetensors_folder(
        tmp_path, reference_dir, lambda sd: sd.__setitem__("transformer.bogus.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected key 'transformer\.bogus\.weight'") as err:
        _load(folder)
    assert str(folder / "model.safetensors") in str(err.value)


def test_error_unexpected_key_ours(tmp_path, reference_dir):
    out = convert(reference_dir / HF, tmp_path / "ours")
    shard = _shards(out)[0]
    sd = load_file(str(out / shard))
    sd["glm.bogus"] = torch.zeros(3)
    save_file(sd, str(out / shard))
    with pytest.raises(CheckpointError, match=r"unexpected key 'glm\.bogus'") as err:
        _load(out)
    assert str(out / shard) in str(err.value)


def test_error_shape_mismatch(tmp_path, reference_dir):
    def edit(sd):
        sd["transformer.final_layernorm.weight"] = sd["transformer.final_layernorm.weight"][:32].clone()

    folder = _hf_safetensors_folder(tmp_path, reference_dir, edit)
    with pytest.raises(CheckpointError, match="shape mismatch") as err:
        _load(folder)
    msg = str(err.value)
    assert "'glm.final_layernorm.weight'" in msg and str(folder / "model.safetensors") in msg
    assert "[32]" in msg and "[64]" in msg


def test_error_duplicate_key_across_shards(tmp_path, reference_dir):
    folder = _hf_folder(tmp_path / "hf", reference_dir)
    sd = _hf_sd(reference_dir)
    key = "transformer.final_layernorm.weight"
    first, second = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    torch.save({k: v.clone() for k, v in sd.items() if k != "lm_head.weight"}, folder / first)
    torch.save({key: sd[key].clone()}, folder / second)
    with pytest.raises(CheckpointError, match="appears twice") as err:
        _load(folder)
    msg = str(err.value)
    assert f"'{key}'" in msg and str(folder / first) in msg and str(folder / second) in msg


def test_error_missing_shard_in_index(tmp_path, reference_dir):
    folder = _hf_folder(tmp_path / "hf", reference_dir)
    _split_hf_bins(folder, _hf_sd(reference_dir), parts=2)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="do not exist") as err:
        inspect(folder)
    assert "pytorch_model-00002-of-00002.bin" in str(err.value)
    assert str(folder / "pytorch_model.bin.index.json") in str(err.value)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_error_bad_json(tmp_path, reference_dir, name):
    out = convert(reference_dir / HF, tmp_path / "ours")
    (out / name).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        inspect(out)
    assert str(out / name) in str(err.value)


def test_error_index_without_weight_map(tmp_path, reference_dir):
    out = convert(reference_dir / HF, tmp_path / "ours")
    (out / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        inspect(out)


def test_error_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint folder") as err:
        inspect(tmp_path)
    assert str(tmp_path) in str(err.value) and "model_config.json" in str(err.value)
    with pytest.raises(CheckpointError, match="is a file"):
        inspect(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        inspect(tmp_path / "nowhere")


def test_error_config_without_weights(tmp_path, reference_dir):
    folder = _hf_folder(tmp_path / "hf", reference_dir)
    with pytest.raises(CheckpointError, match="has no weights") as err:
        inspect(folder)
    assert str(folder) in str(err.value)


def test_error_sat_without_latest(tmp_path, reference_dir):
    folder = tmp_path / "sat"
    shutil.copytree(reference_dir / SAT, folder)
    (folder / "latest").unlink()
    with pytest.raises(CheckpointError, match="'latest'") as err:
        inspect(folder)
    assert str(folder) in str(err.value)
    (folder / "latest").write_text("7")
    with pytest.raises(CheckpointError, match="not found") as err:
        inspect(folder)
    assert str(folder / "7" / "mp_rank_00_model_states.pt") in str(err.value)


def test_error_corrupt_weight_files(tmp_path, reference_dir):
    folder = _hf_folder(tmp_path / "hf", reference_dir)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as err:
        _load(folder)
    assert str(folder / "model.safetensors") in str(err.value)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all" * 8)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as err:
        _load(folder)
    assert str(folder / "pytorch_model.bin") in str(err.value)


def test_error_bad_qkv_layout(reference_dir, tokenizer_dir):
    with pytest.raises(ValueError, match="qkv_layout must be one of auto, contiguous, interleaved"):
        _load(reference_dir / SAT, tokenizer_dir, qkv_layout="rows")
