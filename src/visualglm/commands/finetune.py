"""``visualglm finetune``: LoRA / QLoRA / P-tuning v2 / full fine-tuning, one process or under torchrun.

Settings come from defaults, then ``--config FILE.yaml`` (see configs/finetune/), then the flags given here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# flag dest -> where it goes in FinetuneConfig (argparse already converted scalar types)
OVERRIDES: dict[str, str] = {
    "model": "model", "init": "init", "tokenizer": "tokenizer", "output": "output_dir", "method": "method",
    "train_parts": "train_parts", "data": "data.train", "eval_data": "data.eval",
    "eval_fraction": "data.eval_fraction", "image_root": "data.image_root", "lang": "data.lang",
    "max_length": "data.max_length", "skip_bad": "data.skip_bad", "lora_rank": "lora.rank",
    "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout", "lora_targets": "lora.targets",
    "lora_layers": "lora.layers", "pre_seq_len": "ptuning.pre_seq_len", "lr": "optim.lr",
    "weight_decay": "optim.weight_decay", "warmup_steps": "optim.warmup_steps",
    "warmup_ratio": "optim.warmup_ratio", "min_lr_ratio": "optim.min_lr_ratio",
    "max_grad_norm": "optim.max_grad_norm",
}
OVERRIDES.update({k: f"train.{k}" for k in (
    "steps", "epochs", "batch_size", "micro_batch_size", "seed", "dtype", "precision", "device",
    "gradient_checkpointing", "log_every", "eval_every", "eval_max_samples", "eval_max_new_tokens",
    "eval_generate", "save_every", "keep_checkpoints", "save_dtype", "progress", "fsdp")})


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML settings file (configs/finetune/*.yaml)")
    g = parser.add_argument_group("model and method")
    g.add_argument("--model", help="base checkpoint folder (default: the demo model shipped in the package); "
                   "with --init random: a config name (tiny, "
                   "visualglm-6b), a config.json or a folder with one")
    g.add_argument("--init", choices=["checkpoint", "random"], help="random = train from scratch")
    g.add_argument("--tokenizer", help="tokenizer folder (when the model folder has none)")
    g.add_argument("--method", choices=["lora", "qlora", "ptuning", "full"])
    g.add_argument("--train", dest="train_parts", metavar="PARTS", type=str_list,
                   help="full: comma list of vision,qformer,proj,glm to train (default glm)")
    g.add_argument("--lora-rank", type=int)
    g.add_argument("--lora-alpha", type=float)
    g.add_argument("--lora-dropout", type=float)
    g.add_argument("--lora-targets", type=str_list, help="comma list, e.g. glm.attention.query_key_value,glm.attention.dense,"
                   "glm.mlp,qformer.attention,glm_proj (default: the first two)")
    g.add_argument("--lora-layers", type=int_list, help="GLM layers to adapt, e.g. 0,14 (the original's choice); default all")
    g.add_argument("--pre-seq-len", type=int, help="P-tuning v2 prefix length")
    d = parser.add_argument_group("data")
    d.add_argument("--data", help="training data: JSON list or JSONL ({img, prompt, label} or LLaVA-style)")
    d.add_argument("--eval-data", help="held-out data file")
    d.add_argument("--eval-fraction", type=float, help="hold out this fraction of the training records")
    d.add_argument("--image-root", help="folder that relative image paths start from (default: the data file's)")
    d.add_argument("--lang", choices=["auto", "zh", "en"], help="prompt form (auto: en when no CJK in the query)")
    d.add_argument("--max-length", type=int, help="longest sample in tokens (longer ones are bad records)")
    d.add_argument("--skip-bad", action="store_true", default=None, help="leave bad records out with a warning")
    o = parser.add_argument_group("optimisation")
    o.add_argument("--lr", type=float)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--warmup-steps", type=int)
    o.add_argument("--warmup-ratio", type=float)
    o.add_argument("--min-lr-ratio", type=float)
    o.add_argument("--max-grad-norm", type=float, help="gradient clipping (0 = off)")
    t = parser.add_argument_group("loop")
    t.add_argument("--steps", type=int, help="optimizer steps")
    t.add_argument("--epochs", type=float, help="passes over the data (when --steps is not given)")
    t.add_argument("--batch-size", type=int, help="global batch: samples per optimizer step, all processes")
    t.add_argument("--micro-batch-size", type=int, help="samples per forward per process")
    t.add_argument("--seed", type=int)
    t.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="model weights")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="autocast")
    t.add_argument("--device")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--log-every", type=int)
    t.add_argument("--eval-every", type=int, help="steps between evaluations (0 = at the end only)")
    t.add_argument("--eval-max-samples", type=int)
    t.add_argument("--eval-max-new-tokens", type=int)
    t.add_argument("--eval-generate", action=argparse.BooleanOptionalAction, default=None,
                   help="measure answer exact-match by generating (default on)")
    t.add_argument("--save-every", type=int, help="steps between checkpoints (0 = at the end only)")
    t.add_argument("--keep-checkpoints", type=int)
    t.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], help="full: dtype written")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    t.add_argument("--fsdp", action="store_true", default=None, help="under torchrun: FSDP2 instead of DDP")
    parser.add_argument("--output", "-o", help="output folder (adapter, or a checkpoint folder for full)")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="continue from the newest checkpoint in --output (or from the given one)")
    parser.add_argument("--overwrite", action="store_true", help="discard earlier checkpoints in --output")


def build_config(args: argparse.Namespace):
    from ..finetune.config import from_dict, load_yaml, merge

    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for dest, path in OVERRIDES.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        node: dict[str, Any] = {}
        cursor = node
        *parents, leaf = path.split(".")
        for k in parents:
            cursor = cursor.setdefault(k, {})
        cursor[leaf] = value
        data = merge(data, node)
    return from_dict(data)


def run(args: argparse.Namespace) -> int:
    from ..finetune.data import DataError
    from ..finetune.recipe import FinetuneRecipe
    from ..finetune.state import ResumeError

    try:
        cfg = build_config(args)
        recipe = FinetuneRecipe(cfg)
    except (ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        recipe.setup(resume=args.resume, overwrite=args.overwrite)
        recipe.train()
        recipe.evaluate()
        recipe.save()
    except (DataError, ResumeError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        recipe.cleanup()
    return 0
