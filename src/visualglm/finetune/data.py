"""Fine-tuning data: records -> samples built exactly like the original VisualGLM ``finetune_visualglm.py``.

Accepted files (one format per file, detected from the content):
* the original JSON list ``[{"img": "a.jpg", "prompt": "...", "label": "..."}, ...]``;
* JSONL, one such record per line;
* LLaVA-style multi-turn records ``{"image": "a.jpg", "conversations": [{"from": "human", "value": ...},
  {"from": "gpt", "value": ...}, ...]}`` (in a JSON list or JSONL); each ``gpt`` turn becomes one sample whose
  prompt carries the earlier turns as history, the way chat() builds it.
Image paths are relative to the data file's folder (or ``image_root``); a record without an image is a
text-only sample.

A sample is ``build_prompt(...)`` (``<img>`` + 32 placeholders + ``</img>问：{prompt}\\n答：`` + ``[gMASK] <sop>``)
followed by the label's ids and ``<eop>``. ``labels`` equal ``input_ids`` from ``<sop>`` on and -100 before,
and the loss compares the logits at position i with the label at i + 1 (a causal LM shift): ``<sop>`` is
predicted from ``[gMASK]``, then every answer token, then ``<eop>``. Every bad record is reported (file,
line or index, reason) before training starts; nothing is truncated.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..image import ImageError, image_to_tensor, load_image
from ..prompt import build_prompt, has_cjk

IGNORE = -100
HUMAN = ("human", "user")
ASSISTANT = ("gpt", "assistant")
IMAGE_MARKER = "<image>"


class DataError(ValueError):
    """Bad training data; ``problems`` lists every (where, reason)."""

    def __init__(self, problems: list[tuple[str, str]], total: int) -> None:
        self.problems = problems
        shown = "\n".join(f"  {where}: {reason}" for where, reason in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{len(problems)} bad record(s) out of {total}:\n{shown}{more}\n"
                         "Fix them, or pass --skip-bad to leave them out with a warning.")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # input_ids from <sop> on, IGNORE before
    context_length: int  # index of <sop>
    mask_position: int  # index of [gMASK]
    pre_image: int  # index of the first image placeholder (0 without image)
    image: Path | None
    query: str
    history: list[tuple[str, str]]
    answer: str
    english: bool
    where: str  # "file:line" or "file[index]" for messages
    record: int  # records stay together when splitting off an eval set

    @property
    def num_targets(self) -> int:
        return sum(1 for x in self.labels[1:] if x != IGNORE)


@dataclass
class DataConfig:
    """train: data file; eval: held-out file, or eval_fraction of the train records (split by record)."""

    train: str = ""
    eval: str | None = None
    eval_fraction: float = 0.0
    image_root: str | None = None
    lang: str = "auto"  # zh (问/答, the original), en (Q/A), auto = en when the query has no CJK
    max_length: int | None = None  # default: the model's max_sequence_length
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if self.lang not in ("auto", "zh", "en"):
            raise ValueError(f"lang must be auto, zh or en, got {self.lang!r}")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


@dataclass
class _Turns:
    image: str | None
    turns: list[tuple[str, str]]
    lang: str | None
    where: str
    index: int


# ----- reading records --------------------------------------------------------------------------------------
def read_records(path: Path) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """(where, record) pairs and (where, reason) problems. JSON list or JSONL, told apart by the content."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError([(str(path), f"cannot read: {e}")], 0) from e
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            return [], [(f"{path}:{e.lineno}", f"bad JSON: {e.msg} (column {e.colno})")]
        return [(f"{path}[{i}]", r) for i, r in enumerate(data)], []
    records, problems = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append((f"{path}:{lineno}", f"bad JSON: {e.msg} (column {e.colno})"))
    if not records and not problems:
        problems.append((str(path), "no records (expected a JSON list or one JSON object per line)"))
    return records, problems


def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        kind = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise ValueError(f"'{key}' is {kind}")
    return value


