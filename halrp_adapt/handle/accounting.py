"""Parameter accounting: what each task stores, and its growth over the backbone.

A task's growth counts what it stores beyond the frozen backbone: its dense scales r and s,
the nonzero entries of its factors A and B, its own biases, and its own normalisation
parameters and running statistics. Its classifier head is reported apart (`head_params`), as
every method needs one per task. Growth = that count / the backbone's parameter count, where
the backbone is every parameter of the model at `attach` time outside the classifier head.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters.heads import TaskHead
from ..adapters.layers import HalrpLayer
from ..adapters.norms import TaskNorm


@dataclass
class TaskStats:
    """Parameters one task stores, by kind, and its growth."""

    name: str
    ranks: dict[str, int] = field(default_factory=dict)
    scale_params: int = 0
    low_rank_params: int = 0
    low_rank_dense: int = 0
    bias_params: int = 0
    norm_params: int = 0
    head_params: int = 0
    backbone_params: int = 1
    finished: bool = False

    @property
    def stored_params(self) -> int:
        return self.scale_params + self.low_rank_params + self.bias_params + self.norm_params

    @property
    def growth(self) -> float:
        return self.stored_params / self.backbone_params

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "stored_params": self.stored_params, "growth": self.growth}


@dataclass
class HalrpReport:
    """Per-task parameter counts and per-layer ranks. `str()` gives a table."""

    backbone_params: int
    budget: float
    tasks: dict[str, TaskStats]

    @property
    def total_growth(self) -> float:
        return sum(t.growth for t in self.tasks.values())

    def ranks(self) -> dict[str, dict[str, int]]:
        """{layer: {task: rank}}."""
        out: dict[str, dict[str, int]] = {}
        for task in self.tasks.values():
            for layer, rank in task.ranks.items():
                out.setdefault(layer, {})[task.name] = rank
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone_params": self.backbone_params,
            "budget": self.budget,
            "total_growth": self.total_growth,
            "tasks": {n: t.to_dict() for n, t in self.tasks.items()},
        }

    def __str__(self) -> str:
        head = (
            f"{'task':<16}{'growth':>9}{'stored':>11}{'low-rank':>10}{'scales':>9}"
            f"{'bias':>8}{'norms':>8}{'head':>8}  mean rank"
        )
        lines = [
            f"backbone: {self.backbone_params:,} parameters, budget {self.budget} per task",
            head,
        ]
        for t in self.tasks.values():
            ranks = [r for r in t.ranks.values()]
            mean_rank = f"{sum(ranks) / len(ranks):.1f}" if ranks else "-"
            lines.append(
                f"{t.name:<16}{t.growth:>9.4f}{t.stored_params:>11,}"
                f"{t.low_rank_params:>10,}{t.scale_params:>9,}{t.bias_params:>8,}"
                f"{t.norm_params:>8,}{t.head_params:>8,}  {mean_rank}"
            )
        lines.append(f"{'total':<16}{self.total_growth:>9.4f}")
        return "\n".join(lines)


def norm_state_size(module: nn.Module) -> int:
    """Parameters plus floating-point buffers (running statistics) of a norm module."""
    params = sum(p.numel() for p in module.parameters())
    buffers = sum(b.numel() for b in module.buffers() if torch.is_floating_point(b))
    return params + buffers


def dense_part_costs(
    layers: dict[str, HalrpLayer], norms: list[TaskNorm], scaled: Collection[str]
) -> list[int]:
    """The stored size of each dense part a new task starts with: a norm copy (with its
    running statistics), a layer's bias, a `scaled` layer's scales r and s."""
    costs = [norm_state_size(n.base_layer) for n in norms]
    for name, layer in layers.items():
        bias = getattr(layer.base_layer, "bias", None)
        if bias is not None:
            costs.append(bias.numel())
        if name in scaled:
            costs.append(layer.out_features + layer.in_features)
    return costs


def fixed_task_cost(
    layers: dict[str, HalrpLayer], norms: list[TaskNorm], scaled: Collection[str]
) -> int:
    """What every task stores before any factor with `placement="paper"`: every dense part."""
    return sum(dense_part_costs(layers, norms, scaled))


def task_stats(
    task: str,
    layers: dict[str, HalrpLayer],
    norms: list[TaskNorm],
    head: TaskHead | None,
    backbone_params: int,
    finished: bool,
) -> TaskStats:
    stats = TaskStats(name=task, backbone_params=backbone_params, finished=finished)
    for name, layer in layers.items():
        if task in layer.halrp_r:
            stats.scale_params += layer.halrp_r[task].numel() + layer.halrp_s[task].numel()
        if task in layer.halrp_bias:
            stats.bias_params += layer.halrp_bias[task].numel()
        rank = layer.rank(task)
        if rank:
            stats.low_rank_dense += rank * (layer.out_features + layer.in_features)
            for which in ("A", "B"):
                dense = getattr(layer, f"halrp_{which}")
                values = getattr(layer, f"halrp_{which}_values")
                held = dense[task] if task in dense else values[task]
                stats.low_rank_params += int(torch.count_nonzero(held))
        if layer.supports_low_rank:
            stats.ranks[name] = layer.rank(task)
    for norm in norms:
        if task in norm.halrp_norm:
            stats.norm_params += norm_state_size(norm.halrp_norm[task])
    if head is not None and task in head.halrp_head:
        stats.head_params = sum(p.numel() for p in head.halrp_head[task].parameters())
    return stats
