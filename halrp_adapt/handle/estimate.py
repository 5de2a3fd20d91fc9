"""Rank estimation for one task, step by step as HALRP.md section 3 lays it out."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..adapters.layers import HalrpLayer
from ..config import HalrpConfig
from ..files.serialization import is_sharded
from ..method.allocation import (
    LayerSpectrum,
    budget_placement,
    budget_ranks,
    explained_counts,
    explained_ranks,
)
from ..method.decompose import (
    Spectrum,
    decompose,
    decompose_product,
    factors_from_svd,
    fit_scales,
    residual,
)
from ..method.fisher import DenseGradientFisher, TrialFisher, dense_gradient_fisher_pass
from ..method.losses import LossFn, batch_size, default_loss
from ..method.trial import planned_steps, resolve_trial_lr, trial_finetune, trial_with_fisher
from .accounting import task_stats
from .placement import (
    dense_parts,
    dense_start,
    drop_parts,
    own_norm_names,
    part_parameters,
    plain_part_parameters,
    runs_frozen_statistics,
)

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
    parts: dict[str, bool] = field(default_factory=dict)  # dense part -> kept (placement)
    part_gains: dict[str, float] = field(default_factory=dict, repr=False)


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
    norms = handle.task_norms()
    for name in own_norm_names(handle, task):  # it runs the others as the backbone's, frozen
        norms[name].halrp_norm[task].load_state_dict(trial_modules[name].state_dict())
    head = handle.task_head()
    if head is not None:
        assert handle.head_name is not None  # task_head() is None without a head name
        head.halrp_head[task].load_state_dict(trial_modules[handle.head_name].state_dict())


def kept_parameter_names(handle: HalrpModel, task: str, plain: torch.nn.Module) -> set[str]:
    """The parameters of `plain` (a merged copy) that the task keeps: the adapted layers'
    weights (through scales and factors) and biases, task `task`'s own norms and its head.

    The trial trains only these. Anything else (embeddings, a head tied to them, layers left
    unadapted) is shared and frozen, so a trial that moved it would fit the adapted layers to
    a model the task never runs, and the start would be off by the change thrown away.
    """
    owners = [*handle.adapter_layers(), *own_norm_names(handle, task)]
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

    full_trial = cfg.trial == "full" or is_sharded(handle.model)
    start = dense_start(handle, task) if cfg.placement == "budget" else {}
    trial = Trial(
        data=data,
        loss_fn=loss_fn,
        fisher_data=fisher_data,
        epochs=cfg.trial_epochs if epochs is None else epochs,
        steps=cfg.trial_steps if steps is None else steps,
        lr=resolve_trial_lr(
            cfg.trial_lr if lr is None else lr,
            handle.model,
            handle.backbone_trained_here,
            low_rank=not full_trial,
            frozen_statistics=runs_frozen_statistics(handle, task),
        ),
        lap=lap,
    )
    # 1-4: the trial fine-tune, the Fisher of each low-rank-capable layer, the task's scales
    # and the spectrum of each layer's residual. A sharded model's trial runs on a plain copy:
    # its own forward is a collective, and estimation runs on the main process alone.
    if full_trial:
        taken, fisher, spectra, residuals, scale_changes = _full_trial(handle, task, cfg, trial)
    else:
        taken, fisher, spectra = _low_rank_trial(handle, task, cfg, trial)
        residuals, scale_changes = {}, {}
    # The dense parts' Fisher (placement="budget") came back beside the layers': keys "kind:..."
    part_fisher = {k: v for k, v in fisher.items() if ":" in k}
    fisher = {k: v for k, v in fisher.items() if ":" not in k}

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

    # 5-6. Global choice by explained share, then fitted to the budget up front: with
    # placement="budget" the dense parts compete with the ranks for it, by gain per parameter.
    spectrum_list = described()
    caps = explained_ranks(spectrum_list, cfg.explained, cfg.upper_rank)
    kept_parts: dict[str, bool] = {}
    gains: dict[str, float] = {}
    if cfg.placement == "budget":
        parts = dense_parts(handle, task, part_fisher, scale_changes, start)
        ranks, kept = budget_placement(
            spectrum_list, caps, parts, cfg.budget * handle.backbone_params
        )
        drop_parts(handle, task, {p.name for p in parts} - kept)
        kept_parts = {p.name: p.name in kept for p in parts}
        gains = {p.name: p.gain for p in parts}
    else:
        stats = task_stats(
            task, layers, list(handle.task_norms().values()), None, handle.backbone_params, False
        )
        room = cfg.budget * handle.backbone_params - (stats.stored_params - stats.low_rank_params)
        ranks = budget_ranks(spectrum_list, caps, room)

    # 7. Factors from the SVD (a low-rank trial's own factors are replaced or dropped).
    for name in spectra:
        rank = ranks.get(name, 0)
        if rank > 0:
            A, B = factors_from_svd(spectra[name], rank)
            layers[name].set_low_rank(task, A, B)
        else:
            layers[name].clear_low_rank(task)
    lap("allocate")
    return EstimateResult(
        ranks=ranks,
        explained_ranks=caps,
        fisher=fisher,
        singular_values={n: s.S for n, s in spectra.items()},
        trial_steps=taken,
        trial_lr=trial.lr,
        seconds=seconds,
        parts=kept_parts,
        part_gains=gains,
    )


@dataclass
class Trial:
    """What the trial fine-tune runs on and how long (`estimate_ranks`' arguments resolved)."""

    data: Iterable[Any]
    loss_fn: LossFn
    fisher_data: Iterable[Any] | None
    epochs: int
    steps: int | None
    lr: float
    lap: Callable[[str], None]


def _full_trial(
    handle: HalrpModel, task: str, cfg: HalrpConfig, trial: Trial
) -> tuple[int, dict[str, float], dict[str, Spectrum], dict[str, torch.Tensor], dict[str, float]]:
    """The paper's estimation: a merged copy of the task's model fine-tuned freely (every
    weight the task adapts trained densely, with Adam), the Fisher, least-squares scales and
    the SVD of each residual `W_free - diag(r) W0 diag(s)`. Returns the steps, the Fisher, the
    spectra, the residuals whose SVD was truncated (for a whole one later if needed), and
    `||diag(r) W0 diag(s) - W0||^2` of each scaled layer (its scales' part gain)."""
    layers = handle.adapter_layers()
    # 1. Trial fine-tune of a plain copy of the task's model: what the task keeps is free.
    # 2. Empirical Fisher of each low-rank-capable layer: from the trial's last steps, or a
    #    pass at the trial's final weights (the reference's way).
    plain = handle.merge(task)
    plain_modules = dict(plain.named_modules())
    low_rank = {n: layer for n, layer in layers.items() if layer.supports_low_rank}
    measured = {n: plain_modules[n].weight for n in low_rank}
    parts = plain_part_parameters(handle, task, plain) if cfg.placement == "budget" else {}
    measured.update(parts)
    taken, fisher = trial_with_fisher(
        plain,
        trial.data,
        trial.loss_fn,
        measured,
        fisher=cfg.fisher,
        fisher_data=trial.fisher_data,
        epochs=trial.epochs,
        steps=trial.steps,
        lr=trial.lr,
        trainable=kept_parameter_names(handle, task, plain),
        lap=trial.lap,
        optional=parts,
        eval_modules=set(handle.task_norms()) - set(own_norm_names(handle, task)),
    )

    # 3-4. Scales by least squares, residual, SVD (truncated to the rank cap where that pays).
    spectra: dict[str, Spectrum] = {}
    residuals: dict[str, torch.Tensor] = {}
    scale_changes: dict[str, float] = {}
    with torch.no_grad():
        for name, layer in layers.items():
            # float64 steps that Apple's MPS lacks run on the CPU there (set_* copies back).
            work = "cpu" if layer.weight.device.type == "mps" else layer.weight.device
            w_free = layer.canonical(plain_modules[name].weight.detach()).to(work)
            w_base = layer.canonical(layer.weight.detach()).to(work)
            if task in layer.halrp_r:
                r, s = fit_scales(w_free, w_base, layer.groups)
                grid = r[:, None] * layer.expand_input_scale(s)
                scale_changes[name] = float((w_base * (grid - 1)[:, :, None]).pow(2).sum())
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
        _adopt_trial_state(handle, task, plain_modules)
    return taken, fisher, spectra, residuals, scale_changes


def _low_rank_trial(
    handle: HalrpModel, task: str, cfg: HalrpConfig, trial: Trial
) -> tuple[int, dict[str, float], dict[str, Spectrum]]:
    """Estimation within the task's own parametrization, on the model itself: no copy of the
    model and no dense gradient or optimiser state.

    Each low-rank-capable layer gets temporary factors of rank `trial_rank` (A random, B = 0,
    as a new LoRA adapter, so the task starts where it was); the trial trains everything the
    task keeps (scales, biases, norms, head) and those factors with Adam, so that
    `W_free = diag(r) W0 diag(s) + B A`. The trained scales are the task's (the least-squares
    fit of the full trial is not needed: they are the scales of W_free by construction), the
    residual is `B A` exactly and its SVD comes from the factors alone (`decompose_product`).
    The Fisher is that of each layer's effective weight, made one layer at a time inside the
    backward (`DenseGradientFisher`) over the trial's last steps, or in a pass (`fisher="pass"`).
    """
    layers = handle.adapter_layers()
    low_rank = {n: layer for n, layer in layers.items() if layer.supports_low_rank}
    saved = _task_snapshot(handle, task)
    try:
        return _train_low_rank(handle, task, cfg, trial, low_rank)
    except BaseException:
        _restore_task(handle, task, saved)  # a failed trial leaves the task as it was
        raise


def _train_low_rank(
    handle: HalrpModel,
    task: str,
    cfg: HalrpConfig,
    trial: Trial,
    low_rank: dict[str, HalrpLayer],
) -> tuple[int, dict[str, float], dict[str, Spectrum]]:
    with torch.no_grad():
        for layer in low_rank.values():
            k = min(cfg.trial_rank, layer.in_features, layer.out_features)
            w = layer.weight
            A = torch.empty(k, layer.in_features, device=w.device, dtype=torch.float32)
            torch.nn.init.kaiming_uniform_(A, a=5**0.5)  # nn.Linear's own init, as LoRA's A
            layer.set_low_rank(task, A, A.new_zeros(layer.out_features, k))
    model = handle.model
    own = {id(p) for p in handle._task_parameters(task)}
    trainable = {n for n, p in model.named_parameters() if id(p) in own}
    gathered = None
    if cfg.fisher == "trial":
        gathered = DenseGradientFisher(
            low_rank, planned_steps(trial.data, trial.epochs, trial.steps)
        )
    # The dense parts' Fisher: their own gradients over the trial's last steps (either `fisher`).
    part_tensors = part_parameters(handle, task) if cfg.placement == "budget" else {}
    parts_fisher = (
        TrialFisher(
            part_tensors,
            planned_steps(trial.data, trial.epochs, trial.steps),
            optional=part_tensors,
        )
        if part_tensors
        else None
    )

    def after_backward(step: int, batch: Any) -> None:
        if gathered is not None:
            gathered.after_backward(step, batch_size(batch))
        if parts_fisher is not None:
            parts_fisher.after_backward(step, batch_size(batch))

    was_training = model.training
    try:
        with handle.task(task), gathered.attached() if gathered else contextlib.nullcontext():
            taken = trial_finetune(
                model,
                trial.data,
                trial.loss_fn,
                epochs=trial.epochs,
                steps=trial.steps,
                lr=trial.lr,
                trainable=trainable,
                before_step=gathered.before_step if gathered else None,
                after_backward=None
                if gathered is None and parts_fisher is None
                else after_backward,
            )
            trial.lap("trial")
            if gathered is not None:
                fisher = gathered.result()
            else:
                source = trial.fisher_data if trial.fisher_data is not None else trial.data
                fisher = dense_gradient_fisher_pass(model, source, low_rank, trial.loss_fn)
            if parts_fisher is not None:
                fisher.update(parts_fisher.result())
            trial.lap("fisher")
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        handle._make_trainable(task)  # the trial set every parameter's requires_grad
    with torch.no_grad():
        spectra = {}
        for name, layer in low_rank.items():
            trained_a, trained_b = layer.factor(task, "A"), layer.factor(task, "B")
            assert trained_a is not None and trained_b is not None  # given above
            spectra[name] = decompose_product(trained_b.detach(), trained_a.detach())
    return taken, fisher, spectra


def _task_snapshot(handle: HalrpModel, task: str) -> dict[str, Any]:
    """Copies of task `task`'s tensors in every wrapper (its factors as dense A, B)."""
    saved: dict[str, Any] = {}
    for name, module in handle._routed_by_name.items():
        entries: dict[str, Any] = {}
        for attr in module.adapter_layer_names:
            container = getattr(module, attr)
            if task in container and attr not in FACTOR_CONTAINERS:
                entry = container[task]
                entries[attr] = (
                    {k: v.detach().clone() for k, v in entry.state_dict().items()}
                    if isinstance(entry, torch.nn.Module)
                    else entry.detach().clone()
                )
        if isinstance(module, HalrpLayer) and module.rank(task):
            factors = (module.factor(task, "A"), module.factor(task, "B"))
            entries["factors"] = tuple(f.detach().clone() for f in factors if f is not None)
        saved[name] = entries
    return saved


def _restore_task(handle: HalrpModel, task: str, saved: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, entries in saved.items():
            module = handle._routed_by_name[name]
            for attr, value in entries.items():
                if attr == "factors":
                    continue
                entry = getattr(module, attr)[task]
                if isinstance(entry, torch.nn.Module):
                    entry.load_state_dict(value)
                else:
                    entry.copy_(value)
            if isinstance(module, HalrpLayer):
                if "factors" in entries:
                    module.set_low_rank(task, *entries["factors"])
                else:
                    module.clear_low_rank(task)
    handle._make_trainable(task)


FACTOR_CONTAINERS = ("halrp_A", "halrp_B", "halrp_A_values", "halrp_B_values")
