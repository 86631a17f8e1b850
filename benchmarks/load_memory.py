"""Peak memory of ``visualglm.load`` on a generated checkpoint of at least 1 B parameters.

The claim measured: loading builds the model on ``meta`` and fills it tensor by tensor from memory-mapped
files, so the loading process peaks at no more than 1.15 x the weights' size + 1 GiB (the whole process:
Python, torch and the tokenizer included).

A VisualGLM-6B-shaped config with fewer layers (default: 8 ViT layers, 2 GLM layers, the full 130528 x 4096
embedding, tied lm_head; ~1.25 B parameters) is written with random weights in each layout below, then every
variant is loaded in a fresh subprocess, which reports its own peak RSS (``ru_maxrss`` = VmHWM):

* ``ours-bf16``          our safetensors shards (bf16)       -> bf16   (mmap, same dtype)
* ``ours-fp16->bf16``    our safetensors shards (fp16)       -> bf16   (mmap, dtype conversion)
* ``hf-bin-fp16``        HF ``pytorch_model.bin`` (fp16)     -> fp16   (one pickle, torch.load mmap)
* ``sat-fp16->bf16``     sat ``mp_rank_00_model_states.pt``  -> bf16   (pickle, conversion, QKV reorder)

Usage: ``python benchmarks/load_memory.py [--keep DIR] [--variants a,b] [--vision-layers N --glm-layers N]``.
The checkpoints go to a temporary folder (removed afterwards) unless ``--keep DIR`` is given; a kept folder
is reused by later runs. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TOKENIZER = REPO.parent / "shared" / "reference" / "tokenizer"
GIB = 1024**3

# variant -> (checkpoint kind, file dtype, load dtype)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "ours-bf16": ("ours", "bfloat16", "bfloat16"),
    "ours-fp16->bf16": ("ours", "float16", "bfloat16"),
    "hf-bin-fp16": ("hf-bin", "float16", "float16"),
    "sat-fp16->bf16": ("sat", "float16", "bfloat16"),
}


# ----- the config and foreign config files -------------------------------------------------------------
def bench_config(vision_layers: int, glm_layers: int):
    from visualglm.config import VisualGLMConfig

    config = VisualGLMConfig.from_name("visualglm-6b")
    config.vision.num_layers = vision_layers
    config.glm.num_layers = glm_layers
    config.glm.tie_word_embeddings = True  # as ChatGLM-6B: one 130528 x 4096 matrix
    config.name = f"bench-v{vision_layers}-g{glm_layers}"
    return config


def _glm_fields(config) -> dict:
    g = config.glm
    return {"num_layers": g.num_layers, "hidden_size": g.hidden_size, "num_attention_heads": g.num_heads,
            "inner_hidden_size": g.intermediate_size, "vocab_size": g.vocab_size,
            "max_sequence_length": g.max_sequence_length, "layernorm_epsilon": g.layernorm_eps,
            "image_length": config.image_length}


def _eva_fields(config) -> dict:
    v = config.vision
    return {"num_layers": v.num_layers, "hidden_size": v.hidden_size, "num_attention_heads": v.num_heads,
            "inner_hidden_size": v.intermediate_size, "image_size": [v.image_size, v.image_size],
            "patch_size": v.patch_size, "in_channels": v.in_channels, "layernorm_epsilon": v.layernorm_eps}


def _qformer_fields(config) -> dict:
    q = config.qformer
    return {"num_layers": q.num_layers, "hidden_size": q.hidden_size, "num_attention_heads": q.num_heads,
            "inner_hidden_size": q.intermediate_size, "vocab_size": q.num_query_tokens,
            "is_decoder": q.cross_attention_layers, "cross_attn_hidden_size": q.encoder_hidden_size,
            "layernorm_epsilon": q.layernorm_eps}


# ----- writing checkpoints (each in its own subprocess) ---------------------------------------------------
def _random_tensors(config, dtype):
    """(canonical name, random tensor) in the model's order, one at a time; a tied lm_head left out."""
    import torch

    from visualglm.model.visualglm import VisualGLM

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in VisualGLM(config).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        if name == "glm.lm_head.weight" and config.glm.tie_word_embeddings:
            continue
        yield name, torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=g)


def generate(kind: str, dtype_name: str, out: Path, vision_layers: int, glm_layers: int,
             tokenizer: Path | None) -> None:
    import torch

    from visualglm.checkpoint.keymaps import foreign_name
    from visualglm.checkpoint.write import write_checkpoint

    config = bench_config(vision_layers, glm_layers)
    dtype = getattr(torch, dtype_name)
    if kind == "ours":
        write_checkpoint(out, config, _random_tensors(config, dtype), tokenizer_dir=tokenizer)
        return
    fmt = {"hf-bin": "hf", "sat": "sat"}[kind]
    sd = {foreign_name(name, fmt): t for name, t in _random_tensors(config, dtype)}
    embed = foreign_name("glm.word_embeddings.weight", fmt)
    sd[foreign_name("glm.lm_head.weight", fmt)] = sd[embed]  # tied: one storage, as in the released files
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    if fmt == "hf":
        hf = {**_glm_fields(config), "eva_config": _eva_fields(config),
              "qformer_config": _qformer_fields(config), "torch_dtype": dtype_name}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        torch.save(sd, tmp / "pytorch_model.bin")
        if tokenizer is not None:
            for name in ("ice_text.model", "tokenizer_config.json"):
                shutil.copyfile(tokenizer / name, tmp / name)
    else:
        sat = {**_glm_fields(config), "eva_args": _eva_fields(config),
               "qformer_args": _qformer_fields(config)}
        (tmp / "model_config.json").write_text(json.dumps(sat, indent=2))
        (tmp / "latest").write_text("1")
        (tmp / "1").mkdir()
        torch.save({"module": sd}, tmp / "1" / "mp_rank_00_model_states.pt")
    tmp.rename(out)


