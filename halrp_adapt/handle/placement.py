"""Which dense parts a task keeps: its scales, biases and norm copies against its budget.

Every new task starts with all of them (identity scales, copies of the base biases and norms),
so the trial can move each one, but for one choice made when the task is added
(`decide_statistics`, placement="budget"): its BatchNorm copies, kept all together or none. A
copy in training normalises with batch statistics, a dropped one with the backbone's frozen
running statistics, and factors learned on the one are wrong on the other: a trial run with
every copy, then only some of them kept, left EfficientNet-Lite0's tasks at chance at budgets
<= 0.02. So the trial learns on the network the task keeps.

With `placement="budget"` (the default) `estimate_ranks` then scores every other part by its
Fisher-weighted squared change (`method/allocation.py`, `DensePart`), lets them compete with
the factors' ranks for the budget, and drops the parts not taken: the task runs the
backbone's own there (r = s = 1, the base bias, the base norm frozen in eval mode) and stores
nothing. With `placement="paper"` every task keeps every part, as in the paper, and the
budget must hold them all before any factor.

A task ended without `estimate_ranks` has no Fisher: `fit_parts_to_budget` then drops the
parts that moved least per stored parameter (unit Fisher), as magnitude pruning does for the
factors.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..method.allocation import DensePart, budget_placement
from .accounting import dense_part_costs, norm_state_size

if TYPE_CHECKING:
    from .model import HalrpModel


# A task copies the backbone's BatchNorms (affine and running statistics) only if they take at
# most this share of its budget; otherwise it runs the backbone's, frozen (what a PEFT adapter
# without `modules_to_save` does), and the budget goes to scales, biases and factors. Where the
# copies take 50% / 25% of the budget (EfficientNet-Lite0 / -Lite1 at budgets 0.05 / 0.1; seed
# 0, each at its better training rate of 1e-2 and 1e-3), running the frozen statistics instead
# gave +8.7 / +9.2 ACC (digits split), +0.2 / -1.5 (Fashion-MNIST split), -2.1 (permuted
# Fashion-MNIST, 0.1) while storing about half: the copies pay only as a small part of it.
STATISTICS_SHARE = 0.2


def statistics_norms(handle: HalrpModel) -> list[str]:
    """The routed norms that keep running statistics (BatchNorm and its subclasses)."""
    return [
        name
        for name, norm in handle.task_norms().items()
        if isinstance(norm.base_layer, nn.modules.batchnorm._BatchNorm)
        and norm.base_layer.track_running_stats
    ]


def own_norm_names(handle: HalrpModel, task: str) -> list[str]:
    """The routed norms of which task `task` has its own copy; it runs the others as the
    backbone's, frozen in eval mode."""
    return [name for name, norm in handle.task_norms().items() if task in norm.halrp_norm]


def decide_statistics(handle: HalrpModel, task: str, budget: float) -> None:
    """Keep new task `task`'s BatchNorm copies, all of them, when they cost at most
    `STATISTICS_SHARE` of its budget; else drop them all before it trains (it runs the
    backbone's, frozen)."""
    norms = handle.task_norms()
    own = set(own_norm_names(handle, task))
    names = [n for n in statistics_norms(handle) if n in own]
    cost = sum(norm_state_size(norms[n].halrp_norm[task]) for n in names)
    if cost > STATISTICS_SHARE * budget * handle.backbone_params:
        for name in names:
            norms[name].drop_task_copy(task)


def runs_frozen_statistics(handle: HalrpModel, task: str) -> bool:
    """Whether task `task` runs the backbone's BatchNorm statistics, frozen (it has none of its
    own)."""
    names = statistics_norms(handle)
    return bool(names) and not set(names) & set(own_norm_names(handle, task))