def parse_record(record: Any, where: str, index: int) -> _Turns:
    """One record -> its image and (question, answer) turns; raises ValueError with the reason."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    image = record.get("img", record.get("image"))
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ValueError("'img'/'image' must be a non-empty path string")
    lang = record.get("lang")
    if lang not in (None, "zh", "en"):
        raise ValueError(f"'lang' must be zh or en, got {lang!r}")
    if "conversations" in record:
        turns = _conversation_turns(record["conversations"])
    elif "prompt" in record or "label" in record:
        turns = [(_text(record, "prompt"), _text(record, "label"))]
    else:
        raise ValueError("expected keys prompt + label (with img) or conversations (with image)")
    for q, a in turns:
        if not a.strip():
            raise ValueError("empty label/answer")
        if not q.strip():
            raise ValueError("empty prompt/question")
    return _Turns(image, turns, lang, where, index)


def _conversation_turns(conv: Any) -> list[tuple[str, str]]:
    if not isinstance(conv, list) or not conv:
        raise ValueError("'conversations' must be a non-empty list")
    turns = []
    for i in range(0, len(conv), 2):
        pair = conv[i:i + 2]
        roles = [t.get("from") if isinstance(t, dict) else None for t in pair]
        if len(pair) < 2:
            raise ValueError(f"conversations[{i}] ({roles[0]}) has no gpt answer after it")
        if roles[0] not in HUMAN or roles[1] not in ASSISTANT:
            raise ValueError(f"conversations[{i}:{i + 2}] must be human then gpt, got {roles}")
        q, a = (t.get("value") for t in pair)
        if not isinstance(q, str) or not isinstance(a, str):
            raise ValueError(f"conversations[{i}:{i + 2}] 'value' must be strings")
        turns.append((q.replace(IMAGE_MARKER, "").strip(), a))
    return turns


# ----- building samples ---------------------------------------------------------------------------------
def build_sample(tokenizer: Any, query: str, history: list[tuple[str, str]], answer: str, *, english: bool,
                 image: Path | None, image_length: int, where: str = "", record: int = 0) -> Sample:
    """Prompt ids (THE prompt builder) + answer ids + <eop>; labels from <sop> on."""
    prompt = build_prompt(tokenizer, query, history, english=english, image=image is not None,
                          image_length=image_length)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    if not answer_ids:
        raise ValueError("the label encodes to no tokens")
    ids = prompt.input_ids + answer_ids + [tokenizer.eos_token_id]
    context = len(prompt.input_ids) - 1  # <sop>
    labels = [IGNORE] * context + ids[context:]
    return Sample(ids, labels, context, context - 1, prompt.pre_image, image, query, list(history), answer,
                  english, where, record)


def _resolve_image(rel: str, base: Path) -> Path:
    p = Path(rel).expanduser()
    return p if p.is_absolute() else base / p


def load_samples(path: str | Path, tokenizer: Any, *, image_length: int, max_length: int,
                 lang: str = "auto", image_root: str | Path | None = None, skip_bad: bool = False,
                 warn=print) -> list[Sample]:
    """Read, check and tokenize a whole file. Raises DataError listing every bad record (unless skip_bad)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    base = Path(image_root).expanduser() if image_root is not None else path.parent
    records, problems = read_records(path)
    total = len(records) + len(problems)  # unparsable lines count as records
    checked: dict[Path, str | None] = {}
    samples: list[Sample] = []
    for index, (where, record) in enumerate(records):
        try:
            samples += _record_samples(record, where, index, tokenizer, base, checked, image_length,
                                       max_length, lang)
        except ValueError as e:
            problems.append((where, str(e)))
    if problems:
        if not skip_bad:
            raise DataError(problems, total)
        warn(f"warning: skipped {len(problems)} bad record(s) of {total} in {path} "
             f"(first: {problems[0][0]}: {problems[0][1]})")
    if not samples:
        raise DataError(problems or [(str(path), "no usable samples")], total)
    return samples


def _record_samples(record: Any, where: str, index: int, tokenizer: Any, base: Path,
                    checked: dict[Path, str | None], image_length: int, max_length: int, lang: str
                    ) -> list[Sample]:
    turns = parse_record(record, where, index)
    image = None
    if turns.image is not None:
        image = _resolve_image(turns.image, base)
        if image not in checked:
            checked[image] = _image_problem(image)
        if checked[image]:
            raise ValueError(checked[image])
    out = []
    for k, (q, a) in enumerate(turns.turns):
        chosen = turns.lang or lang
        english = chosen == "en" or (chosen == "auto" and not has_cjk(q))
        s = build_sample(tokenizer, q, turns.turns[:k], a, english=english, image=image,
                         image_length=image_length, where=where, record=index)
        if len(s.input_ids) > max_length:
            raise ValueError(f"too long: {len(s.input_ids)} tokens > max_length {max_length} (prompt "
                             f"{s.context_length + 1}, answer {len(s.input_ids) - s.context_length - 1} "
                             f"incl. <eop>{f', turn {k + 1}' if len(turns.turns) > 1 else ''})")
        out.append(s)
    return out


