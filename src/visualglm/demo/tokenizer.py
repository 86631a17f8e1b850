"""A small SentencePiece model for the demo, with every piece :class:`ChatGLMTokenizer` relies on.

The real ``ice_text.model`` has 130344 pieces; the scene world needs a few hundred. The special pieces keep
the real model's types: ``<unk>`` (unknown), ``<s>`` ``</s>`` ``<pad>`` and ``[MASK]`` ``[gMASK]``
``[sMASK]`` ``<sop>`` ``<eop>`` (control: never produced from text, decoded to nothing), and ``<n>``,
``<|tab|>``, ``<|blank_2|>`` .. ``<|blank_80|>`` (plain pieces the whitespace rewriting produces; here
user-defined so they always match whole). Byte fallback keeps any text encodable.
"""

from __future__ import annotations

import io
import json
import random
import re
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from ..prompt import prompt_text
from ..tokenizer import (
    CONFIG_FILE,
    DEFAULT_CONFIG,
    MAX_BLANK_LENGTH,
    NEWLINE_PIECE,
    TAB_PIECE,
    VOCAB_FILE,
    blank_piece,
)
from .scenes import ALL_TYPES, LANGS, ZH, ask, make_scenes

CONTROL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")
USER_PIECES = (NEWLINE_PIECE, TAB_PIECE, *(blank_piece(n) for n in range(2, MAX_BLANK_LENGTH + 1)),
               "<img>", "</img>")
DEFAULT_VOCAB_SIZE = 1024  # an upper bound: training stops when no merge is left (~870 pieces)
# Pieces never cross these boundaries during training, so a piece is a word (or part of one), never a
# phrase such as "左边有一个红色的圆形" that would fuse several facts into one output token.
ZH_WORDS = (*ZH.values(), "圆", "方块", "什么", "颜色", "形状", "图片", "图形", "物体", "东西", "背景", "位置",
            "哪里", "哪个", "描述", "一下", "这张", "这个", "这幅", "图中", "图里", "一共", "多少", "请")
_DELIMITER = "\u241f"
_PRETOKEN = re.compile("|".join(sorted(map(re.escape, ZH_WORDS), key=len, reverse=True))
                       + r"|[\u3400-\u9fff]| ?[A-Za-z]+| ?[0-9]+|<[^<>\s]+>|\s+|.")


def corpus_lines(seed: int = 1234, scenes: int = 600) -> list[str]:
    """Every question form (as the prompt builder writes it) and answer of the scene world.

    Background questions are included: the tokenizer fixes the language, not what the model knows.
    """
    rng = random.Random(seed)
    lines = []
    for scene in make_scenes(seed, scenes):
        for qtype in ALL_TYPES:
            for lang in LANGS:
                qa = ask(scene, qtype, lang, rng)
                for english in (False, True):
                    lines.append(prompt_text(qa.question, english=english, image=True).replace("\n", NEWLINE_PIECE))
                lines.append(qa.answer)
    return lines


def pretokenize(line: str) -> str:
    """Mark word boundaries (for training only: encoding needs no pre-tokenization)."""
    return _DELIMITER.join(_PRETOKEN.findall(line))


def train_tokenizer(out_dir: str | Path, lines: Iterable[str] | None = None, *,
                    vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train ``ice_text.model`` on ``lines`` and write it with ``tokenizer_config.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(pretokenize(line) for line in (corpus_lines() if lines is None else lines))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="nmt_nfkc",
        unk_id=0, bos_id=1, eos_id=2, pad_id=3,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", pad_piece="<pad>",
        control_symbols=list(CONTROL_PIECES),
        user_defined_symbols=list(USER_PIECES),
        pretokenization_delimiter=_DELIMITER,
        num_threads=1,
        minloglevel=2,
    )
    (out / VOCAB_FILE).write_bytes(model.getvalue())
    config = {**DEFAULT_CONFIG, "name_or_path": "visualglm-demo", "tokenizer_class": "ChatGLMTokenizer"}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
