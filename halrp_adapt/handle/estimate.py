"""Rank estimation for one task, step by step as HALRP.md section 3 lays it out."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..method.allocation import LayerSpectrum, budget_ranks, explained_counts, explained_ranks
from ..method.decompose import Spectrum, decompose, factors_from_svd, fit_scales, residual
from ..method.losses import LossFn, default_loss
from ..method.trial import resolve_trial_lr, trial_with_fisher
from .accounting import task_stats

if TYPE_CHECKING:
    from .model import HalrpModel


OVERSAMPLE = 10  # extra triplets a truncated SVD computes beyond the rank cap


@dataclass
class EstimateResult:
    """What rank estimation measured and chose, kept on the task for inspection."""

    ranks: dict[str, int]
    explained_ranks: dict[str, int]
    fisher: dict[str, float]
    singular_values: dict[str, torch.Tensor] = field(repr=False)
    trial_steps: int = 0
    trial_lr: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)  # trial, fisher, decompose, allocate


def svd_method(config_svd: str, smallest_side: int, randomized_min_dim: int, rank_cap: int) -> str:
    """ "full" or "randomized" for a residual whose smaller side is `smallest_side`.

    "auto" truncates (randomized SVD of the leading `rank_cap + oversample` triplets) a layer
    at least `randomized_min_dim` wide whose cap is at most half its width: below that the
    full SVD costs about as much (benchmarks/speed.py's scaling table).
    """
    if config_svd == "auto":
        wide = smallest_side >= randomized_min_dim
        return "randomized" if wide and rank_cap + OVERSAMPLE <= smallest_side // 2 else "full"
    return config_svd


@torch.no_grad()
def _adopt_trial_state(handle: HalrpModel, task: str, trial_modules: dict[str, Any]) -> None:
    """The trial's biases, norms and head become the task's own."""
    for name, layer in handle.adapter_layers().items():
        bias = getattr(trial_modules[name], "bias", None)
        if bias is not None:
            layer.set_bias(task, bias)
    for name, norm in handle.task_norms().items():
        norm.halrp_norm[task].load_state_dict(trial_modules[name].state_dict())
    head = handle.task_head()
    if head is not None:
        assert handle.head_name is not None  # task_head() is None without a head name
        head.halrp_head[task].load_state_dict(trial_modules[handle.head_name].state_dict())


def kept_parameter_names(handle: HalrpModel, plain: torch.nn.Module) -> set[str]:
    """The parameters of `plain` (a merged copy) that the task keeps: the adapted layers'
    weights (through scales and factors) and biases, the task's norms and head.

    The trial trains only these. Anything else (embeddings, a head tied to them, layers left
    unadapted) is shared and frozen, so a trial that moved it would fit the adapted layers to
    a model the task never runs, and the start would be off by the change thrown away.
    """
    owners = [*handle.adapter_layers(), *handle.task_norms()]
    if handle.task_head() is not None and handle.head_name is not None:
        owners.append(handle.head_name)
    return {
        name
        for name, _ in plain.named_parameters()
        if any(name.startswith(owner + ".") for owner in owners)
    }


def estimate_task(
    handle: HalrpModel,
    task: str,
    data: Iterable[Any],
    *,
    loss_fn: LossFn | None,
    fisher_data: Iterable[Any] | None,
    epochs: int | None,
    steps: int | None,
    lr: float | None,
) -> EstimateResult:
    cfg = handle._tasks[task].config  # the task's own options (PEFT adapters may differ)
    loss_fn = loss_fn or default_loss
    layers = handle.adapter_layers()

    clock = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = now - clock
        clock = now

    # 1. Trial fine-tune of a plain copy of the task's model: what the task keeps is free.
    # 2. Empirical Fisher of each low-rank-capable layer: from the trial's last steps, or a
    #    pass at the trial's final weights (the reference's way).
    trial = handle.merge(task)
    trial_modules = dict(trial.named_modules())
    low_rank = {n: layer for n, layer in layers.items() if layer.supports_low_rank}
    measured = {n: trial_modules[n].weight for n in low_rank}
    trial_lr = resolve_trial_lr(
        cfg.trial_lr if lr is None else lr, handle.model, handle.backbone_trained_here
    )
    taken, fisher = trial_with_fisher(
        trial,
        data,
        loss_fn,
        measured,
        fisher=cfg.fisher,
        fisher_data=fisher_data,
        epochs=cfg.trial_epochs if epochs is None else epochs,
        steps=cfg.trial_steps if steps is None else steps,
        lr=trial_lr,
        trainable=kept_parameter_names(handle, trial),
        lap=lap,
    )

    # 3-4. Scales by least squares, residual, SVD (truncated to the rank cap where that pays).
    spectra: dict[str, Spectrum] = {}
    residuals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            # float64 steps that Apple's MPS lacks run on the CPU there (set_* copies back).
            work = "cpu" if layer.weight.device.type == "mps" else layer.weight.device
            w_free = layer.canonical(trial_modules[name].weight.detach()).to(work)
            w_base = layer.canonical(layer.weight.detach()).to(work)
            if task in layer.halrp_r:
                r, s = fit_scales(w_free, w_base, layer.groups)
                layer.set_scales(task, r, s)
            else:  # a layer left out of `scale_modules`: its factors carry the whole change
                r = w_base.new_ones(w_base.shape[0])
                s = w_base.new_ones(w_base.shape[1] * layer.groups)
            if name not in low_rank:
                continue
            d = residual(w_free, w_base, r, s)
            method = svd_method(cfg.svd, min(d.shape), cfg.randomized_min_dim, cfg.upper_rank)
            spectra[name] = decompose(d, method, rank_cap=cfg.upper_rank, oversample=OVERSAMPLE)
            if len(spectra[name].S) < min(d.shape):
                residuals[name] = d
        _adopt_trial_state(handle, task, trial_modules)
    del trial, trial_modules

    def described() -> list[LayerSpectrum]:
        return [
            LayerSpectrum(
                name,
                spectrum.S,
                spectrum.energy,
                fisher[name],
                layers[name].kernel_area,
                layers[name].out_features,
                layers[name].in_features,
            )
            for name, spectrum in spectra.items()
        ]

    # A truncated spectrum changes the choice only if the explained-share prefix takes all of
    # it (more of its values might lie above the cut): those layers get their whole spectrum.
    while residuals:
        counts = explained_counts(described(), cfg.explained)
        short = [n for n in residuals if counts[n] >= len(spectra[n].S)]
        if not short:
            break
        for name in short:
            spectra[name] = decompose(residuals.pop(name), "full")
    residuals.clear()
    lap("decompose")

    # 5-6. Global choice by explained share, then fitted to the budget up front.
    spectrum_list = described()
    caps = explained_ranks(spectrum_list, cfg.explained, cfg.upper_rank)
    stats = task_stats(
        task, layers, list(handle.task_norms().values()), None, handle.backbone_params, False
    )
    room = cfg.budget * handle.backbone_params - (stats.stored_params - stats.low_rank_params)
    ranks = budget_ranks(spectrum_list, caps, room)

    # 7. Factors from the SVD.
    for name, rank in ranks.items():
        if rank > 0:
            A, B = factors_from_svd(spectra[name], rank)
            layers[name].set_low_rank(task, A, B)
    lap("allocate")
    return EstimateResult(
        ranks=ranks,
        explained_ranks=caps,
        fisher=fisher,
        singular_values={n: s.S for n, s in spectra.items()},
        trial_steps=taken,
        trial_lr=trial_lr,
        seconds=seconds,
    )
