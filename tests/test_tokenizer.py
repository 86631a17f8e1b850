"""ChatGLMTokenizer against the golden outputs of the reference tokenizer (transformers 4.33.3)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import sentencepiece as spm

import visualglm.tokenizer as tokenizer_module
from visualglm.tokenizer import ChatGLMTokenizer

CASES_PATH = (
    Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "tokenizer" / "tokenizer_cases.json"
)
GOLDEN = json.loads(CASES_PATH.read_text(encoding="utf-8")) if CASES_PATH.is_file() else {}
CASES = GOLDEN.get("cases", [])
DECODE_CASES = GOLDEN.get("decode_cases", [])


@pytest.fixture(scope="module")
def tok(tokenizer_dir: Path) -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="module")
def golden(tokenizer_dir: Path) -> dict:
    return json.loads((tokenizer_dir / "tokenizer_cases.json").read_text(encoding="utf-8"))


def test_golden_file_has_cases(golden: dict) -> None:
    assert len(golden["cases"]) == len(CASES) == 51
    assert len(golden["decode_cases"]) == len(DECODE_CASES) == 19


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_encode_tokenize_decode(tok: ChatGLMTokenizer, case: dict) -> None:
    text = case["text"]
    assert tok.encode(text, add_special_tokens=False) == case["ids_add_special_tokens_false"]
    assert tok.encode(text) == case["ids_add_special_tokens_true"]
    assert tok.tokenize(text) == case["tokenize_pieces"]
    assert tok.convert_tokens_to_ids(case["tokenize_pieces"]) == case["ids_add_special_tokens_false"]
    assert tok.decode(case["ids_add_special_tokens_false"]) == case["decode_of_ids_add_special_tokens_false"]
    assert tok.decode(case["ids_add_special_tokens_true"]) == case["decode_of_ids_add_special_tokens_true"]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c["name"] for c in DECODE_CASES])
def test_decode_cases(tok: ChatGLMTokenizer, case: dict) -> None:
    assert tok.decode(case["ids"]) == case["decode"]
    assert tok.convert_ids_to_tokens(case["ids"]) == case["convert_ids_to_tokens"]


def test_decode_out_of_range(tok: ChatGLMTokenizer, golden: dict) -> None:
    for idx, expected in golden["decode_out_of_range_ids"].items():
        idx = int(idx)
        if "decode" in expected:
            assert tok.decode([idx]) == expected["decode"]
            continue
        assert expected["error"].startswith("IndexError")
        with pytest.raises(IndexError, match=rf"{idx}.*vocab_size {tok.vocab_size}"):
            tok.decode([5, idx])
        with pytest.raises(IndexError):
            tok.convert_ids_to_tokens(idx)


def test_batch_left_padding(tok: ChatGLMTokenizer, golden: dict) -> None:
    ref = golden["batch_left_padding"]
    out = tok(ref["texts"], padding=True)
    assert set(out) == {"input_ids", "attention_mask", "position_ids"}
    assert out["input_ids"] == ref["input_ids"]
    assert out["position_ids"] == ref["position_ids"]
    mask = [[[[int(v) for v in row] for row in m] for m in sample] for sample in out["attention_mask"]]
    assert mask == ref["attention_mask_true_means_masked"]


def test_call_without_padding_and_single_text(tok: ChatGLMTokenizer, golden: dict) -> None:
    ref = golden["batch_left_padding"]
    assert tok(ref["texts"]) == {"input_ids": [tok.encode(t) for t in ref["texts"]]}
    single = tok(ref["texts"][1], padding=True)
    assert single["input_ids"] == ref["input_ids"][1]
    assert single["position_ids"] == ref["position_ids"][1]
    padded = tok("你好", padding="max_length", max_length=6, add_special_tokens=False)
    assert padded["input_ids"] == [3, 3, 3, 3, 5, 74874]
    assert padded["position_ids"] == [[0, 0, 0, 0, 0, 1], [0] * 6]


def test_return_tensors_pt(tok: ChatGLMTokenizer, golden: dict) -> None:
    torch = pytest.importorskip("torch")
    ref = golden["batch_left_padding"]
    out = tok(ref["texts"], padding=True, return_tensors="pt")
    assert out["input_ids"].tolist() == ref["input_ids"]
    assert out["attention_mask"].dtype == torch.bool
    assert tuple(out["attention_mask"].shape) == (2, 1, 13, 13)
    assert tuple(tok("你好", return_tensors="pt")["input_ids"].shape) == (1, 4)
    assert tok.decode(out["input_ids"][0]) == "你好"


def test_special_ids(tok: ChatGLMTokenizer, golden: dict, tokenizer_dir: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "ice_text.model"))
    named = {
        "mask_token_id": "[MASK]", "gmask_token_id": "[gMASK]", "smask_token_id": "[sMASK]",
        "bos_token_id": "<sop>", "sop_token_id": "<sop>", "eos_token_id": "<eop>", "eop_token_id": "<eop>",
        "pad_token_id": "<pad>", "unk_token_id": "<unk>", "end_token_id": "</s>", "newline_token_id": "<n>",
        "tab_token_id": "<|tab|>",
    }  # fmt: skip
    for attr, piece in named.items():
        assert getattr(tok, attr) == sp.piece_to_id(piece), attr
    ref = golden["special_tokens"]
    for key in ("pad_token_id", "unk_token_id", "bos_token_id", "eos_token_id", "mask_token_id",
                "gmask_token_id", "smask_token_id", "end_token_id", "newline_token_id", "tab_token_id"):  # fmt: skip
        assert getattr(tok, key) == ref[key], key
    assert tok.blank_token_id(2) == ref["blank_2_token_id"]
    assert tok.blank_token_id(80) == ref["blank_80_token_id"]
    assert tok.vocab_size == len(tok) == ref["tokenizer_vocab_size"] == sp.get_piece_size()
    assert tok.all_special_tokens == ref["transformers_all_special_tokens"]
    assert tok.build_inputs_with_special_tokens([7]) == [7, ref["gmask_token_id"], ref["bos_token_id"]]
    assert (tok.mask_token_id, tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id) == (
        130000,
        130001,
        130004,
        130005,
    )


def _swapping_processor(swap: dict[str, str]) -> type:
    """A SentencePieceProcessor whose pieces in ``swap`` exchange ids (a differently ordered model)."""

    class Swapped(spm.SentencePieceProcessor):
        def piece_to_id(self, piece):  # type: ignore[override]
            return super().piece_to_id(swap.get(piece, piece))

        def id_to_piece(self, idx):  # type: ignore[override]
            piece = super().id_to_piece(idx)
            return swap.get(piece, piece)

    return Swapped


def test_special_ids_come_from_the_model(monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path) -> None:
    swapped = _swapping_processor({"[MASK]": "[gMASK]", "[gMASK]": "[MASK]"})
    monkeypatch.setattr(tokenizer_module, "spm", types.SimpleNamespace(SentencePieceProcessor=swapped))
    tok = ChatGLMTokenizer.from_dir(tokenizer_dir)
    assert (tok.gmask_token_id, tok.mask_token_id) == (130000, 130001)
    assert tok.encode("你好") == [5, 74874, 130000, 130004]
    assert tok.tokenize("a [MASK] b") == ["▁a", "[MASK]", "▁b"]
    assert tok.encode("a [MASK] b", add_special_tokens=False) == [104, 130001, 463]


def test_missing_special_piece_is_reported(monkeypatch: pytest.MonkeyPatch, tokenizer_dir: Path) -> None:
    class NoSop(spm.SentencePieceProcessor):
        def piece_to_id(self, piece):  # type: ignore[override]
            return self.unk_id() if piece == "<sop>" else super().piece_to_id(piece)

    monkeypatch.setattr(tokenizer_module, "spm", types.SimpleNamespace(SentencePieceProcessor=NoSop))
    with pytest.raises(ValueError, match="<sop>"):
        ChatGLMTokenizer.from_dir(tokenizer_dir)


def test_config_is_read(tok: ChatGLMTokenizer, tokenizer_dir: Path) -> None:
    assert tok.config["name_or_path"] == "THUDM/chatglm-6b"
    assert tok.config["num_image_tokens"] == 0
    with pytest.raises(ValueError, match="num_image_tokens"):
        ChatGLMTokenizer(tokenizer_dir / "ice_text.model", num_image_tokens=20000)


def test_from_dir_missing_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ice_text\.model") as info:
        ChatGLMTokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_save_pretrained_round_trip(tok: ChatGLMTokenizer, tmp_path: Path, tokenizer_dir: Path) -> None:
    vocab, config = tok.save_pretrained(tmp_path / "out")
    assert Path(vocab).read_bytes() == (tokenizer_dir / "ice_text.model").read_bytes()
    saved = json.loads(Path(config).read_text(encoding="utf-8"))
    assert saved["tokenizer_class"] == "ChatGLMTokenizer"
    assert saved["bos_token"] == "<sop>" and saved["num_image_tokens"] == 0
    again = ChatGLMTokenizer.from_dir(tmp_path / "out")
    assert again.config == {**tok.config, "tokenizer_class": "ChatGLMTokenizer"}
    text = "<img></img>问：描述这张图片。\n答：a  b\tc"
    assert again.encode(text) == tok.encode(text)
    assert again.decode(again.encode(text)) == tok.decode(tok.encode(text))
    again.save_pretrained(tmp_path / "out")  # saving over its own files is fine


def test_skip_special_tokens(tok: ChatGLMTokenizer) -> None:
    ids = [0, 104, 130004, 130005, 3]
    assert tok.decode(ids) == " ⁇  a"  # sentencepiece: "<unk>" is " ⁇ ", then "▁a"
    assert tok.decode(ids, skip_special_tokens=True) == "a"
    assert tok.decode(130004) == "" and tok.decode([]) == ""
    assert tok.batch_decode([[5, 74874], [104]]) == ["你好", "a"]