def part_parameters(handle: HalrpModel, task: str) -> dict[str, Tensor]:
    """The task's dense tensors whose Fisher the low-rank trial reads off its own gradients:
    `r:<layer>`, `s:<layer>`, `bias:<layer>`, `norm:<module>:<parameter>`."""
    found: dict[str, Tensor] = {}
    for name, layer in handle.adapter_layers().items():
        if task in layer.halrp_r:
            found[f"r:{name}"] = layer.halrp_r[task]
            found[f"s:{name}"] = layer.halrp_s[task]
        if task in layer.halrp_bias:
            found[f"bias:{name}"] = layer.halrp_bias[task]
    norms = handle.task_norms()
    for name in own_norm_names(handle, task):
        for pname, p in norms[name].halrp_norm[task].named_parameters():
            found[f"norm:{name}:{pname}"] = p
    return {k: v for k, v in found.items() if v.requires_grad}


def plain_part_parameters(handle: HalrpModel, task: str, plain: nn.Module) -> dict[str, Tensor]:
    """The same tensors in a merged plain copy (the full trial): each adapted layer's weight
    (`weight:<layer>`, for its scales' gain), its bias, and task `task`'s own norms'
    parameters."""
    modules = dict(plain.named_modules())
    found: dict[str, Tensor] = {}
    for name in handle.adapter_layers():
        found[f"weight:{name}"] = modules[name].weight
        bias = getattr(modules[name], "bias", None)
        if isinstance(bias, Tensor):
            found[f"bias:{name}"] = bias
    for name in own_norm_names(handle, task):
        for pname, p in modules[name].named_parameters():
            found[f"norm:{name}:{pname}"] = p
    return found


@torch.no_grad()
def dense_start(handle: HalrpModel, task: str) -> dict[str, Any]:
    """Copies of the task's biases and norm copies as they are before its trial (the base's,
    for a new task), the reference each part's change is measured from: read from the task's
    own whole tensors, as the backbone's may be sharded."""
    start: dict[str, Any] = {}
    for name, layer in handle.adapter_layers().items():
        if task in layer.halrp_bias:
            start[f"bias:{name}"] = layer.halrp_bias[task].detach().clone()
    norms = handle.task_norms()
    for name in own_norm_names(handle, task):
        start[f"norm:{name}"] = copy.deepcopy(norms[name].halrp_norm[task])
    return start


@torch.no_grad()
def dense_parts(
    handle: HalrpModel,
    task: str,
    fisher: Mapping[str, float],
    scale_changes: Mapping[str, float] | None = None,
    start: Mapping[str, Any] | None = None,
) -> list[DensePart]:
    """Every dense part task `task` holds now, with its cost and gain (`fisher` keyed as
    `part_parameters` / `plain_part_parameters`; a missing entry counts as 1: unit Fisher).
    `scale_changes` (the full trial) holds `||diag(r) W0 diag(s) - W0||^2` of each scaled
    layer, made where the backbone's weight is whole (a sharded one is only inside the trial).
    Biases and norms change from `start` (`dense_start`), else from the backbone's own.
    """
    start = start or {}
    parts = []
    for name, layer in handle.adapter_layers().items():
        if task in layer.halrp_r:
            r, s = layer.halrp_r[task].float(), layer.halrp_s[task].float()
            if scale_changes is not None and name in scale_changes:
                # the full trial: the layer's Fisher times the change the scales make to W
                gain = fisher.get(f"weight:{name}", 1.0) * scale_changes[name]
            else:
                gain = fisher.get(f"r:{name}", 1.0) * float((r - 1).pow(2).sum()) + fisher.get(
                    f"s:{name}", 1.0
                ) * float((s - 1).pow(2).sum())
            parts.append(DensePart(f"scales:{name}", r.numel() + s.numel(), gain))
        base_bias = start.get(f"bias:{name}", getattr(layer.base_layer, "bias", None))
        if task in layer.halrp_bias and base_bias is not None:
            change = (
                float((layer.halrp_bias[task].float() - base_bias.float()).pow(2).sum())
                if not _sharded(base_bias)
                else math.inf  # a shard of the reference only: kept, as the paper keeps it
            )
            cost = layer.halrp_bias[task].numel()
            parts.append(DensePart(f"bias:{name}", cost, fisher.get(f"bias:{name}", 1.0) * change))
    norms = handle.task_norms()
    for name in own_norm_names(handle, task):
        norm = norms[name]
        own = norm.halrp_norm[task]
        base = start.get(f"norm:{name}", norm.base_layer)
        if any(_sharded(t) for t in [*base.parameters(), *base.buffers()]):
            gain = math.inf  # a shard of the reference only: kept, as the paper keeps it
        else:
            gain = sum(
                fisher.get(f"norm:{name}:{pname}", 1.0) * change
                for pname, change in _effective_change(base, own).items()
            )
        parts.append(DensePart(f"norm:{name}", norm_state_size(own), gain))
    return parts


