"""Write scene datasets in the fine-tuning format: a folder of PNGs plus a JSON list of records.

A record is the original VisualGLM format ``{"img": "images/000012.png", "prompt": ..., "label": ...}``
(``img`` relative to the JSON file's folder), so ``visualglm finetune --data FOLDER/data.json`` reads it
unchanged. Each scene is rendered once and asked several questions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from .scenes import BACKGROUNDS, FEWSHOT_TYPE, LANGS, QUESTION_TYPES, Lang, Scene, ask, make_scenes, render

DATA_FILE = "data.json"
IMAGE_DIR = "images"


def scene_records(seed: int, num_scenes: int, *, types: Sequence[str] = QUESTION_TYPES,
                  langs: Sequence[Lang] = LANGS, questions_per_scene: int = 1,
                  type_weights: Sequence[float] | None = None, zh_form_share: float = 0.25
                  ) -> tuple[list[Scene], list[dict]]:
    """Scenes of stream ``seed`` and, per scene, ``questions_per_scene`` random (type, language) questions.

    ``lang`` of a record is the prompt form the trainer builds (``en``: ``Q:``/``A:``, ``zh``: ``问：``/``答：``):
    Chinese questions always use 问/答; ``zh_form_share`` of the English ones do too, because that is what
    ``model.chat()`` builds unless told ``english=True``. Returns (scenes, records); ``qtype`` and ``target``
    are kept for evaluation and ignored by the trainer.
    """
    rng = random.Random(f"visualglm-demo-questions:{seed}")
    scenes = make_scenes(seed, num_scenes)
    records = []
    for i, scene in enumerate(scenes):
        for _ in range(questions_per_scene):
            qtype = rng.choices(list(types), weights=type_weights)[0]
            qa = ask(scene, qtype, rng.choice(list(langs)), rng)
            form = "zh" if qa.lang == "zh" or rng.random() < zh_form_share else "en"
            records.append({"img": f"{IMAGE_DIR}/{i:06d}.png", "prompt": qa.question, "label": qa.answer,
                            "lang": form, "qtype": qa.qtype, "target": qa.target})
    return scenes, records


def write_dataset(out_dir: str | Path, seed: int, num_scenes: int, **kwargs) -> Path:
    """Render the scenes and write ``data.json``; returns the JSON file's path.

    Keyword arguments go to :func:`scene_records`. The JSON file is written last, through a temporary
    name, so a half-written folder is never mistaken for a dataset.
    """
    return write_records(out_dir, *scene_records(seed, num_scenes, **kwargs))


def write_records(out_dir: str | Path, scenes: Sequence[Scene], records: list[dict]) -> Path:
    """Render ``scenes`` as ``images/{index}.png`` and write ``records`` as ``data.json``."""
    out = Path(out_dir)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        render(scene).save(out / IMAGE_DIR / f"{i:06d}.png", compress_level=1)
    target = out / DATA_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    os.replace(tmp, target)
    return target


def write_fewshot(out_dir: str | Path, seed: int, num_scenes: int = 20, *, replay: bool = True) -> Path:
    """The few-shot demo data: ``num_scenes`` scenes, see :func:`fewshot_records`."""
    return write_records(out_dir, *fewshot_records(seed, num_scenes, replay=replay))


def fewshot_records(seed: int, num_scenes: int = 20, *, replay: bool = True) -> tuple[list[Scene], list[dict]]:
    """Each scene asked the background question in both languages (background colours balanced).

    With ``replay``, each scene is also asked every known question type in both languages (the same 20
    images): with only background examples, LoRA learns that "... is" is followed by a colour and answers
    "What color is the circle?" with the background, "Where is the blue triangle?" with "The blue triangle
    is blue." (measured: up to 11 points lost on a known type when only colour questions were replayed).
    """
    rng = random.Random(f"visualglm-demo-fewshot:{seed}")
    scenes = [dataclasses.replace(s, background=BACKGROUNDS[i % len(BACKGROUNDS)])
              for i, s in enumerate(make_scenes(seed, num_scenes))]
    records = []
    for i, scene in enumerate(scenes):
        asked = [(FEWSHOT_TYPE, "zh"), (FEWSHOT_TYPE, "en")]
        if replay:
            asked += [(t, la) for t in QUESTION_TYPES for la in LANGS]
        for qtype, lang in asked:
            qa = ask(scene, qtype, lang, rng)
            records.append({"img": f"{IMAGE_DIR}/{i:06d}.png", "prompt": qa.question, "label": qa.answer,
                            "lang": lang, "qtype": qa.qtype, "target": qa.target})
    return scenes, records
