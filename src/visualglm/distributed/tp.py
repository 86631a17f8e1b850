"""Tensor parallelism for inference: the plan as data, the per-rank slicing, the all-reduces.

Megatron-style pairs: a *column-parallel* Linear keeps a block of output rows (so each rank computes some of
the attention heads or MLP channels on its own), the following *row-parallel* Linear keeps the matching block
of input columns, and the partial outputs of the ranks are summed by one all-reduce. Two all-reduces per
transformer block, in the GLM, the EVA ViT and the Q-Former alike. Embeddings, LayerNorms, ``glm_proj`` and
``lm_head`` are replicated.

The plan is applied to a model built on ``meta`` *before* loading (shapes shrink, heads are divided), and
:meth:`TensorParallel.transform` cuts every checkpoint tensor to this rank's part as it streams in, so a rank
never keeps more than its slice. Quantization chains after it (slice first, then quantize).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.io import Transform
from . import env

COLUMN, ROW = "column", "row"


@dataclass(frozen=True)
class Rule:
    """How one family of Linears (module paths matching ``pattern``) is split.

    ``parts``: a column-parallel Linear whose output fuses ``parts`` equal blocks, e.g. contiguous
    [Q | K | V] (3) or [K | V] (2); each block is split on its own so a rank keeps its heads of every block.
    """

    pattern: str
    style: str
    parts: int = 1


_LAYER = r"\.layers\.\d+\."
PLAN: tuple[Rule, ...] = (
    # ChatGLM: query_key_value rows are per head [q_h | k_h | v_h], so one contiguous block = whole heads.
    Rule(rf"glm{_LAYER}attention\.query_key_value", COLUMN),
    Rule(rf"glm{_LAYER}attention\.dense", ROW),
    Rule(rf"glm{_LAYER}mlp\.dense_h_to_4h", COLUMN),
    Rule(rf"glm{_LAYER}mlp\.dense_4h_to_h", ROW),
    # EVA ViT and Q-Former: query_key_value is contiguous [Q | K | V].
    Rule(rf"(vision|qformer){_LAYER}attention\.query_key_value", COLUMN, parts=3),
    Rule(rf"(vision|qformer){_LAYER}attention\.dense", ROW),
    Rule(rf"qformer{_LAYER}cross_attention\.query", COLUMN),
    Rule(rf"qformer{_LAYER}cross_attention\.key_value", COLUMN, parts=2),
    Rule(rf"qformer{_LAYER}cross_attention\.dense", ROW),
    Rule(rf"(vision|qformer){_LAYER}mlp\.dense_h_to_4h", COLUMN),
    Rule(rf"(vision|qformer){_LAYER}mlp\.dense_4h_to_h", ROW),
)
# Attention modules whose ``num_heads`` is divided: each rank runs num_heads / N heads.
HEADS = rf"(glm|vision|qformer){_LAYER}(attention|cross_attention)"


def resolve(model: nn.Module, plan: tuple[Rule, ...] = PLAN) -> dict[str, Rule]:
    """{module path: rule} for every Linear the plan splits; each path must match at most one rule."""
    out: dict[str, Rule] = {}
    for path, mod in model.named_modules():
        hits = [r for r in plan if re.fullmatch(r.pattern, path)]
        if len(hits) > 1:
            raise ValueError(f"TP plan: {path} matches several rules: {[r.pattern for r in hits]}")
        if hits:
            if not isinstance(mod, nn.Linear):
                raise ValueError(f"TP plan: {path} is a {type(mod).__name__}, expected nn.Linear")
            out[path] = hits[0]
    return out


def head_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for path, mod in model.named_modules():
        if re.fullmatch(HEADS, path) and hasattr(mod, "num_heads"):
            yield path, mod


def check_divisible(model: nn.Module, layout: dict[str, Rule], world: int) -> None:
    """Raise one error listing everything that cannot be split over ``world`` ranks."""
    problems: list[str] = []
    heads: dict[str, int] = {}
    for path, mod in head_modules(model):
        tower = path.split(".", 1)[0]
        heads.setdefault(tower, mod.num_heads)
        if mod.num_heads % world:
            problems.append(f"{path}: {mod.num_heads} heads")
    for path, rule in layout.items():
        lin = model.get_submodule(path)
        size = lin.out_features // rule.parts if rule.style == COLUMN else lin.in_features
        if size % world:
            problems.append(f"{path}: {rule.style}-parallel size {size}")
    if problems:
        g = math.gcd(*heads.values()) if heads else 1
        valid = [n for n in range(1, g + 1) if g % n == 0]
        shown = "; ".join(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", p) for p in problems))
        raise ValueError(f"cannot split the model over {world} ranks: {shown} not divisible by {world}. "
                         f"Heads per tower: {heads}; world sizes that divide them: {valid}")


def shard_tensor(tensor: torch.Tensor, rule: Rule, attr: str, rank: int, world: int) -> torch.Tensor:
    """This rank's part of one tensor of a planned Linear (``attr``: weight, bias, or a quantization extra).

    Column-parallel: rows (dim 0) of each fused part. Row-parallel: columns (dim 1) of the weight; the bias
    is added once (rank 0 keeps it, the others hold zeros); 1-D extras (per-row scales) are replicated.
    Always a fresh tensor, so the full one can be freed.
    """
    if rule.style == COLUMN:
        if tensor.shape[0] % (rule.parts * world):
            raise ValueError(f"cannot split {attr} of shape {list(tensor.shape)} into {rule.parts} part(s) x "
                             f"{world} ranks along dim 0")
        parts = tensor.chunk(rule.parts, dim=0)
        return torch.cat([p.chunk(world, dim=0)[rank] for p in parts], dim=0).clone()
    if tensor.dim() >= 2:
        if tensor.shape[1] % world:
            raise ValueError(f"cannot split {attr} of shape {list(tensor.shape)} over {world} ranks along dim 1")
        return tensor.chunk(world, dim=1)[rank].clone()
    if attr == "bias" and rank != 0:
        return torch.zeros_like(tensor)
    return tensor.clone()


@dataclass
class TensorParallel:
    """Split a VisualGLM over the ranks of ``group`` (default: all processes of the job)."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None
    plan: tuple[Rule, ...] = PLAN

    def __post_init__(self) -> None:
        self.layout: dict[str, Rule] = {}

    @classmethod
    def from_group(cls, group: dist.ProcessGroup | None = None) -> TensorParallel:
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    # ----- before loading ----------------------------------------------------------------------
    def shard(self, model: nn.Module) -> Transform:
        """Shrink every planned Linear to this rank's part and divide the heads; returns the load transform.

        Works on a ``meta`` model (the normal path: shapes only) and on a materialised one (weights cut).
        """
        layout = resolve(model, self.plan)
        check_divisible(model, layout, self.world_size)
        self.layout = layout
        for path, rule in layout.items():
            lin = model.get_submodule(path)
            for attr in ("weight", "bias"):
                p = getattr(lin, attr)
                if p is not None:
                    cut = shard_tensor(p.detach(), rule, attr, self.rank, self.world_size)
                    setattr(lin, attr, nn.Parameter(cut, requires_grad=p.requires_grad))
            lin.out_features, lin.in_features = lin.weight.shape
        for _, mod in head_modules(model):
            mod.num_heads //= self.world_size
        return self.transform

    def transform(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Checkpoint tensor -> this rank's slice (replicated tensors pass through)."""
        owner, _, attr = name.rpartition(".")
        rule = self.layout.get(owner)
        if rule is None:
            return {name: tensor}
        return {name: shard_tensor(tensor, rule, attr, self.rank, self.world_size)}

    # ----- after loading -----------------------------------------------------------------------
    def connect(self, model: nn.Module) -> None:
        """Sum the row-parallel outputs across ranks (forward hooks), after any module swap (quantization)."""
        group = self.group if self.group is not None else dist.group.WORLD
        for path, rule in self.layout.items():
            if rule.style == ROW:
                model.get_submodule(path).register_forward_hook(_all_reduce_hook(group))
        model.tensor_parallel = self


def _all_reduce_hook(group: dist.ProcessGroup) -> Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor]:
    import torch.distributed._functional_collectives as funcol

    def hook(_module: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        # functional collective: traceable by torch.compile; waits lazily when the sum is first used
        return funcol.all_reduce(out, "sum", group)
    return hook


def tensor_parallel_setup(tp: bool | None, device: torch.device) -> tuple[TensorParallel | None, torch.device]:
    """Decide on TP for ``load``: (plan or None, this rank's device); joins the process group if needed.

    ``tp=None`` splits when the job has several processes; one process has nothing to split.
    """
    wanted = env.world_size() > 1 if tp is None else tp
    if not wanted or env.world_size() <= 1:
        return None, device
    device = env.rank_device(device)
    env.init(device)
    return TensorParallel.from_group(), device


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and buffers (shared tensors, e.g. a tied lm_head, counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
