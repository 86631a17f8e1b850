"""FinetuneRecipe: setup -> train -> save -> cleanup, the same code for one process and for torchrun.

Methods: LoRA, QLoRA (LoRA over NF4 GLM weights), P-tuning v2 and full fine-tuning of any of vision / qformer /
proj / glm. One optimizer step consumes one global batch (``batch_size`` samples over all processes, split
into ``micro_batch_size`` forwards with gradient accumulation); the loss is the sum of token losses over the
global batch divided by its number of target tokens, whatever the number of processes. Data order, dropout
noise and the learning rate are functions of the step number, so a run resumed from a checkpoint computes
exactly the losses of an uninterrupted one (the test checks equality).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from collections import OrderedDict
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import env
from ..peft import adapters as peft_io
from ..peft.lora import GLM_LINEAR, apply_lora, quantize_nf4
from ..peft.ptuning import apply_ptuning
from . import state as ckpt
from .config import FinetuneConfig
from .data import (
    IGNORE,
    Batch,
    ImageLoader,
    Sample,
    SampleStream,
    collate,
    load_samples,
    shard,
    split_by_record,
)

PART_PREFIXES = {"vision": "vision.", "qformer": "qformer.", "proj": "glm_proj.", "glm": "glm."}
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "finetune_config.json"


class LossModule(nn.Module):
    """Everything one forward needs inside one module call, so DDP and FSDP2 can wrap it.

    Returns the summed cross-entropy over target tokens; the LM head runs only on those positions.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, context_lengths: torch.Tensor,
                targets: torch.Tensor, pixels: torch.Tensor | None = None,
                image_offsets: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
                ) -> torch.Tensor:
        if image_embeds is None and pixels is not None:
            image_embeds = self.model.encode_image(pixels)  # (N, 32, C)
        hidden = self.model(input_ids, position_ids, context_lengths=context_lengths, image_embeds=image_embeds,
                            image_offsets=image_offsets, logits="none")  # (B, T, C)
        keep = targets != IGNORE  # (B, T)
        logits = self.model.glm.lm_head(hidden[keep]).float()  # (N_targets, V)
        return F.cross_entropy(logits, targets[keep], reduction="sum")


