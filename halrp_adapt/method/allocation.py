"""Global rank choice across layers (HALRP.md section 3, steps 5-6) and the up-front budget.

Every singular value of every layer gets `score = kernel_area * sigma^2 * fisher(layer)`.
Explained share (the paper): sort all scores descending and take the shortest prefix whose
cumulative share of the total exceeds `explained`; a layer's rank is how many of its values are
in that prefix, clamped to [1, upper_rank] (and to the matrix size).

Budget (this project's addition; the reference bounds growth only by pruning after training):
when the ranks above would cost more low-rank parameters than `budget_params`, values are taken
greedily by score per parameter (score / (out + in), the cost of one more rank of that layer)
while they fit, never beyond the explained-share rank of their layer. Within a layer the values
are sorted, so each layer still gets a prefix. Every layer first keeps rank 1 if the budget has
room for it, in order of its best score per parameter.

Placement (`placement="budget"`, this project's default): the task's dense parts (a layer's
scales r and s, a layer's bias, a norm copy with its statistics) compete with the factors' ranks
for the same budget. Each part's gain is its Fisher-weighted squared change,
`sum fisher * (theta - theta_base)^2`, the second-order estimate of what the loss loses without
it, in the units of a singular value's score (`kernel_area * sigma^2 * fisher` is the same sum
over a rank-one change of a weight). Parts and ranks are taken greedily by gain per stored
parameter while they fit; a part not taken is the backbone's own, shared and frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LayerSpectrum:
    """What the allocation needs of one layer."""

    name: str
    sigma: Tensor  # leading singular values, descending
    energy: float  # ||D||_F^2: sum of all sigma^2, including any not computed
    fisher: float
    kernel_area: int
    out_features: int
    in_features: int
    cost_per_rank: int | None = None  # parameters one more rank costs; default out + in

    @property
    def weight(self) -> float:
        return self.kernel_area * self.fisher

    @property
    def rank_cost(self) -> int:
        return self.cost_per_rank or self.out_features + self.in_features


def explained_ranks(
    layers: list[LayerSpectrum], explained: float, upper_rank: int
) -> dict[str, int]:
    """Ranks from the global explained-share rule (the paper's), clamped to [1, upper_rank]."""
    counts = explained_counts(layers, explained)
    return {
        layer.name: max(1, min(counts[layer.name], upper_rank, layer.sigma.numel()))
        for layer in layers
    }


def explained_counts(layers: list[LayerSpectrum], explained: float) -> dict[str, int]:
    """How many of each layer's values the explained-share prefix takes, before clamping.

    A layer whose spectrum was truncated (`sigma` shorter than its matrix) and whose count
    equals the values it has may hide more values above the prefix's cut: only then can the
    truncation change the prefix, and the layer needs its whole spectrum (`estimate.py`).
    """
    scores, owners = _scores(layers)
    total = sum(layer.weight * layer.energy for layer in layers)
    counts = {layer.name: 0 for layer in layers}
    if scores.numel() and total > 0:
        order = torch.argsort(scores, descending=True)
        cumulative = torch.cumsum(scores[order].double(), 0) / total
        past = torch.nonzero(cumulative > explained)
        stop = int(past[0]) + 1 if past.numel() else scores.numel()
        for owner in owners[order[:stop]].tolist():
            counts[layers[owner].name] += 1
    return counts


def budget_ranks(
    layers: list[LayerSpectrum], caps: dict[str, int], budget_params: float
) -> dict[str, int]:
    """Cut `caps` down to `budget_params` low-rank parameters, best score per parameter first."""
    if sum(caps[ly.name] * ly.rank_cost for ly in layers) <= budget_params:
        return dict(caps)
    ranks = {ly.name: 0 for ly in layers}
    left = budget_params
    by_first = sorted(layers, key=lambda ly: -_density(ly, 0))
    for layer in by_first:  # rank 1 everywhere first, while it fits
        if caps[layer.name] >= 1 and layer.rank_cost <= left:
            ranks[layer.name] = 1
            left -= layer.rank_cost
    candidates = [(_density(ly, i), ly) for ly in layers for i in range(1, caps[ly.name])]
    candidates.sort(key=lambda c: -c[0])
    for _, layer in candidates:
        if layer.rank_cost <= left:
            ranks[layer.name] += 1
            left -= layer.rank_cost
    return ranks


@dataclass
class DensePart:
    """A per-task part kept whole or not at all: a layer's scales, its bias, a norm copy."""

    name: str  # "scales:<layer>", "bias:<layer>" or "norm:<module>"
    cost: int  # parameters stored (a norm's running statistics included)
    gain: float  # sum of fisher * squared change from the backbone's


def budget_placement(
    layers: list[LayerSpectrum],
    caps: dict[str, int],
    parts: list[DensePart],
    budget_params: float,
) -> tuple[dict[str, int], set[str]]:
    """Ranks (at most `caps`) and the names of the dense `parts` kept within `budget_params`,
    taken by gain per parameter; everything when everything fits.

    Example:
        >>> import torch
        >>> layer = LayerSpectrum("fc", torch.tensor([2.0, 1.0]), 5.0, 1.0, 1, 4, 4)
        >>> parts = [DensePart("bias:fc", 4, 0.5), DensePart("scales:fc", 8, 16.0)]
        >>> budget_placement([layer], {"fc": 2}, parts, budget_params=16)
        ({'fc': 1}, {'scales:fc'})
    """
    total = sum(p.cost for p in parts) + sum(caps[ly.name] * ly.rank_cost for ly in layers)
    if total <= budget_params:
        return dict(caps), {p.name for p in parts}
    ranks = {ly.name: 0 for ly in layers}
    kept: set[str] = set()
    candidates: list[tuple[float, int, LayerSpectrum | DensePart]] = [
        (p.gain / p.cost, p.cost, p) for p in parts if p.cost > 0
    ]
    candidates += [
        (_density(ly, i), ly.rank_cost, ly) for ly in layers for i in range(caps[ly.name])
    ]
    # Python's sort is stable: equal densities keep this order (parts, then each layer's
    # values in descending order, so a layer's ranks stay a prefix).
    candidates.sort(key=lambda c: -c[0])
    left = budget_params
    for _, cost, what in candidates:
        if cost > left:
            continue
        left -= cost
        if isinstance(what, DensePart):
            kept.add(what.name)
        else:
            ranks[what.name] += 1
    return ranks, kept


def _density(layer: LayerSpectrum, i: int) -> float:
    return float(layer.weight * layer.sigma[i] ** 2) / layer.rank_cost


def _scores(layers: list[LayerSpectrum]) -> tuple[Tensor, Tensor]:
    # Scores are a few thousand numbers: rank them on the CPU whatever device the SVD ran on.
    parts = [layer.weight * layer.sigma.detach().cpu().double() ** 2 for layer in layers]
    owners = [torch.full((p.numel(),), i, dtype=torch.long) for i, p in enumerate(parts)]
    if not parts:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat(parts), torch.cat(owners)