def _image_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"image not found: {path}"
    try:
        load_image(path)
    except (ImageError, OSError) as e:
        return f"unreadable image {path}: {e}"
    return None


def split_by_record(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic held-out split; all samples of one record land on the same side."""
    records = sorted({s.record for s in samples})
    n_eval = max(1, round(len(records) * fraction)) if fraction > 0 else 0
    if n_eval >= len(records):
        raise ValueError(f"eval_fraction {fraction} leaves no training records ({len(records)} in all)")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=g).tolist()
    held = {records[i] for i in order[:n_eval]}
    return [s for s in samples if s.record not in held], [s for s in samples if s.record in held]


# ----- order and batches -----------------------------------------------------------------------------------
@dataclass
class SampleStream:
    """The global sample order: epoch e is a permutation seeded by (seed, e); global batch k is stream items
    [k * B, (k + 1) * B). A step number alone therefore fixes the data position, on any number of ranks."""

    num_samples: int
    seed: int = 0
    shuffle: bool = True
    _perms: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def item(self, j: int) -> int:
        epoch, i = divmod(j, self.num_samples)
        if not self.shuffle:
            return i
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.num_samples, generator=g).tolist()}
        return self._perms[epoch][i]

    def global_batch(self, step: int, batch_size: int) -> list[int]:
        return [self.item(j) for j in range(step * batch_size, (step + 1) * batch_size)]


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This rank's part of a global batch (strided, like DistributedSampler)."""
    return indices[rank::world]


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) right-padded
    position_ids: torch.Tensor  # (B, 2, T)
    context_lengths: torch.Tensor  # (B,)
    targets: torch.Tensor  # (B, T): the label of position t + 1 (IGNORE where no loss)
    pixels: torch.Tensor | None  # (N, 3, H, W) for the rows that have an image
    image_offsets: torch.Tensor | None  # (N, 2): (row, pre_image)
    image_paths: list[Path]  # (N,) for embedding caches
    num_targets: int

    def to(self, device: torch.device) -> Batch:
        move = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**move)


class ImageLoader:
    """Path -> preprocessed pixels (1, 3, H, W), with a small LRU cache (the same images recur every epoch)."""

    def __init__(self, size: int, capacity: int = 512) -> None:
        self.size, self.capacity = size, capacity
        self._cache: OrderedDict[Path, torch.Tensor] = OrderedDict()

    def __call__(self, path: Path) -> torch.Tensor:
        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        t = image_to_tensor(path, size=self.size)
        self._cache[path] = t
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return t


def collate(samples: list[Sample], pad_id: int, images: ImageLoader | None) -> Batch:
    """Right-pad to the longest sample; 2-D positions as the original (context 0..c-1, then the [gMASK]
    index with block positions 1, 2, ...)."""
    width = max(len(s.input_ids) for s in samples)
    b = len(samples)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    targets = torch.full((b, width), IGNORE, dtype=torch.long)
    pos = torch.zeros((b, 2, width), dtype=torch.long)
    pixels, offsets, paths = [], [], []
    for row, s in enumerate(samples):
        n, c = len(s.input_ids), s.context_length
        ids[row, :n] = torch.tensor(s.input_ids)
        targets[row, : n - 1] = torch.tensor(s.labels[1:])
        pos[row, 0] = torch.arange(width).clamp(max=s.mask_position)  # [gMASK] index from <sop> on
        pos[row, 1, c:] = torch.arange(1, width - c + 1)
        if s.image is not None and images is not None:
            pixels.append(images(s.image))
            offsets.append((row, s.pre_image))
            paths.append(s.image)
    contexts = torch.tensor([s.context_length for s in samples])
    return Batch(ids, pos, contexts, targets, torch.cat(pixels) if pixels else None,
                 torch.tensor(offsets) if offsets else None, paths, int((targets != IGNORE).sum()))
