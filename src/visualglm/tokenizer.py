"""ChatGLM-6B tokenizer (SentencePiece ``ice_text.model``), without transformers.

It reproduces what THUDM/chatglm-6b's ``ChatGLMTokenizer`` does under transformers 4.33 because the
model was trained on exactly those ids: whitespace is rewritten into ``<n>`` / ``<|tab|>`` /
``<|blank_N|>`` pieces before SentencePiece, registered special tokens typed in the text are split
out (with the neighbouring whitespace stripped), and ``encode`` appends ``[gMASK]`` ``<sop>``.
Every special id is looked up in the SentencePiece model, never hard-coded, so a smaller model
trained with the same special pieces works unchanged.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

VOCAB_FILE = "ice_text.model"
CONFIG_FILE = "tokenizer_config.json"
MAX_BLANK_LENGTH = 80
NEWLINE_PIECE = "<n>"
TAB_PIECE = "<|tab|>"

# Defaults of the reference constructor, except num_image_tokens (only 0 is supported; the
# released tokenizer_config.json sets 0).
DEFAULT_CONFIG: dict[str, Any] = {
    "bos_token": "<sop>",
    "eos_token": "<eop>",
    "end_token": "</s>",
    "mask_token": "[MASK]",
    "gmask_token": "[gMASK]",
    "smask_token": "[sMASK]",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "remove_space": False,
    "do_lower_case": False,
    "num_image_tokens": 0,
    "padding_side": "left",
}

# transformers' clean_up_tokenization, applied in this order by the reference decode.
_CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
    (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip


def blank_piece(length: int) -> str:
    """The piece that stands for a run of ``length`` (2..80) spaces."""
    return f"<|blank_{length}|>"


def clean_up_tokenization(text: str) -> str:
    """Remove the spaces before punctuation/contractions, as transformers does on decode."""
    for old, new in _CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


class ChatGLMTokenizer:
    """SentencePiece tokenizer with the ChatGLM-6B pre/post-processing and HF-style methods."""

    model_input_names = ("input_ids", "attention_mask", "position_ids")
    # Set in __init__ from the config's token strings, ids looked up in the SentencePiece model.
    bos_token: str
    eos_token: str
    end_token: str
    mask_token: str
    gmask_token: str
    smask_token: str
    pad_token: str
    unk_token: str
    bos_token_id: int
    eos_token_id: int
    end_token_id: int
    mask_token_id: int
    gmask_token_id: int
    smask_token_id: int
    pad_token_id: int
    unk_token_id: int

    def __init__(self, vocab_file: str | Path, **config: Any) -> None:
        self.vocab_file = Path(vocab_file)
        self.config = {**DEFAULT_CONFIG, **config}
        if self.config["num_image_tokens"] != 0:
            raise ValueError(f"num_image_tokens={self.config['num_image_tokens']} is not supported (only 0)")
        if self.config["padding_side"] != "left":
            raise ValueError(f"padding_side={self.config['padding_side']!r}: ChatGLM pads on the left only")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.vocab_file))
        self.remove_space = bool(self.config["remove_space"])
        self.do_lower_case = bool(self.config["do_lower_case"])
        for key in ("bos", "eos", "end", "mask", "gmask", "smask", "pad", "unk"):
            setattr(self, f"{key}_token", self.config[f"{key}_token"])
            setattr(self, f"{key}_token_id", self._required_id(self.config[f"{key}_token"]))
        self.newline_token_id = self._required_id(NEWLINE_PIECE)
        self.tab_token_id = self._required_id(TAB_PIECE)
        # The tokens transformers registers as special (its standard attributes): only these are
        # split out of the text; [gMASK], <s>, </s> typed in the text stay ordinary text.
        self.all_special_tokens = [
            self.bos_token,
            self.eos_token,
            self.unk_token,
            self.pad_token,
            self.mask_token,
        ]
        self.all_special_ids = [self.sp.piece_to_id(t) for t in self.all_special_tokens]
        alternatives = sorted(self.all_special_tokens, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

    def _required_id(self, piece: str) -> int:
        """Id of a piece the format relies on; fail early if the model lacks it."""
        idx = self.sp.piece_to_id(piece)
        if idx == self.sp.unk_id() and piece != self.sp.id_to_piece(idx):
            raise ValueError(f"{self.vocab_file} has no piece {piece!r}, which ChatGLM needs")
        return idx

    # ----- loading and saving -------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path, **overrides: Any) -> ChatGLMTokenizer:
        """Load ``ice_text.model`` (+ optional ``tokenizer_config.json``) from a folder."""
        folder = Path(path)
        vocab = folder / VOCAB_FILE
        if not vocab.is_file():
            raise FileNotFoundError(f"tokenizer folder {folder} has no {VOCAB_FILE} (expected {vocab})")
        config: dict[str, Any] = {}
        if (folder / CONFIG_FILE).is_file():
            config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
        return cls(vocab, **{**config, **overrides})

    def save_pretrained(self, save_directory: str | Path) -> tuple[str, str]:
        """Write ``ice_text.model`` and ``tokenizer_config.json`` so ``from_dir`` reloads the same tokenizer."""
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = folder / VOCAB_FILE
        if not vocab.exists() or not vocab.samefile(self.vocab_file):
            shutil.copyfile(self.vocab_file, vocab)
        config = {**self.config, "tokenizer_class": type(self).__name__}
        config_path = folder / CONFIG_FILE
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return str(vocab), str(config_path)

    # ----- vocabulary ---------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (the model's embedding may be larger)."""
        return self.sp.get_piece_size()

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def sop_token_id(self) -> int:
        return self.bos_token_id

    @property
    def eop_token_id(self) -> int:
        return self.eos_token_id

    def blank_token_id(self, length: int) -> int:
        """Id of ``<|blank_length|>`` (a run of 2..80 spaces)."""
        return self._required_id(blank_piece(length))

    def get_vocab(self) -> dict[str, int]:
        return {self.sp.id_to_piece(i): i for i in range(self.vocab_size)}

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Unknown pieces map to the ``<unk>`` id, like SentencePiece."""
        if isinstance(tokens, str):
            return self.sp.piece_to_id(tokens)
        return [self.sp.piece_to_id(t) for t in tokens]

    def convert_ids_to_tokens(
        self, ids: int | Iterable[int], skip_special_tokens: bool = False
    ) -> str | list[str]:
        if isinstance(ids, int):
            return self._id_to_piece(ids)
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self.all_special_ids]
        return [self._id_to_piece(i) for i in ids]

    def _id_to_piece(self, idx: int) -> str:
        # The model's vocabulary (e.g. 130528) is padded beyond the tokenizer's; those ids have no text.
        if not 0 <= idx < self.vocab_size:
            raise IndexError(
                f"token id {idx} is out of range: the tokenizer has vocab_size {self.vocab_size}"
            )
        return self.sp.id_to_piece(idx)

    # ----- encoding -----------------------------------------------------------------------
    def _preprocess(self, text: str) -> str:
        """The reference's text rewriting before SentencePiece (config options, then whitespace)."""
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self.do_lower_case:
            text = text.lower()
        text = text.replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE)
        for length in range(MAX_BLANK_LENGTH, 1, -1):  # longest first: 85 spaces -> 80 + 5
            text = text.replace(" " * length, blank_piece(length))
        return text

    def _split_special(self, text: str) -> list[str]:
        """Split registered special tokens out of the text and strip the whitespace around them.

        Mirrors transformers 4.33 (its trie split, then lstrip/rstrip of both neighbours); every
        remaining text chunk is later encoded separately, with its own dummy prefix.
        """
        parts = [p for p in self._special_re.split(text) if p]
        for i, part in enumerate(parts):
            if part in self.all_special_tokens:
                if i + 1 < len(parts):
                    parts[i + 1] = parts[i + 1].lstrip()
                if i > 0:
                    parts[i - 1] = parts[i - 1].rstrip()
        return [p for p in parts if p]

    def tokenize(self, text: str) -> list[str]:
        pieces: list[str] = []
        for part in self._split_special(text):
            if part in self.all_special_tokens:
                pieces.append(part)
            else:
                pieces.extend(self.sp.encode(self._preprocess(part), out_type=str))
        return pieces

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """``ids + [gMASK, <sop>]`` (a pair appends ``ids_1 + [<eop>]``): GLM generates after ``<sop>``."""
        ids = list(token_ids_0) + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids += list(token_ids_1) + [self.eos_token_id]
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        add_special_tokens: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = None,
    ) -> dict[str, Any]:
        """HF-style batch encoding; with padding, also the GLM attention mask and 2-D position ids.

        ``padding``: False / "do_not_pad", True / "longest", or "max_length" (needs ``max_length``).
        ``attention_mask`` is True where attention is NOT allowed (the reference's convention),
        shape [1, L, L] per text; ``position_ids`` is [2, L] (positions, block positions).
        """
        single = isinstance(text, str)
        encoded = [self.encode(t, add_special_tokens) for t in ([text] if single else text)]
        target = self._padding_length(encoded, padding, max_length)
        if target is None:
            rows: list[dict[str, Any]] = [{"input_ids": ids} for ids in encoded]
        else:
            rows = [self._pad(ids, target) for ids in encoded]
        out = {key: [row[key] for row in rows] for key in rows[0]} if rows else {"input_ids": []}
        if return_tensors is not None:
            return self._to_tensors(out, return_tensors)
        return {key: value[0] for key, value in out.items()} if single else out

    @staticmethod
    def _padding_length(encoded: list[list[int]], padding: bool | str, max_length: int | None) -> int | None:
        if padding in (False, "do_not_pad"):
            return None
        if padding in (True, "longest"):
            return max((len(ids) for ids in encoded), default=0)
        if padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            return max_length
        raise ValueError(f"unknown padding {padding!r}")

    def _pad(self, ids: list[int], length: int) -> dict[str, Any]:
        """Left-pad to ``length`` (never truncates), with the reference's mask and position ids."""
        n = len(ids)
        context = ids.index(self.bos_token_id) if self.bos_token_id in ids else n
        mask_id = self.mask_token_id if self.mask_token_id in ids else self.gmask_token_id
        positions = list(range(n))
        if mask_id in ids:
            positions[context:] = [ids.index(mask_id)] * (n - context)
        blocks = [0] * context + list(range(1, n - context + 1))
        # Bidirectional over the context, causal from <sop> on; True = masked.
        mask = [[j >= context and j > i for j in range(n)] for i in range(n)]
        extra = max(length - n, 0)
        mask = [[True] * (extra + n) for _ in range(extra)] + [[True] * extra + row for row in mask]
        return {
            "input_ids": [self.pad_token_id] * extra + ids,
            "attention_mask": [mask],
            "position_ids": [[0] * extra + positions, [0] * extra + blocks],
        }

    @staticmethod
    def _to_tensors(out: dict[str, Any], return_tensors: str) -> dict[str, Any]:
        if return_tensors != "pt":
            raise ValueError(f"return_tensors={return_tensors!r}: only 'pt' is supported")
        import torch  # only needed here; the tokenizer itself does not depend on torch

        return {key: torch.tensor(value) for key, value in out.items()}

    # ----- decoding -----------------------------------------------------------------------
    def decode(
        self,
        token_ids: int | Iterable[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool = True,
    ) -> str:
        """Text of ``token_ids``: pads dropped, control pieces empty, whitespace pieces restored.

        Raises IndexError for ids >= ``vocab_size`` (as the reference does).
        """
        if hasattr(token_ids, "tolist"):  # torch / numpy
            token_ids = token_ids.tolist()
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        ids = [i for i in ids if i != self.pad_token_id]
        pieces = self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens)
        text = self._postprocess(self.sp.decode_pieces(pieces))
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(self, sequences: Iterable[Iterable[int]], **kwargs: Any) -> list[str]:
        return [self.decode(ids, **kwargs) for ids in sequences]

    @staticmethod
    def _postprocess(text: str) -> str:
        text = text.replace(NEWLINE_PIECE, "\n").replace(TAB_PIECE, "\t")
        for length in range(2, MAX_BLANK_LENGTH + 1):
            text = text.replace(blank_piece(length), " " * length)
        return text
