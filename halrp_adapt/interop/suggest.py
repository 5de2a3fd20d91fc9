"""Hessian-aware ranks for plain PEFT LoRA: `suggest_lora_config`.

HALRP's rank choice without any continual learning: one short trial fine-tune of a copy of the
model, the empirical Fisher of each target layer, the SVD of each layer's change
`W_free - W0`, and the global Fisher-weighted choice within a parameter budget. The result is a
`peft.LoraConfig` whose `rank_pattern` gives each layer its rank (layers that get none are left
out of `target_modules`) and whose `alpha_pattern` keeps LoRA's scale `alpha / r` the same in
every layer.

Differences from HALRP's own estimation, because LoRA has no scales and factorises a conv's
whole kernel: the change is decomposed without fitted scales, a conv's change is flattened to
(out, in x kernel) as PEFT's LoRA conv factorises it, its score is `sigma^2 * fisher`, and a
rank costs what it costs in PEFT (`r * (in + out)`, `r * (in * k * k + out)` for a conv).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from ..handle.estimate import svd_method
from ..method.allocation import LayerSpectrum, budget_ranks, explained_ranks
from ..method.decompose import decompose
from ..method.losses import LossFn, default_loss
from ..method.trial import resolve_trial_lr, trial_with_fisher


def suggest_lora_config(
    model: nn.Module,
    dataloader: Iterable[Any],
    budget: float = 0.01,
    loss_fn: LossFn | None = None,
    *,
    target_modules: Any = None,
    exclude_modules: Any = None,
    explained: float = 0.9,
    upper_rank: int = 64,
    trial_epochs: int = 1,
    trial_steps: int | None = None,
    trial_lr: float | str = "auto",
    fisher_data: Iterable[Any] | None = None,
    **lora_kwargs: Any,
) -> Any:
    """A `peft.LoraConfig` with per-layer ranks from HALRP's Fisher-weighted SVD allocation.

    `model` is not changed (a copy is fine-tuned). `budget` bounds the LoRA parameters as a
    share of the model's parameters; `explained`, `upper_rank` and the trial options are
    HALRP's. `lora_kwargs` go to `LoraConfig` (`lora_alpha` is the scale at the base rank
    `r`, default 8; `modules_to_save`, `lora_dropout`, `task_type`, ...).

    Example::

        from peft import get_peft_model
        config = halrp_adapt.suggest_lora_config(model, train_loader, budget=0.01,
                                                 modules_to_save=["classifier"])
        peft_model = get_peft_model(model, config)   # train as usual
    """
    from peft import LoraConfig

    from ..adapters.heads import find_head
    from ..adapters.targets import select_targets
    from ..config import HalrpConfig

    options = HalrpConfig(
        budget=budget,
        explained=explained,
        upper_rank=upper_rank,
        trial_epochs=trial_epochs,
        trial_steps=trial_steps,
        trial_lr=trial_lr,
        target_modules=target_modules,
        exclude_modules=exclude_modules,
    )
    loss_fn = loss_fn or default_loss
    named = dict(model.named_modules())
    targets = select_targets(model, find_head(model, None), target_modules, exclude_modules)
    base = {
        name: named[name].weight.detach().clone()
        for name in targets
        if _low_rank_capable(named[name])
    }
    if not base:
        raise ValueError(
            "`target_modules`: no layer that LoRA can factorise (Linear, Conv2d "
            "with groups=1, transformers Conv1D) was selected."
        )
    trial = copy.deepcopy(model)
    modules = dict(trial.named_modules())
    measured = {name: modules[name].weight for name in base}
    _, fisher = trial_with_fisher(
        trial,
        dataloader,
        loss_fn,
        measured,
        fisher=options.fisher,
        fisher_data=fisher_data,
        epochs=options.trial_epochs,
        steps=options.trial_steps,
        lr=resolve_trial_lr(options.trial_lr, model),
    )
    spectra = []
    with torch.no_grad():
        for name, w0 in base.items():
            delta = _as_matrix(modules[name], modules[name].weight.detach() - w0)
            method = svd_method(
                options.svd, min(delta.shape), options.randomized_min_dim, upper_rank
            )
            spectrum = decompose(delta.float(), method, rank_cap=upper_rank)
            out_features, in_features = delta.shape
            spectra.append(
                LayerSpectrum(
                    name,
                    spectrum.S,
                    spectrum.energy,
                    fisher[name],
                    1,
                    out_features,
                    in_features,
                    cost_per_rank=_lora_cost(modules[name]),
                )
            )
    del trial, modules
    total = sum(p.numel() for p in model.parameters())
    caps = explained_ranks(spectra, explained, upper_rank)
    ranks = {n: r for n, r in budget_ranks(spectra, caps, budget * total).items() if r > 0}
    if not ranks:
        raise ValueError(
            f"`budget`={budget} leaves no room for even one rank of one layer; raise it."
        )
    r = int(lora_kwargs.pop("r", max(1, round(sum(ranks.values()) / len(ranks)))))
    alpha = float(lora_kwargs.pop("lora_alpha", 8))
    names = sorted(ranks)
    return LoraConfig(
        r=r,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float scales alike
        target_modules="^(?:" + "|".join(re.escape(n) for n in names) + ")$",
        rank_pattern={f"^{re.escape(n)}": ranks[n] for n in names},
        alpha_pattern={f"^{re.escape(n)}": alpha * ranks[n] / r for n in names},
        **lora_kwargs,
    )


def _low_rank_capable(module: nn.Module) -> bool:
    return getattr(module, "groups", 1) == 1 and getattr(module, "weight", None) is not None


def _as_matrix(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """A layer's weight change as the (out, in) matrix LoRA factorises."""
    if isinstance(module, nn.Linear):
        return delta
    if isinstance(module, nn.Conv2d):
        return delta.reshape(delta.shape[0], -1)
    return delta.T  # transformers' Conv1D stores (in, out)


def _lora_cost(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return module.in_channels * k + module.out_channels
    weight = cast(torch.Tensor, module.weight)
    return weight.shape[0] + weight.shape[1]
