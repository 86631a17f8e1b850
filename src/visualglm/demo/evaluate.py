"""Accuracy of a model on fresh scenes, per question type and language.

An answer is right when it states the asked fact and nothing contradicting it: the set of colours (shapes,
positions, counts) it mentions must be exactly the expected one, whatever the wording. A description is
right when it names every shape with its colour and mentions no other shape. Exact match with the
training wording is reported beside it.

Command line: ``python -m visualglm.demo.evaluate --model DIR [--scenes 500] [--seed 20240] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .scenes import (
    ALL_TYPES,
    BACKGROUNDS,
    COLORS,
    LANGS,
    QA,
    QUESTION_TYPES,
    SHAPES,
    ZH,
    Scene,
    ask,
    make_scenes,
    render,
)

EVAL_SEED = 20240  # never used for training data
_ZH_COLOR = {c: ZH[c][0] for c in (*COLORS, *BACKGROUNDS)}  # 红, 绿, ... (the first character)
_ZH_SHAPE = {"circle": "圆", "square": "正方形|方形|方块", "triangle": "三角"}
_ZH_POSITION = {"left": "左", "right": "右", "top": "上", "bottom": "下", "center": "中间|中央|中心|正中"}
_EN_POSITION = {"left": "left", "right": "right", "top": "top|upper", "bottom": "bottom|lower",
                "center": "center|centre|middle"}
_EN_COUNT = {"1": "one|1|single", "2": "two|2", "3": "three|3"}
_ZH_COUNT = {"1": "一|1|单", "2": "两|二|2", "3": "三|3"}


def _normalise(text: str) -> str:
    return text.strip().lower()


def mentioned(text: str, kind: str, lang: str) -> set[str]:
    """The colours / shapes / positions / counts (``kind``) a text mentions."""
    text = _normalise(text)
    if kind == "color":
        if lang == "en":
            return {c for c in (*COLORS, *BACKGROUNDS) if re.search(rf"\b{c}\b", text)}
        return {c for c, ch in _ZH_COLOR.items() if ch in text}
    if kind == "shape":
        if lang == "en":
            return {s for s in SHAPES if re.search(rf"\b{s}s?\b", text)}
        return {s for s, pat in _ZH_SHAPE.items() if re.search(pat, text)}
    if kind == "position":
        if lang == "en":
            return {p for p, pat in _EN_POSITION.items() if re.search(rf"\b(?:{pat})\b", text)}
        # 左/右/上/下 only as a place (左边, 上面, 下方...); "图中" is not "in the centre".
        hits = {p for p, ch in _ZH_POSITION.items() if p != "center" and re.search(rf"(?:{ch})(?:边|面|方|侧|部)", text)}
        return hits | ({"center"} if re.search(_ZH_POSITION["center"], text) else set())
    if kind == "count":
        if lang == "en":
            return {n for n, pat in _EN_COUNT.items() if re.search(rf"\b(?:{pat})\b", text)}
        return {n for n, pat in _ZH_COUNT.items() if re.search(rf"(?:{pat})\s*个", text)}
    raise ValueError(f"unknown fact kind {kind!r}")


def description_ok(scene: Scene, text: str, lang: str) -> bool:
    """Every shape named with its colour, and no more shape mentions than shapes."""
    t = _normalise(text)
    for s in scene.shapes:
        if lang == "en":
            pattern = rf"\b{s.color}\s+{s.kind}\b"
        else:
            pattern = rf"{_ZH_COLOR[s.color]}色?的?(?:{_ZH_SHAPE[s.kind]})"
        if not re.search(pattern, t):
            return False
    if lang == "en":
        named = len(re.findall(r"\b(?:circle|square|triangle)\b", t))
    else:
        named = len(re.findall("|".join(_ZH_SHAPE.values()), t))
    return named == len(scene.shapes)


def is_correct(scene: Scene, qa: QA, response: str) -> bool:
    """The asked fact, exactly, and nothing about another object: "The background is red." does not answer
    "What color is the circle?" even when the circle is red, nor does "The square is red."."""
    if qa.qtype == "describe":
        return description_ok(scene, response, qa.lang)
    if qa.qtype == "count":
        return mentioned(response, "count", qa.lang) == {qa.target}
    fact = {"background": "color"}.get(qa.qtype, qa.qtype)
    if mentioned(response, fact, qa.lang) != {qa.target}:
        return False
    named = {"color": {qa.color} - {None}, "shape": {qa.kind} - {None}}
    for other in ("color", "shape"):
        if other != fact and not mentioned(response, other, qa.lang) <= named[other]:
            return False
    about_background = re.search(r"background|背景", response.lower()) is not None
    return about_background == (qa.qtype == "background")


@dataclass
class Report:
    """Per ``type/lang`` key: number asked, number right (parsed), number exactly as trained."""

    asked: dict[str, int] = field(default_factory=dict)
    right: dict[str, int] = field(default_factory=dict)
    exact: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    scenes: int = 0
    seed: int = 0

    def add(self, qa: QA, response: str, ok: bool) -> None:
        key = f"{qa.qtype}/{qa.lang}"
        self.asked[key] = self.asked.get(key, 0) + 1
        self.right[key] = self.right.get(key, 0) + int(ok)
        self.exact[key] = self.exact.get(key, 0) + int(_same(response, qa.answer))
        if not ok and len(self.examples) < 40:
            self.examples.append({"question": qa.question, "expected": qa.answer, "got": response})

    def accuracy(self, qtype: str, lang: str | None = None) -> float:
        keys = [f"{qtype}/{lang}"] if lang else [f"{qtype}/{la}" for la in LANGS]
        asked = sum(self.asked.get(k, 0) for k in keys)
        return sum(self.right.get(k, 0) for k in keys) / asked if asked else float("nan")

    def to_dict(self) -> dict[str, Any]:
        acc = {k: self.right[k] / n for k, n in self.asked.items()}
        exact = {k: self.exact[k] / n for k, n in self.asked.items()}
        return {"seed": self.seed, "scenes": self.scenes, "accuracy": acc, "exact_match": exact,
                "asked": self.asked, "seconds": round(self.seconds, 1), "wrong_examples": self.examples}

    def table(self) -> str:
        """A markdown table: one row per question type, accuracy (exact match) per language."""
        types = [t for t in ALL_TYPES if any(k.startswith(t + "/") for k in self.asked)]
        langs = [la for la in LANGS if any(k.endswith("/" + la) for k in self.asked)]
        head = "| question type | " + " | ".join(f"{la} (n)" for la in langs) + " |"
        rows = [head, "|---|" + "---|" * len(langs)]
        for t in types:
            cells = []
            for la in langs:
                k = f"{t}/{la}"
                if k in self.asked:
                    n = self.asked[k]
                    cells.append(f"{100 * self.right[k] / n:.1f} % ({100 * self.exact[k] / n:.0f} % exact, n={n})")
                else:
                    cells.append("-")
            rows.append(f"| {t} | " + " | ".join(cells) + " |")
        return "\n".join(rows)


def _same(a: str, b: str) -> bool:
    table = str.maketrans("，：？！；", ",:?!;")
    return a.strip().translate(table) == b.strip().translate(table)


def questions(seed: int, num_scenes: int, types: Sequence[str], langs: Sequence[str]
              ) -> list[tuple[Scene, QA]]:
    """For each scene of stream ``seed``: one question of each type in each language."""
    rng = random.Random(f"visualglm-demo-eval:{seed}")
    return [(scene, ask(scene, t, la, rng)) for scene in make_scenes(seed, num_scenes) for t in types
            for la in langs]


def evaluate(model: Any, tokenizer: Any, *, seed: int = EVAL_SEED, num_scenes: int = 500,
             types: Sequence[str] = QUESTION_TYPES, langs: Sequence[str] = LANGS, batch_size: int = 50,
             sampling: dict[str, Any] | None = None, english_form: str = "auto") -> Report:
    """Ask every question (greedy by default) in batches; ``english_form``: "auto" (English questions in the
    Q:/A: prompt form, as ``visualglm chat`` does) or "zh" (always 问/答, ``model.chat``'s default)."""
    sampling = {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": 64, **(sampling or {})}
    report = Report(scenes=num_scenes, seed=seed)
    start = time.perf_counter()
    items = questions(seed, num_scenes, types, langs)
    for lang, qtype in [(la, t) for la in langs for t in types]:  # one type per batch: similar lengths
        todo = [(scene, qa) for scene, qa in items if qa.lang == lang and qa.qtype == qtype]
        english = lang == "en" and english_form == "auto"
        for i in range(0, len(todo), batch_size):
            chunk = todo[i: i + batch_size]
            outs = model.batch_chat(tokenizer, [(render(s), qa.question) for s, qa in chunk], english=english,
                                    **sampling)
            for (scene, qa), (response, _) in zip(chunk, outs, strict=True):
                report.add(qa, response, is_correct(scene, qa, response))
    report.seconds = time.perf_counter() - start
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visualglm.demo.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the shipped demo model)")
    parser.add_argument("--adapter", default=None, help="adapter folder to apply (LoRA / P-tuning)")
    parser.add_argument("--scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--types", default=",".join(QUESTION_TYPES),
                        help=f"comma-separated question types among {','.join(ALL_TYPES)}")
    parser.add_argument("--langs", default=",".join(LANGS))
    parser.add_argument("--json", default=None, help="write the full report here")
    args = parser.parse_args(argv)
    from ..api import load

    kwargs = {"adapter": args.adapter} if args.adapter else {}
    model, tok = load(args.model, device="cpu", **kwargs)
    types = [t for t in args.types.split(",") if t]
    unknown = sorted(set(types) - set(ALL_TYPES))
    if unknown:
        parser.error(f"unknown question type(s) {unknown}; known: {', '.join(ALL_TYPES)}")
    report = evaluate(model, tok, seed=args.seed, num_scenes=args.scenes, types=types,
                      langs=[la for la in args.langs.split(",") if la])
    print(report.table())
    print(f"({report.seconds:.0f} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
