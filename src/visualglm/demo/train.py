"""Reproduce the shipped demo model from scratch, with the project's own fine-tuning machinery.

``python -m visualglm.demo.train`` runs every step in order and writes the numbers into the model card:

1. the demo tokenizer (SentencePiece, trained on the scene corpus);
2. the training data: rendered scenes + questions (``data.json`` in the fine-tuning format);
3. ``visualglm finetune --method full --init random --model visualglm-demo`` (the named config);
4. the shipped folder (config, weights, tokenizer) at ``--output``;
5. the evaluation on 500 scenes from an unseen seed;
6. the few-shot demo: ``visualglm finetune --method lora`` on 20 background-colour scenes, before/after;
7. the model card's results section (``docs/visualglm-demo.md``) and ``results.json`` in the work folder.

The defaults are the recipe of the shipped model (under 60 minutes on 2 CPU cores); ``--quick`` shrinks
every step for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import write_dataset, write_fewshot
from .evaluate import EVAL_SEED, Report, evaluate
from .scenes import FEWSHOT_TYPE, QUESTION_TYPES, ZH
from .tokenizer import train_tokenizer
from .vision import pretrain_vision

TRAIN_SEED = 1
FEWSHOT_SEED = 7
FEWSHOT_EVAL_SEED = 31337
SHIPPED_FILES = ("config.json", "model.safetensors.index.json", "ice_text.model", "tokenizer_config.json")
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "visualglm-demo"
CARD = Path(__file__).resolve().parents[3] / "docs" / "visualglm-demo.md"
DEMO_DOC = CARD.with_name("demo.md")
POSITION_SCALE = 1.5  # sin-cos values (std 0.71) x 1.5 ~ the std of the initial patch tokens (~1)
QUERY_SHARPNESS = 3.0  # scale of the initial query projection: how narrowly a query looks at its region


@dataclass
class Recipe:
    """Every number of the demo recipe (the defaults are the shipped model's)."""

    scenes: int = 20000
    questions_per_scene: int = 2
    vision_steps: int = 1500  # vision tower + Q-Former pretraining (see ``demo.vision``)
    stage1_steps: int = 2500  # vision tower and Q-Former frozen
    steps: int = 1000  # everything trained
    batch_size: int = 32
    lr: float = 2e-3
    stage2_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    eval_every: int = 1000  # held-out loss and exact match while training (and a resumable checkpoint)
    eval_scenes: int = 500
    fewshot_scenes: int = 20
    fewshot_steps: int = 400
    fewshot_batch_size: int = 8
    fewshot_lr: float = 3e-3
    fewshot_warmup_steps: int = 10
    fewshot_rank: int = 8
    fewshot_targets: str = "glm.attention.query_key_value,glm.attention.dense"  # the original's LoRA targets
    fewshot_eval_scenes: int = 100
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def quick(cls) -> Recipe:
        return cls(scenes=64, questions_per_scene=2, vision_steps=2, stage1_steps=2, steps=2, batch_size=8, warmup_steps=1,
                   eval_every=2, eval_scenes=4, fewshot_scenes=4, fewshot_steps=2, fewshot_warmup_steps=1, fewshot_batch_size=4,
                   fewshot_eval_scenes=4)


def finetune(args: list[str]) -> None:
    """``visualglm finetune ARGS`` in this process; a failure stops the recipe."""
    from ..cli import main as cli

    print("$ visualglm finetune " + " ".join(args), flush=True)
    code = cli(["finetune", *args])
    if code:
        raise SystemExit(f"visualglm finetune failed with exit code {code}")


def grid_positions(rows: torch.Tensor, cols: torch.Tensor, dim: int, heads: int) -> torch.Tensor:
    """(N, dim) sine-cosine codes of (row, col) grid coordinates, laid out per attention head: each head's
    block holds [sin r w, cos r w, sin c w, cos c w] for its own share of the frequencies w = pi (k + 1) / 7,
    so the dot product of two codes *within one head* is sum_k cos(dr w_k) + cos(dc w_k): sharply peaked
    where the two coordinates meet, about zero a step away."""
    per_head = dim // heads
    if per_head % 4:
        raise ValueError(f"head size {per_head} must be a multiple of 4 for 2-D sine-cosine codes")
    freqs = torch.pi * torch.arange(1, per_head // 4 + 1, dtype=torch.float32) / 7  # (F,)
    r, c = rows.float()[:, None] * freqs, cols.float()[:, None] * freqs  # (N, F) each
    block = torch.cat([r.sin(), r.cos(), c.sin(), c.cos()], dim=1)  # (N, 4F): one head's code
    return block.repeat(1, heads)  # (N, dim); every head sees the whole position


def pooling_filters(patch: int, channels: int, cells: int = 4) -> torch.Tensor:
    """(channels * cells^2, channels, patch, patch): the mean of one channel over one cell of a cells x cells
    grid of the patch."""
    size = patch // cells
    filters = torch.zeros(channels, cells, cells, channels, patch, patch)
    for c in range(channels):
        for i in range(cells):
            for j in range(cells):
                filters[c, i, j, c, i * size:(i + 1) * size, j * size:(j + 1) * size] = 1.0 / size**2
    return filters.reshape(channels * cells * cells, channels, patch, patch)


def initial_model(seed: int = 0) -> torch.nn.Module:
    """The named config's seeded random init with starting values for the vision side that make training from
    scratch on two CPU cores work (every weight is still trained):

    * ViT: 2-D sine-cosine position embeddings about as large as the patch tokens, residual branches
      starting at zero (the ViT begins as the identity), half of the patch filters starting as 7x7 average
      pools (each token then holds a 4x4 colour thumbnail of its patch);
    * Q-Former: query i starts looking at one 2-patch region of the 8x8 grid (its query token is the code of
      the region's centre; layer 0's cross-attention compares it with the patches' position codes), all
      other residual branches start at zero, so the 32 outputs begin as a coarse feature map.

    With the plain random init the model learns which colours are present and how many shapes there are,
    but the Q-Former's cross-attention stays a bag-of-patches average: where things are and what shape they
    have never reach the language model (checked with linear probes; the loss plateaus).
    """
    from ..config import VisualGLMConfig
    from ..model.init import random_model

    config = VisualGLMConfig.from_name("visualglm-demo")
    model = random_model(config, seed=seed)
    v, q = config.vision, config.qformer
    grid = v.image_size // v.patch_size
    rows, cols = torch.div(torch.arange(grid * grid), grid, rounding_mode="floor"), torch.arange(grid * grid) % grid
    patch_codes = grid_positions(rows, cols, v.hidden_size, q.num_heads)  # (P, C)
    with torch.no_grad():
        model.vision.pos_embed.zero_()
        model.vision.pos_embed[1:] = POSITION_SCALE * patch_codes
        for layer in model.vision.layers:
            layer.attention.dense.weight.zero_()
            layer.mlp.dense_4h_to_h.weight.zero_()
        pools = pooling_filters(v.patch_size, v.in_channels)  # (K, 3, p, p)
        model.vision.patch_embed.weight[: pools.shape[0]] = pools
        _spatial_queries(model.qformer, grid, q.num_query_tokens)
    return model


def initial_checkpoint(out: Path, tokenizer_dir: Path, seed: int = 0, vision_steps: int = 0) -> Path:
    """``initial_model`` with its vision tower and Q-Former pretrained (``demo.vision``), as a checkpoint."""
    from ..checkpoint.write import write_checkpoint

    model = initial_model(seed)
    if vision_steps:
        pretrain_vision(model.vision, model.qformer, steps=vision_steps, seed=seed)
    return write_checkpoint(out, model.config, iter(model.state_dict().items()), tokenizer_dir=tokenizer_dir,
                            overwrite=True)


def _spatial_queries(qformer: torch.nn.Module, grid: int, num_queries: int) -> None:
    """Query i <- region i (row-major, each region ``grid * grid / num_queries`` patches wide in a row)."""
    width = grid * grid // num_queries  # patches per region, along a row
    regions = torch.arange(num_queries)
    rows = torch.div(regions * width, grid, rounding_mode="floor")
    cols = (regions * width) % grid + (width - 1) / 2  # the region's centre column
    hidden, heads = qformer.cfg.hidden_size, qformer.cfg.num_heads
    qformer.query_tokens.copy_(grid_positions(rows, cols, hidden, heads))
    eye = torch.eye(hidden)
    for i, layer in enumerate(qformer.layers):
        layer.attention.dense.weight.zero_()
        layer.mlp.dense_4h_to_h.weight.zero_()
        if layer.cross_attention is None:
            continue
        if i > 0:
            layer.cross_attention.dense.weight.zero_()
            continue
        ca = layer.cross_attention
        ca.query.weight.copy_(QUERY_SHARPNESS * eye)
        ca.key_value.weight.copy_(torch.cat([eye, eye]))  # keys and values: the vision tokens themselves
        ca.dense.weight.copy_(eye)
        for lin in (ca.query, ca.key_value, ca.dense):
            lin.bias.zero_()


def train_base(work: Path, r: Recipe) -> Path:
    """Tokenizer, data, initial weights, then two ``visualglm finetune --method full`` stages: the language
    side first (vision frozen at its initial values, so it learns to read the Q-Former's spatial map before
    anything can blur it), then everything."""
    tok = train_tokenizer(work / "tokenizer")
    data = write_dataset(work / "train", TRAIN_SEED, r.scenes, questions_per_scene=r.questions_per_scene)
    init = initial_checkpoint(work / "init", tok, vision_steps=r.vision_steps)
    stage1, out = work / "stage1", work / "model"
    common = ["--method", "full", "--data", str(data), "--batch-size", str(r.batch_size),
              "--micro-batch-size", str(r.batch_size), "--weight-decay", str(r.weight_decay),
              "--min-lr-ratio", "0.05", "--no-gradient-checkpointing", "--precision", "fp32", "--dtype", "float32",
              "--log-every", "50", "--eval-fraction", "0.005", "--eval-every", str(r.eval_every),
              "--eval-max-samples", "100", "--save-every", str(r.eval_every), "--keep-checkpoints", "1",
              "--seed", "0", "--overwrite", "--no-progress"]
    finetune(["--model", str(init), "--train", "proj,glm", "--output", str(stage1), "--steps", str(r.stage1_steps),
              "--lr", str(r.lr), "--warmup-steps", str(r.warmup_steps), *common])
    finetune(["--model", str(stage1), "--train", "vision,qformer,proj,glm", "--output", str(out),
              "--steps", str(r.steps), "--lr", str(r.stage2_lr), "--warmup-steps", str(r.warmup_steps), *common])
    return out


def ship(model_dir: Path, output: Path) -> Path:
    """Copy the loadable files (no training logs) into ``output``, replacing it."""
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in model_dir.iterdir():
        if p.name in SHIPPED_FILES or p.name.endswith(".safetensors"):
            shutil.copyfile(p, tmp / p.name)
    shutil.rmtree(output, ignore_errors=True)
    tmp.replace(output)
    return output


def run_fewshot(model: Path, work: Path, r: Recipe) -> dict[str, Any]:
    """Before/after numbers of the background-colour LoRA."""
    from ..api import load

    data = write_fewshot(work / "fewshot", FEWSHOT_SEED, r.fewshot_scenes)
    types = (FEWSHOT_TYPE, *QUESTION_TYPES)
    base, tok = load(model, device="cpu")
    before = evaluate(base, tok, seed=FEWSHOT_EVAL_SEED, num_scenes=r.fewshot_eval_scenes, types=types)
    adapter = work / "fewshot-lora"
    started = time.perf_counter()
    finetune(["--model", str(model), "--method", "lora", "--data", str(data), "--output", str(adapter),
              "--steps", str(r.fewshot_steps), "--batch-size", str(r.fewshot_batch_size),
              "--micro-batch-size", str(r.fewshot_batch_size), "--lr", str(r.fewshot_lr),
              "--lora-rank", str(r.fewshot_rank), "--lora-alpha", str(2 * r.fewshot_rank),
              "--lora-targets", r.fewshot_targets,
              "--warmup-steps", str(r.fewshot_warmup_steps), "--no-gradient-checkpointing", "--dtype", "float32",
              "--log-every", "50",
              "--eval-every", "0", "--seed", "0", "--overwrite", "--no-progress"])
    lora_seconds = time.perf_counter() - started
    tuned, tok = load(model, device="cpu", adapter=adapter)
    after = evaluate(tuned, tok, seed=FEWSHOT_EVAL_SEED, num_scenes=r.fewshot_eval_scenes, types=types)
    return {"before": before, "after": after, "lora_seconds": lora_seconds, "adapter": adapter, "data": data}


def card_section(base: Report, few: dict[str, Any], timings: dict[str, float], r: Recipe) -> str:
    """The model card's results: accuracy table, few-shot before/after, timings."""
    before, after = few["before"], few["after"]
    lines = [f"Measured by `python -m visualglm.demo.train` on {base.scenes} scenes of the unseen seed "
             f"{EVAL_SEED} (one question of each type in each language per scene; greedy decoding). Cell: "
             "accuracy (share worded exactly as in training, number of questions).", "", base.table(), "",
             f"Few-shot background demo: LoRA on {r.fewshot_scenes} scenes (the background question in both "
             f"languages, plus every known question type in both languages on the same images), {r.fewshot_steps} steps "
             f"({few['lora_seconds']:.0f} s); evaluated on {before.scenes} scenes of the unseen seed "
             f"{FEWSHOT_EVAL_SEED}.", "", "| question type | before (en / zh) | after (en / zh) |", "|---|---|---|"]
    for t in (FEWSHOT_TYPE, *QUESTION_TYPES):
        cells = [" / ".join(f"{100 * rep.accuracy(t, la):.1f} %" for la in ("en", "zh")) for rep in (before, after)]
        lines.append(f"| {t} | {cells[0]} | {cells[1]} |")
    lines += ["", "Timings of this run: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items())
              + f" ({torch.get_num_threads()} threads)."]
    return "\n".join(lines)


def write_section(path: Path, name: str, body: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in a markdown file."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise SystemExit(f"{path} lacks the markers {start} / {end} that delimit the generated text")
    head, rest = text.split(start, 1)
    path.write_text(f"{head}{start}\n{body}\n{end}{rest.split(end, 1)[1]}", encoding="utf-8")


def chat_transcript(runs: list[tuple[list[str], list[str]]]) -> str:
    """Run ``visualglm chat ARGS`` (with its default sampling settings) for each (args, args as shown) and
    return the commands and their answers as a console block."""
    import contextlib
    import io

    from ..cli import main as cli

    lines = []
    for args, shown in runs:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli(["chat", *args])
        quoted = " ".join(f'"{a}"' if any(c in a for c in " ?？") else a for a in shown)
        lines += [f"$ visualglm chat {quoted}", out.getvalue().strip()]
    return "```console\n" + "\n".join(lines) + "\n```"


def transcripts(model: Path, adapter: Path | None, work: Path) -> dict[str, str]:
    """The README's example session on the first evaluation scene (``scene.png``), before and after the
    few-shot LoRA."""
    from .scenes import make_scenes, render

    scene = make_scenes(EVAL_SEED, 1)[0]
    image = work / "scene.png"
    render(scene).save(image)
    first = scene.shapes[0]
    base = ["--model", str(model), "--image", str(image)]
    shown = ["--image", "scene.png"]
    questions = ["Describe this image.", "图中有几个图形？", f"What color is the {first.kind}?",
                 f"{ZH[first.color]}的{ZH[first.kind]}在哪里？"]
    out = {"transcript-base": chat_transcript([(base + ["--prompt", q], shown + ["--prompt", q]) for q in questions])}
    if adapter is not None:
        tuned, tuned_shown = base + ["--adapter", str(adapter)], ["--adapter", "fewshot-lora", *shown]
        runs = [(base + ["--prompt", "What color is the background?"], shown + ["--prompt", "What color is the background?"])]
        runs += [(tuned + ["--prompt", q], tuned_shown + ["--prompt", q]) for q in
                 ("What color is the background?", "这张图片的背景是什么颜色？", f"What color is the {first.kind}?")]
        out["transcript-fewshot"] = chat_transcript(runs)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m visualglm.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="demo-work", help="folder for data, logs and intermediate models")
    parser.add_argument("--output", default=str(ASSET_DIR), help="where the finished model folder goes")
    parser.add_argument("--card", default=str(CARD), help="model card whose results section is rewritten")
    parser.add_argument("--demo-doc", default=str(DEMO_DOC), help="guide whose example sessions are rewritten")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="a minute-long smoke run with tiny numbers")
    parser.add_argument("--skip-fewshot", action="store_true")
    parser.add_argument("--from-model", default=None,
                        help="skip data and training: ship, evaluate and run the few-shot demo on this trained folder")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = Recipe.quick() if args.quick else Recipe()
    work = Path(args.work).expanduser()
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model_dir = Path(args.from_model) if args.from_model else train_base(work, r)
    timings["data + tokenizer + training"] = time.perf_counter() - started
    output = ship(model_dir, Path(args.output).expanduser())
    print(f"wrote {output}", flush=True)

    from ..api import load

    t = time.perf_counter()
    model, tok = load(output, device="cpu")
    base = evaluate(model, tok, seed=EVAL_SEED, num_scenes=r.eval_scenes)
    timings["evaluation"] = time.perf_counter() - t
    print(base.table(), flush=True)
    results: dict[str, Any] = {"recipe": r.__dict__, "base": base.to_dict()}
    if not args.skip_fewshot:
        t = time.perf_counter()
        few = run_fewshot(output, work, r)
        timings["few-shot (evaluations included)"] = time.perf_counter() - t
        results["fewshot"] = {"before": few["before"].to_dict(), "after": few["after"].to_dict(),
                              "lora_seconds": few["lora_seconds"]}
        print(few["after"].table(), flush=True)
        timings["total"] = time.perf_counter() - started
        if not args.quick:
            write_section(Path(args.card), "results", card_section(base, few, timings, r))
            for name, text in transcripts(output, few["adapter"], work).items():
                write_section(Path(args.demo_doc), name, text)
    results["timings_s"] = timings
    (work / "results.json").write_text(json.dumps(results, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"results in {work / 'results.json'}; total {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