# ----- loading (each in a fresh subprocess) ----------------------------------------------------------------
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def load_and_report(folder: Path, dtype: str, tokenizer: Path | None) -> None:
    import torch

    import visualglm

    torch.set_num_threads(2)
    baseline = _status_bytes("VmRSS")
    start = time.perf_counter()
    model, _ = visualglm.load(folder, device="cpu", dtype=dtype, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    storages = {}
    for t in [*model.parameters(), *model.buffers()]:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"weights_bytes": sum(storages.values()), "peak_rss_bytes": peak,
                      "vm_hwm_bytes": _status_bytes("VmHWM"), "baseline_rss_bytes": baseline,
                      "num_params": sum(p.numel() for p in model.parameters()),
                      "dtype": str(model.glm.word_embeddings.weight.dtype).removeprefix("torch."),
                      "load_s": round(seconds, 2)}))


# ----- the driver ----------------------------------------------------------------------------------------
def _child(args: list[str]) -> str:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{done.stderr[-4000:]}")
    return done.stdout


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def run(args: argparse.Namespace) -> list[dict]:
    root = Path(args.keep).expanduser() if args.keep else Path(tempfile.mkdtemp(prefix="vglm-loadmem-"))
    root.mkdir(parents=True, exist_ok=True)
    shape = ["--vision-layers", str(args.vision_layers), "--glm-layers", str(args.glm_layers)]
    tok_args = ["--tokenizer", str(Path(args.tokenizer).resolve())]
    results = []
    try:
        for variant in args.variants:
            kind, file_dtype, load_dtype = VARIANTS[variant]
            folder = root / f"{kind}-{file_dtype}-v{args.vision_layers}-g{args.glm_layers}"
            if not folder.exists():
                t0 = time.perf_counter()
                _child(["--_generate", kind, file_dtype, str(folder), *shape, *tok_args])
                print(f"generated {folder.name} ({_folder_bytes(folder) / GIB:.2f} GiB) in "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)
            out = _child(["--_load", str(folder), load_dtype, *tok_args])
            report = json.loads(out.strip().splitlines()[-1])
            weights = report["weights_bytes"]
            bound = 1.15 * weights + GIB
            results.append({"variant": variant, "file_dtype": file_dtype, "load_dtype": load_dtype,
                            "file_bytes": _folder_bytes(folder), **report,
                            "ratio": round(report["peak_rss_bytes"] / weights, 4),
                            "ratio_above_baseline": round(
                                (report["peak_rss_bytes"] - report["baseline_rss_bytes"]) / weights, 4),
                            "bound_bytes": int(bound), "within_bound": report["peak_rss_bytes"] <= bound})
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return results


def print_table(results: list[dict]) -> None:
    head = (f"{'variant':<18} {'params':>7} {'weights':>9} {'baseline':>9} {'peak RSS':>9} {'bound':>9} "
            f"{'peak/W':>7} {'(peak-base)/W':>13} {'load s':>7}  ok")
    print(head)
    print("-" * len(head))
    for r in results:
        print(f"{r['variant']:<18} {r['num_params'] / 1e9:>6.3f}B {r['weights_bytes'] / GIB:>7.3f}Gi "
              f"{r['baseline_rss_bytes'] / GIB:>7.3f}Gi {r['peak_rss_bytes'] / GIB:>7.3f}Gi "
              f"{r['bound_bytes'] / GIB:>7.3f}Gi {r['ratio']:>7.3f} {r['ratio_above_baseline']:>13.3f} "
              f"{r['load_s']:>7.1f}  {'yes' if r['within_bound'] else 'NO'}")
    print("bound: peak RSS of the loading process <= 1.15 x weights + 1 GiB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", default=None,
                   help="write (or reuse) the checkpoints in this folder and keep them")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--vision-layers", type=int, default=8)
    p.add_argument("--glm-layers", type=int, default=2)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER),
                   help="tokenizer folder for visualglm.load (default: ../shared/reference/tokenizer)")
    p.add_argument("--_generate", nargs=3, metavar=("KIND", "DTYPE", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--_load", nargs=2, metavar=("DIR", "DTYPE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if args._generate:
        kind, dtype, out = args._generate
        generate(kind, dtype, Path(out), args.vision_layers, args.glm_layers, tokenizer)
        return 0
    if args._load:
        load_and_report(Path(args._load[0]), args._load[1], tokenizer)
        return 0
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    if tokenizer is None or not (tokenizer / "ice_text.model").is_file():
        p.error(f"no tokenizer at {tokenizer}: pass --tokenizer DIR (a folder with ice_text.model)")
    results = run(args)
    print_table(results)
    print(json.dumps({"benchmark": "load_memory", "vision_layers": args.vision_layers,
                      "glm_layers": args.glm_layers, "results": results}))
    return 0 if all(r["within_bound"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
