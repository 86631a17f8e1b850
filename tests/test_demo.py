"""The demo world (scenes, questions, answer checking), the shipped demo model, and a short few-shot LoRA."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from visualglm.demo import scenes as S
from visualglm.demo.data import fewshot_records, write_dataset, write_fewshot
from visualglm.demo.evaluate import evaluate, is_correct, mentioned
from visualglm.demo.train import ASSET_DIR


# ----- scenes ----------------------------------------------------------------------------------------------
def test_scenes_are_deterministic_per_seed_and_index():
    a, b = S.make_scenes(5, 30), S.make_scenes(5, 30)
    assert a == b
    assert S.make_scenes(6, 30) != a
    assert S.make_scenes(5, 40)[:30] == a  # scene i does not depend on how many are drawn
    assert np.array_equal(np.asarray(S.render(a[3])), np.asarray(S.render(b[3])))
    rng1, rng2 = random.Random(1), random.Random(1)
    assert [S.ask(s, t, la, rng1) for s in a for t in S.ALL_TYPES for la in S.LANGS] == \
        [S.ask(s, t, la, rng2) for s in b for t in S.ALL_TYPES for la in S.LANGS]


def test_every_question_has_one_answer():
    for scene in S.make_scenes(0, 300):
        n = len(scene.shapes)
        assert 1 <= n <= 3
        for attr in ("kind", "color", "position"):
            assert len({getattr(s, attr) for s in scene.shapes}) == n  # so each question names one shape
        assert scene.background not in S.COLORS
        for s in scene.shapes:
            assert scene.find(kind=s.kind) is s and scene.find(color=s.color) is s


def _probe(img: np.ndarray, x: float, y: float) -> tuple[int, ...]:
    return tuple(int(v) for v in img[round(y), round(x)])


def test_answers_agree_with_the_rendered_pixels():
    """Colour at each shape's centre, background in the corners, the kind from two probe points (a square
    fills its upper-right corner, a triangle its apex, a circle neither), the position from the centre."""
    for scene in S.make_scenes(3, 200):
        img = np.asarray(S.render(scene))
        assert img.shape == (224, 224, 3)
        bg = S.RGB[scene.background]
        assert all(_probe(img, x, y) == bg for x, y in ((1, 1), (222, 1), (1, 222), (222, 222)))
        for s in scene.shapes:
            x, y, r = *s.center, s.size
            color = S.RGB[s.color]
            assert _probe(img, x, y) == color
            corner, apex = _probe(img, x + 0.8 * r, y - 0.8 * r) == color, _probe(img, x, y - 1.1 * r) == color
            kind = "square" if corner else "triangle" if apex else "circle"
            assert kind == s.kind
            dx, dy = x - 112, y - 112
            where = ("center" if max(abs(dx), abs(dy)) < 30 else
                     ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("top" if dy < 0 else "bottom"))
            assert where == s.position
        answer = S.answer(scene, "count", "en")
        assert S.EN_NUMBER[len(scene.shapes)] in answer


def test_answer_checker_accepts_the_truth_and_rejects_other_facts():
    rng = random.Random(0)
    for scene in S.make_scenes(9, 100):
        for qtype in S.ALL_TYPES:
            for lang in S.LANGS:
                qa = S.ask(scene, qtype, lang, rng)
                assert is_correct(scene, qa, qa.answer), (qa, scene)
                if qtype != "describe":
                    kind = {"background": "color"}.get(qtype, qtype)
                    assert mentioned(qa.answer, kind, lang) == {qa.target}
    scene = S.Scene((S.Shape("circle", "red", "left", (48, 112), 20),
                     S.Shape("square", "blue", "top", (112, 48), 20)), "white")
    qa = S.ask(scene, "color", "en", random.Random(0))
    assert is_correct(scene, qa, f"It is {qa.target}.") and not is_correct(scene, qa, "It is green.")
    color_q = S.QA("color", "en", "What color is the circle?", "", "red", kind="circle")
    assert is_correct(scene, color_q, "Red.") and is_correct(scene, color_q, "The circle is red.")
    assert not is_correct(scene, color_q, "It is blue.")
    assert not is_correct(scene, color_q, "red or blue")
    assert not is_correct(scene, color_q, "The square is red.")
    assert not is_correct(scene, color_q, "The background is red.")
    where_q = S.QA("position", "zh", "红色的圆形在哪里？", "", "left", kind="circle", color="red")
    assert not is_correct(scene, where_q, "在右边。")
    assert is_correct(scene, where_q, "在图中的左边。")
    assert not is_correct(scene, where_q, "蓝色的圆形在左边。")
    describe_en = S.QA("describe", "en", "Describe this image.", "", "")
    assert is_correct(scene, describe_en, "A red circle and a blue square.")
    assert not is_correct(scene, describe_en, "A red circle.")
    assert not is_correct(scene, describe_en, "A red circle, a blue square and a green triangle.")
    describe_zh = S.QA("describe", "zh", "描述这张图片。", "", "")
    assert is_correct(scene, describe_zh, "左边有一个红色的圆形，上边有一个蓝色的正方形。")
    assert not is_correct(scene, describe_zh, "左边有一个红色的正方形，上边有一个蓝色的圆形。")



def test_patch_owners_follow_the_painted_pixels():
    from visualglm.demo.vision import patch_owners

    # a square centred on the corner shared by patches (3, 3), (3, 4), (4, 3), (4, 4) of the 8x8 grid
    scene = S.Scene((S.Shape("square", "red", "center", (112, 112), 24),
                     S.Shape("circle", "blue", "left", (42, 112), 20)), "white")
    owners = patch_owners(scene, 28).reshape(8, 8)
    assert owners[3:5, 3:5].eq(1).all() and owners[3:5, 3:5].numel() == (owners == 1).sum()
    assert (owners == 2).sum() >= 2 and owners[:, 3:].ne(2).all()  # the circle stays on the left
    assert owners[0].eq(0).all() and owners[-1].eq(0).all()


def test_vision_pretraining_learns_colours_from_pooled_patches():
    """From the recipe's initial values, a few dozen steps already name each shape's colour from the patches it
    covers and from the Q-Former outputs over its regions (shape kinds take the recipe's ~1000 steps)."""
    import torch

    from visualglm.demo.train import initial_model
    from visualglm.demo.vision import pretrain_vision

    model = initial_model(seed=0)
    vision = model.vision
    before = vision.patch_embed.weight.detach().clone()
    result = pretrain_vision(vision, model.qformer, steps=60, batch_size=16, lr=3e-3, log=lambda _: None,
                             log_every=60)
    assert result["step"] == 60 and result["vit_color_accuracy"] >= 0.9, result
    assert result["q_color_accuracy"] >= 0.75, result  # chance 1/6; ~0.5 from a plain random init
    assert not torch.equal(before, vision.patch_embed.weight)
    assert vision(torch.zeros(1, 3, 224, 224)).shape == (1, 65, 96)


def test_dataset_is_in_the_finetune_format(tmp_path: Path):
    from visualglm.finetune.data import load_samples
    from visualglm.tokenizer import ChatGLMTokenizer

    path = write_dataset(tmp_path / "d", seed=2, num_scenes=6, questions_per_scene=3)
    records = json.loads(path.read_text(encoding="utf-8"))
    assert len(records) == 18 and all((path.parent / r["img"]).is_file() for r in records)
    assert {r["lang"] for r in records} <= {"en", "zh"}
    tok = ChatGLMTokenizer.from_dir(ASSET_DIR)
    samples = load_samples(path, tok, image_length=32, max_length=256)
    assert len(samples) == 18
    assert all(tok.decode(s.input_ids[s.context_length + 1:-1]) for s in samples)
    scenes, few = fewshot_records(7, 20)
    background = [r for r in few if r["qtype"] == "background"]
    assert len(background) == 40 and {r["lang"] for r in background} == {"en", "zh"}
    assert sorted(s.background for s in scenes) == sorted(S.BACKGROUNDS * 5)  # balanced colours
    assert {int(r["img"].split("/")[1][:6]) for r in few} == set(range(20))  # nothing beyond the 20 scenes


# ----- the shipped model -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo():
    import visualglm

    return visualglm.load(None, device="cpu")


def test_shipped_folder_is_small_and_self_contained():
    files = {p.name: p.stat().st_size for p in ASSET_DIR.iterdir()}
    assert {"config.json", "ice_text.model", "tokenizer_config.json"} <= set(files)
    assert any(name.endswith(".safetensors") for name in files)
    assert sum(files.values()) <= 20 * 1024 * 1024


def test_demo_tokenizer_has_the_chatglm_pieces(demo):
    _, tok = demo
    assert tok.vocab_size < 1024
    assert tok.pad_token_id == 3 and tok.unk_token_id == 0
    assert tok.decode(tok.encode("a\tb  c\nd", add_special_tokens=False)) == "a\tb  c\nd"
    for text in ("There are two shapes: a red circle on the left and a blue square at the top.",
                 "图中有两个图形：左边有一个红色的圆形，上边有一个蓝色的正方形。"):
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert len(ids) < len(text)  # whole words, not characters
    assert tok.encode("红色")[-2:] == [tok.gmask_token_id, tok.bos_token_id]


def test_shipped_model_answers_colour_questions(demo):
    model, tok = demo
    assert model.config.name == "visualglm-demo"
    scenes = [s for s in S.make_scenes(4242, 40) if any(x.kind == "circle" for x in s.shapes)][:6]
    for scene in scenes:
        color = scene.find(kind="circle").color
        answer, _ = model.chat(tok, S.render(scene), "What color is the circle?", english=True, do_sample=False)
        assert mentioned(answer, "color", "en") == {color}, answer
        answer, _ = model.chat(tok, S.render(scene), "圆形是什么颜色的？", do_sample=False)
        assert mentioned(answer, "color", "zh") == {color}, answer
    # the default (sampling) settings of chat() give the same facts
    answer, _ = model.chat(tok, S.render(scenes[0]), "What color is the circle?", english=True, seed=0)
    assert mentioned(answer, "color", "en") == {scenes[0].find(kind="circle").color}


def test_fewshot_lora_teaches_the_background_question(demo, tmp_path: Path):
    """A shortened few-shot run (the recipe's settings, fewer steps): LoRA on the 20 scenes lifts background
    accuracy far above the base model's while colour questions stay right."""
    from visualglm.api import load
    from visualglm.cli import main as cli
    from visualglm.demo.train import FEWSHOT_SEED, Recipe

    r = Recipe()
    model, tok = demo
    before = evaluate(model, tok, seed=555, num_scenes=12, types=("background", "color"))
    data = write_fewshot(tmp_path / "few", seed=FEWSHOT_SEED, num_scenes=r.fewshot_scenes)
    out = tmp_path / "lora"
    code = cli(["finetune", "--model", str(ASSET_DIR), "--method", "lora", "--data", str(data), "--output",
                str(out), "--steps", str(r.fewshot_steps // 2), "--batch-size", str(r.fewshot_batch_size),
                "--micro-batch-size", str(r.fewshot_batch_size), "--lr", str(r.fewshot_lr),
                "--lora-rank", str(r.fewshot_rank), "--lora-alpha", str(2 * r.fewshot_rank),
                "--lora-targets", r.fewshot_targets, "--warmup-steps", str(r.fewshot_warmup_steps),
                "--no-gradient-checkpointing",
                "--dtype", "float32", "--eval-every", "0", "--no-progress", "--log-every", "100"])
    assert code == 0
    tuned, tok2 = load(ASSET_DIR, device="cpu", adapter=out)
    after = evaluate(tuned, tok2, seed=555, num_scenes=12, types=("background", "color"))
    b, a = before.accuracy("background"), after.accuracy("background")
    assert b <= 0.2
    assert a >= 0.6, (b, a, after.examples[:4])
    assert after.accuracy("color") >= before.accuracy("color") - 0.1


def test_readme_main_command_describes_the_example_image(capsys):
    """The README's first command (no --model, the default sampling settings) names every shape with its
    colour; the example image is a gray scene with a purple circle, an orange square and a green triangle."""
    from visualglm.cli import main as cli

    example = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
    scene = S.Scene((S.Shape("circle", "purple", "left", (40, 112), 24),
                     S.Shape("square", "orange", "right", (184, 112), 24),
                     S.Shape("triangle", "green", "bottom", (112, 184), 24)), "gray")
    for prompt, lang in (("Describe this image.", "en"), ("描述这张图片。", "zh")):
        assert cli(["chat", "--image", str(example), "--prompt", prompt, "--json", "--seed", "0"]) == 0
        response = json.loads(capsys.readouterr().out)["response"]
        assert is_correct(scene, S.QA("describe", lang, prompt, "", ""), response), response