class FinetuneRecipe:
    def __init__(self, cfg: FinetuneConfig, *, log=None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.output_dir).expanduser()
        self.rank, self.world = env.rank(), env.world_size()
        self._log = log or print
        self.step = 0
        self.losses: list[float] = []
        self.last_eval: dict[str, Any] = {}
        self._embeds: OrderedDict[Path, torch.Tensor] = OrderedDict()
        self._created_group = False

    # ----- setup --------------------------------------------------------------------------------------------
    def setup(self, resume: str | bool | None = None, overwrite: bool = False) -> FinetuneRecipe:
        from ..api import default_device

        t = self.cfg.train
        device = torch.device(t.device) if t.device else default_device()
        if self.world > 1:
            device = env.rank_device(device)
            self._created_group = env.init(device)
        self.device = device
        self._prepare_output(resume, overwrite)
        self.model, self.tokenizer, self.tokenizer_dir, self.base_path = self._build_model()
        self._add_method()
        self.model.glm.gradient_checkpointing = t.gradient_checkpointing
        self._setup_data()
        self.autocast_dtype = self._autocast_dtype()
        self.module = LossModule(self.model)
        self.trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        self.frozen_images = not any(n.startswith(("model.vision.", "model.qformer.", "model.glm_proj."))
                                     for n in self.trainable)
        self._wrap()
        self.trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}  # FSDP: DTensors
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        n_train = sum(p.numel() for p in self.trainable.values())
        n_all = sum(p.numel() for p in self.model.parameters())
        self.log(f"{self.cfg.method}: training {n_train:,} of {n_all:,} parameters on {self.world} process(es), "
                 f"{len(self.train_samples)} train / {len(self.eval_samples)} eval samples, {self.total_steps} "
                 f"steps of {t.batch_size} samples, device {device}, weights {self.dtype}, autocast "
                 f"{self.autocast_dtype or 'off'}")
        if resume:
            self._resume(resume)
        return self

    def log(self, message: str) -> None:
        if self.rank == 0:
            self._log(message)

    def _prepare_output(self, resume: str | bool | None, overwrite: bool) -> None:
        existing = ckpt.list_checkpoints(self.out)
        if existing and not resume and not overwrite:
            raise FileExistsError(f"{self.out} already holds training checkpoints ({existing[-1].name}); pass "
                                  "--resume to continue that run or --overwrite to start over")
        if overwrite and not resume and self.rank == 0:
            for p in existing:
                shutil.rmtree(p, ignore_errors=True)
            (self.out / METRICS_FILE).unlink(missing_ok=True)
        self._barrier()

    def _build_model(self) -> tuple[nn.Module, Any, Path, str | None]:
        from ..api import build_model, default_dtype, parse_dtype
        from ..checkpoint.io import inspect
        from ..model.visualglm import VisualGLM
        from ..tokenizer import ChatGLMTokenizer

        cfg = self.cfg
        if cfg.init == "random":
            config, src = _config_for_random(cfg.model), None
        else:
            src = inspect(cfg.model)
            config = src.config
        tok_dir = Path(cfg.tokenizer).expanduser() if cfg.tokenizer else (src.tokenizer_dir if src else None)
        if tok_dir is None:
            raise ValueError(f"no tokenizer: {cfg.model} carries none; pass --tokenizer DIR (a folder with "
                             "ice_text.model)")
        tokenizer = ChatGLMTokenizer.from_dir(tok_dir)
        if tokenizer.vocab_size > config.glm.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids, the model only "
                             f"{config.glm.vocab_size} embeddings")
        with torch.device("meta"):
            num_params = sum(p.numel() for p in VisualGLM(config).parameters())
        default = torch.float32 if cfg.method == "full" else default_dtype(self.device, num_params)
        self.dtype = parse_dtype(cfg.train.dtype) or default
        if cfg.init == "random":
            from ..model.init import random_model
            model = random_model(config, seed=cfg.train.seed, dtype=self.dtype, device=self.device)
            if cfg.method == "qlora":
                from ..peft.lora import quantize_glm_linears
                quantize_glm_linears(model)
            return model, tokenizer, tok_dir, None
        transform = _nf4_transform(self.dtype, self.device) if cfg.method == "qlora" else None
        model = build_model(src, device=self.device, dtype=self.dtype, transform=transform)
        return model, tokenizer, tok_dir, str(src.path.resolve())

    def _add_method(self) -> None:
        cfg, model = self.cfg, self.model
        if cfg.method in ("lora", "qlora"):
            self.adapted = apply_lora(model, cfg.lora, seed=cfg.train.seed, adapter_dtype=torch.float32)
            names = set(peft_io.get_adapter_params(model))
        elif cfg.method == "ptuning":
            apply_ptuning(model, cfg.ptuning, seed=cfg.train.seed, dtype=torch.float32)
            names = set(peft_io.get_adapter_params(model))
        else:
            prefixes = tuple(PART_PREFIXES[p] for p in cfg.train_parts)
            names = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
            if self.dtype != torch.float32:
                self.log(f"warning: full fine-tuning with {self.dtype} weights (AdamW updates are rounded); "
                         "--dtype float32 trains more precisely")
        peft_io.set_trainable_params(model, names)
        model.train()

    def _setup_data(self) -> None:
        d, t = self.cfg.data, self.cfg.train
        max_len = d.max_length or self.model.config.glm.max_sequence_length
        kw = {"image_length": self.model.config.image_length, "max_length": max_len, "lang": d.lang,
              "image_root": d.image_root, "skip_bad": d.skip_bad, "warn": self.log}
        train = load_samples(d.train, self.tokenizer, **kw)
        if d.eval:
            evals = load_samples(d.eval, self.tokenizer, **kw)
        else:
            train, evals = split_by_record(train, d.eval_fraction, t.seed)
        self.train_samples, self.eval_samples = train, evals
        if t.batch_size % self.world:
            raise ValueError(f"batch_size {t.batch_size} must be divisible by the number of processes "
                             f"({self.world}): every process takes an equal share of each global batch")
        self.stream = SampleStream(len(train), seed=t.seed)
        self.total_steps = t.steps or max(1, math.ceil((t.epochs or 1.0) * len(train) / t.batch_size))
        self.images = ImageLoader(self.model.config.vision.image_size)

    def _autocast_dtype(self) -> torch.dtype | None:
        p = self.cfg.train.precision
        if p == "fp32":
            return None
        if p == "bf16":
            return torch.bfloat16
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.bfloat16 if self.dtype == torch.bfloat16 else None

    def _wrap(self) -> None:
        """DDP (default) or FSDP2 (``fsdp``) over several processes; the plain module otherwise."""
        self.fsdp = self.cfg.train.fsdp and self.world > 1
        self.wrapped: nn.Module = self.module
        if self.world <= 1:
            return
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard
            for layer in self.model.glm.layers:
                fully_shard(layer)
            fully_shard(self.module)
            self.wrapped = self.module
            return
        from torch.nn.parallel import DistributedDataParallel as DDP
        frozen = [n for n, p in self.module.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in self.module.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(self.module, frozen)  # identical on every rank
        self.wrapped = DDP(self.module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                           find_unused_parameters=self.cfg.method == "full")

    def _optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        decay = [p for p in self.trainable.values() if p.dim() >= 2]
        no_decay = [p for p in self.trainable.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=o.lr, betas=tuple(o.betas), eps=o.eps)

    def _lr_factor(self, step: int) -> float:
        """Linear warmup from lr/warmup, then cosine down to min_lr_ratio * lr at the last step."""
        o = self.cfg.optim
        warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_ratio * self.total_steps)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.total_steps - warmup))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    # ----- training -----------------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> list[float]:
        """Run to ``total_steps`` (or stop after step ``until``), from wherever setup/resume left off;
        returns the loss of every step so far."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"finetune {self.cfg.method}", unit="step",
                   disable=self.rank != 0 or not t.progress, dynamic_ncols=True, file=sys.stderr)
        started, first = time.perf_counter(), self.step
        try:
            while self.step < min(self.total_steps, until or self.total_steps):
                info = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}")
                if self.step % t.log_every == 0 or self.step == self.total_steps:
                    elapsed = time.perf_counter() - started
                    self._metrics({**info, "it_per_s": (self.step - first) / max(elapsed, 1e-9),
                                   "elapsed_s": round(elapsed, 3)})
                if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
                if t.save_every and self.step % t.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.losses

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over the global batch of ``self.step``."""
        t = self.cfg.train
        torch.manual_seed(t.seed * 1_000_003 + self.step * 7919 + self.rank)  # dropout noise = f(step)
        indices = self.stream.global_batch(self.step, t.batch_size)
        total_tokens = sum(self.train_samples[i].num_targets for i in indices)
        mine = [self.train_samples[i] for i in shard(indices, self.rank, self.world)]
        micro = [mine[k:k + t.micro_batch_size] for k in range(0, len(mine), t.micro_batch_size)]
        loss_sum = 0.0
        for k, samples in enumerate(micro):
            batch = collate(samples, self.tokenizer.pad_token_id, self.images).to(self.device)
            with self._sync(k == len(micro) - 1):
                with self._autocast():
                    loss = self.wrapped(*self._inputs(batch))
                (loss * (self.world / total_tokens)).backward()
            loss_sum += float(loss.detach())
        grad_norm = self._clip()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = self._all_sum([loss_sum])[0] / total_tokens
        self.step += 1
        self.losses.append(loss_value)
        return {"step": self.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                "tokens": total_tokens, "epoch": round(self.step * t.batch_size / len(self.train_samples), 4)}

    def _inputs(self, batch: Batch) -> tuple:
        embeds = None
        if batch.pixels is not None and self.frozen_images and self.cfg.train.cache_image_embeds \
                and not self.fsdp:
            embeds = self._image_embeds(batch)
        return (batch.input_ids, batch.position_ids, batch.context_lengths, batch.targets,
                None if embeds is not None else batch.pixels, batch.image_offsets, embeds)

    @torch.no_grad()
    def _image_embeds(self, batch: Batch) -> torch.Tensor:
        """Frozen image encoder: every image is encoded alone, once, so its embedding does not depend on
        which batch it first appeared in (exact resume and equal results on any number of processes)."""
        out = []
        for i, path in enumerate(batch.image_paths):
            if path not in self._embeds:
                with self._autocast():
                    self._embeds[path] = self.model.encode_image(batch.pixels[i:i + 1])[0]
                if len(self._embeds) > 4096:
                    self._embeds.popitem(last=False)
            out.append(self._embeds[path])
        return torch.stack(out)  # (N, 32, C)

    def _sync(self, last: bool):
        if self.world <= 1:
            return nullcontext()
        if self.fsdp:
            self.wrapped.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else self.wrapped.no_sync()

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _clip(self) -> float:
        max_norm = self.cfg.optim.max_grad_norm
        params = [p for p in self.trainable.values() if p.grad is not None]
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.world <= 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _barrier(self) -> None:
        if self.world > 1 and env.is_initialized():
            torch.distributed.barrier()

    def _metrics(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    # ----- evaluation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Held-out loss (token-averaged) and answer exact-match through the real generation path."""
        t = self.cfg.train
        samples = self.eval_samples[: t.eval_max_samples]
        if not samples:
            return {}
        mine = [samples[i] for i in shard(list(range(len(samples))), self.rank, self.world)]
        self.model.eval()
        try:
            loss_sum, tokens = 0.0, 0
            for k in range(0, len(mine), t.micro_batch_size):
                batch = collate(mine[k:k + t.micro_batch_size], self.tokenizer.pad_token_id,
                                self.images).to(self.device)
                with self._autocast():
                    loss_sum += float(self.module(*self._inputs(batch)))
                tokens += batch.num_targets
            correct, asked = self._exact_match(mine) if t.eval_generate and not self.fsdp else (0, 0)
        finally:
            self.model.train()
        loss_sum, tokens, correct, asked = self._all_sum([loss_sum, tokens, correct, asked])
        result = {"step": self.step, "eval_loss": loss_sum / max(tokens, 1), "eval_samples": len(samples)}
        if asked:
            result["eval_exact_match"] = correct / asked
        self.last_eval = result
        self._metrics(result)
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
        self.log(f"eval: {shown}")
        return result

    def _exact_match(self, samples: list[Sample]) -> tuple[int, int]:
        from ..prompt import process_response

        correct = 0
        for english in (False, True):
            group = [s for s in samples if s.english == english]
            for k in range(0, len(group), 8):
                chunk = group[k:k + 8]
                items = [(str(s.image) if s.image else None, s.query, s.history) for s in chunk]
                answers = self.model.batch_chat(self.tokenizer, items, english=english, do_sample=False,
                                                repetition_penalty=1.0,
                                                max_new_tokens=self.cfg.train.eval_max_new_tokens,
                                                max_length=self.model.config.glm.max_sequence_length)
                correct += sum(a.strip() == process_response(s.answer).strip()
                               for (a, _), s in zip(answers, chunk, strict=True))
        self.model.__dict__.pop("_engine", None)  # free the generation cache
        return correct, len(samples)

    # ----- saving -------------------------------------------------------------------------------------------
    def _state_options(self, load: bool = False):
        """Trained tensors only; gathered into full tensors on the CPU under FSDP. Loading is checked by
        name beforehand, so it need not be strict about the frozen weights left out."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=self.fsdp, cpu_offload=self.fsdp and not load,
                                ignore_frozen_params=True, strict=not load)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        sd = get_model_state_dict(self.module, options=self._state_options())
        return {k.removeprefix("model."): v for k, v in sd.items()}

    def save_checkpoint(self) -> Path | None:
        """Atomic training checkpoint (all processes take part; process 0 writes)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        trainable = self._trainable_state()
        optim = get_optimizer_state_dict(self.module, self.optimizer, options=self._state_options())
        target = None
        if self.rank == 0:
            state = {"step": self.step, "total_steps": self.total_steps, "world_size": self.world,
                     "scheduler": self.scheduler.state_dict(), "config": self.cfg.to_dict(),
                     "samples_seen": self.step * self.cfg.train.batch_size, "losses": self.losses}
            extra = self._adapter_writer() if self.cfg.method != "full" else None
            target = ckpt.write_checkpoint_dir(ckpt.step_dir(self.out, self.step), trainable, optim, state, extra)
            ckpt.prune(self.out, self.cfg.train.keep_checkpoints)
            self.log(f"saved checkpoint {target}")
        self._barrier()
        return target

    def _adapter_writer(self):
        record = self._adapter_record()
        return lambda folder: peft_io.save_adapter(self.model, folder, record)

    def _adapter_record(self) -> dict[str, Any]:
        if self.cfg.method == "ptuning":
            return peft_io.ptuning_config_record(self.model.glm.prefix_encoder, self.base_path)
        return peft_io.lora_config_record(self.cfg.lora, self.adapted, self.base_path, self.cfg.method)

    def save(self) -> Path:
        """The final result in ``output_dir``: an adapter folder, or (full) a loadable checkpoint folder."""
        if self.cfg.method == "full":
            tensors = self._full_state()
            if self.rank == 0:
                self._write_full(tensors)
        elif self.rank == 0:
            self._adapter_writer()(self.out)
        if self.rank == 0:
            text = json.dumps(self.cfg.to_dict(), indent=2, ensure_ascii=False) + "\n"
            (self.out / CONFIG_FILE).write_text(text, encoding="utf-8")
            self.log(f"wrote {self.out}")
        self._barrier()
        return self.out

    def _full_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        opts = StateDictOptions(full_state_dict=self.fsdp, cpu_offload=self.fsdp)
        sd = get_model_state_dict(self.module, options=opts)
        return {k.removeprefix("model."): v for k, v in sd.items()}

    def _write_full(self, tensors: dict[str, torch.Tensor]) -> None:
        from ..api import parse_dtype
        from ..checkpoint.write import write_checkpoint

        config = self.model.config
        if config.glm.tie_word_embeddings:
            tensors.pop("glm.lm_head.weight", None)
        dtype = parse_dtype(self.cfg.train.save_dtype)
        tmp = self.out / f".model-{time.time_ns()}"
        write_checkpoint(tmp, config, iter(tensors.items()), tokenizer_dir=self.tokenizer_dir, dtype=dtype)
        ckpt.move_into(tmp, self.out)

    # ----- resume -----------------------------------------------------------------------------------------
    def _resume(self, spec: str | bool) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        path = ckpt.find_resume(self.out, spec)
        trainable, optim, state = ckpt.read_checkpoint_dir(path)
        ckpt.check_compatible(state.get("config", {}), self.cfg.to_dict(), path)
        expected = {k.removeprefix("model.") for k in self.trainable}
        if set(trainable) != expected:
            missing, extra = sorted(expected - set(trainable)), sorted(set(trainable) - expected)
            raise ckpt.ResumeError(f"{path}: trained tensors do not match this run (missing {missing[:4]}, "
                                   f"unexpected {extra[:4]})")
        sd = {f"model.{k}": v for k, v in trainable.items()}
        set_model_state_dict(self.module, sd, options=self._state_options(load=True))
        set_optimizer_state_dict(self.module, self.optimizer, optim, options=self._state_options(load=True))
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.losses = list(state.get("losses", []))
        if self.rank == 0:
            ckpt.truncate_metrics(self.out / METRICS_FILE, self.step)
        self.log(f"resumed from {path} at step {self.step}")
        self._barrier()

    def cleanup(self) -> None:
        if self._created_group:
            env.destroy()
            self._created_group = False


def _config_for_random(spec: str):
    """A named config ("tiny", "visualglm-6b"), a config.json, or a folder holding one."""
    from ..config import NAMED_CONFIGS, VisualGLMConfig

    if spec in NAMED_CONFIGS:
        return VisualGLMConfig.from_name(spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"--init random needs a config: one of {', '.join(NAMED_CONFIGS)}, a config.json or a "
                         f"folder with one; got {spec!r}")
    return VisualGLMConfig.load(path)


def _nf4_transform(dtype: torch.dtype, device: torch.device):
    """Load-time QLoRA: each GLM Linear weight is cast and quantized as it streams in (never all in bf16)."""
    def transform(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if GLM_LINEAR.match(name):
            return {name: quantize_nf4(tensor.to(device=device, dtype=dtype))}
        return {name: tensor}
    return transform