def _effective_change(base: nn.Module, own: nn.Module) -> dict[str, float]:
    """Squared change of each affine parameter of `own` from `base`, with a BatchNorm's new
    running statistics folded in: `own` normalises x as `w' (x - mu0) / sd0 + b'` with
    `w' = w sd0 / sd` and `b' = b + w (mu0 - mu) / sd`, so its statistics move the affine
    parameters the Fisher was measured on."""
    weight, bias = getattr(own, "weight", None), getattr(own, "bias", None)
    w = weight.detach().float() if isinstance(weight, Tensor) else None
    b = bias.detach().float() if isinstance(bias, Tensor) else None
    if (
        isinstance(own, nn.modules.batchnorm._BatchNorm)
        and isinstance(base, nn.modules.batchnorm._BatchNorm)
        and own.running_mean is not None
        and base.running_mean is not None
        and own.running_var is not None
        and base.running_var is not None
    ):
        sd = (own.running_var.float() + own.eps).sqrt()
        sd0 = (base.running_var.float() + base.eps).sqrt()
        scale = w if w is not None else torch.ones_like(sd)
        shift = (b if b is not None else torch.zeros_like(sd)) + scale * (
            base.running_mean.float() - own.running_mean.float()
        ) / sd
        w, b = scale * sd0 / sd, shift
    changes = {}
    base_params = dict(base.named_parameters())
    for pname, value in (("weight", w), ("bias", b)):
        if value is None:
            continue
        start = base_params.get(pname)
        reference = start.detach().float() if start is not None else _neutral(pname, value)
        changes[pname] = float((value - reference).pow(2).sum())
    return changes


def _sharded(t: Tensor) -> bool:
    """A tensor FSDP2 shards (a DTensor): one process cannot read it whole outside forward."""
    return isinstance(t, DTensor)


def _neutral(pname: str, like: Tensor) -> Tensor:
    return torch.ones_like(like) if pname == "weight" else torch.zeros_like(like)


def drop_parts(handle: HalrpModel, task: str, names: set[str]) -> None:
    """Task `task` stores none of the dense parts `names`: the backbone's own runs there."""
    layers, norms = handle.adapter_layers(), handle.task_norms()
    for part in names:
        kind, _, name = part.partition(":")
        if kind == "scales":
            layers[name].drop_scales(task)
        elif kind == "bias":
            layers[name].drop_bias(task)
        elif kind == "norm":
            norms[name].drop_task_copy(task)
        else:
            raise ValueError(f"unknown dense part {part!r}")


def fit_parts_to_budget(handle: HalrpModel, task: str, budget: float) -> set[str]:
    """Drop the parts that moved least per stored parameter until the task's dense parts fit
    `budget` (a task ended without `estimate_ranks`); return the names dropped."""
    parts = dense_parts(handle, task, {})
    room = budget * handle.backbone_params
    if sum(p.cost for p in parts) <= room:
        return set()
    _, kept = budget_placement([], {}, parts, room)
    dropped = {p.name for p in parts} - kept
    drop_parts(handle, task, dropped)
    return dropped


def smallest_part_cost(handle: HalrpModel, scaled: set[str]) -> int:
    """The cheapest dense part a task can keep alone (a bias, a layer's scales, a norm copy
    without running statistics: BatchNorm copies come all together) or one rank of the
    cheapest low-rank layer: what the smallest workable budget must hold."""
    statistics = set(statistics_norms(handle))
    alone = [n for name, n in handle.task_norms().items() if name not in statistics]
    layers = handle.adapter_layers()
    costs = dense_part_costs(layers, alone, scaled)
    costs += [ly.out_features + ly.in_features for ly in layers.values() if ly.supports_low_rank]
    return min(costs) if costs else 0
