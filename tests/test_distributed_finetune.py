"""Distributed fine-tuning on CPU with 2 gloo ranks: DDP and FSDP2 match one process with the same global batch,
and a resumed distributed run matches an uninterrupted one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from visualglm.checkpoint.write import write_checkpoint
from visualglm.config import VisualGLMConfig
from visualglm.finetune.config import from_dict
from visualglm.finetune.recipe import FinetuneRecipe
from visualglm.model.init import random_model

RECORDS = [
    {"img": "red.png", "prompt": "图片是什么颜色？", "label": "红色。"},
    {"img": "blue.png", "prompt": "What color is the image?", "label": "Blue."},
    {"img": "green.png", "prompt": "图片是什么颜色？", "label": "绿色。"},
    {"img": "red.png", "prompt": "Describe the image.", "label": "A red picture."},
    {"img": "blue.png", "prompt": "这张图片是什么颜色的？", "label": "蓝色的。"},
    {"img": "green.png", "prompt": "Which color?", "label": "Green."},
]


def _cfg(root: Path, out: str, method: str, **train) -> object:
    lr = 2e-2 if method == "lora" else 3e-3
    t = {"steps": 4, "batch_size": 4, "micro_batch_size": 1, "progress": False, "eval_generate": False,
         "device": "cpu", **train}
    return from_dict({"method": method, "model": str(root / "base"), "output_dir": str(root / out),
                      "data": {"train": str(root / "train.json")}, "lora": {"rank": 4},
                      "optim": {"lr": lr, "warmup_steps": 1}, "train_parts": ["proj", "glm"], "train": t})


def _run(cfg, resume=None, until=None) -> list[float]:
    recipe = FinetuneRecipe(cfg, log=lambda m: None).setup(resume=resume)
    losses = recipe.train(until=until)
    if until is None:
        recipe.save()
    recipe.cleanup()
    return losses


def _worker(rank: int, world: int, root: str) -> None:
    # torchrun's variables, as the code under test reads them; the group itself meets through a file in the
    # test's folder, so no TCP port can be taken by something else between choosing and binding it
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29500")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world)
    root_p = Path(root)
    try:
        results = {
            "ddp": _run(_cfg(root_p, "ddp", "lora")),
            "crashed": _run(_cfg(root_p, "ddp_resume", "lora", save_every=2), until=3),
            "resumed": _run(_cfg(root_p, "ddp_resume", "lora"), resume=True),
            "fsdp": _run(_cfg(root_p, "fsdp", "full", fsdp=True, steps=3)),
        }
        if rank == 0:
            (root_p / "results.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def root(tmp_path_factory, tokenizer_dir) -> Path:
    folder = tmp_path_factory.mktemp("dist")
    model = random_model(VisualGLMConfig.from_name("tiny"), seed=11)
    write_checkpoint(folder / "base", model.config, model.state_dict().items(), tokenizer_dir=tokenizer_dir)
    for name, rgb in (("red", (230, 20, 20)), ("blue", (20, 20, 230)), ("green", (20, 200, 20))):
        Image.new("RGB", (40, 30), rgb).save(folder / f"{name}.png")
    (folder / "train.json").write_text(json.dumps(RECORDS, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def results(root) -> dict:
    mp.start_processes(_worker, args=(2, str(root)), nprocs=2, join=True, start_method="spawn")
    return json.loads((root / "results.json").read_text())


def test_ddp_matches_single_process(root, results):
    single = _run(_cfg(root, "single", "lora"))
    assert len(results["ddp"]) == len(single) == 4
    assert max(abs(a - b) for a, b in zip(results["ddp"], single, strict=True)) < 1e-4, (results["ddp"], single)
    # only rank 0 wrote, and the adapter is the same as one process's
    from safetensors.torch import load_file
    a = load_file(str(root / "ddp" / "adapter_model.safetensors"))
    b = load_file(str(root / "single" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def test_resumed_ddp_run_matches_uninterrupted(results):
    assert results["crashed"] == pytest.approx(results["ddp"][:3], abs=1e-6)
    assert results["resumed"] == pytest.approx(results["ddp"], abs=1e-6)


def test_fsdp_full_matches_single_process(root, results):
    single = _run(_cfg(root, "single_full", "full", steps=3))
    assert max(abs(a - b) for a, b in zip(results["fsdp"], single, strict=True)) < 1e-4, (results["fsdp"], single)
    import visualglm
    model, _ = visualglm.load(root / "fsdp", device="cpu", dtype="float32")
    ref, _ = visualglm.load(root / "single_full", device="cpu", dtype="float32")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-4), n
