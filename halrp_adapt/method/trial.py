"""The trial fine-tune of rank estimation (HALRP.md section 3, step 1)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import nn

from .fisher import TrialFisher, empirical_fisher
from .losses import LossFn, batch_size

# The trial's Adam learning rate when `trial_lr="auto"`, by kind of backbone (README, "Trial
# defaults"). The paper's 1e-3 suits a backbone trained from scratch by the model's first task
# and pretrained CNNs; full fine-tuning a pretrained transformer at 1e-3 moves it far from the
# weights every task shares, and the SVD start then carries that overshoot into the task.
TRIAL_LRS: dict[str, float] = {
    "trained-here": 1e-3,
    "cnn": 1e-3,
    "cnn-frozen-statistics": 1e-4,
    "transformer": 1e-4,
    "causal-lm": 1e-5,
}


# The low-rank trial's (`trial="low-rank"`): temporary factors of a pretrained backbone learn
# at 10x the full trial's rate, as LoRA does against full fine-tuning. At the full trial's rate
# they barely left B = 0 in a short trial, their product was about rank one, and the explained
# share gave most layers rank 1: against the full trial, seeds 0-2, -3.2 ACC on all-MiniLM
# topics, -1.9 / -0.8 on EfficientNet-Lite0's Fashion-MNIST / digits splits; at 10x, -0.1,
# +0.4, -0.3 (benchmarks/results/quality_trial.json). A backbone trained by the first task
# keeps the paper's 1e-3 (1e-2 lost 5.7 points on the demo's ViT, seed 0).
#
# A CNN task whose budget cannot hold its BatchNorm copies runs the backbone's frozen
# statistics (handle/placement.py, `decide_statistics`): nothing renormalises what the trial
# changes, and at 1e-2 six steps of the trial drove EfficientNet-Lite0 to one constant output
# (digits split, budget 0.01: every task at chance); at 1e-3 its tasks reached 89-98% train
# accuracy. Such a task takes the transformer's rates (no batch statistics either); the full
# trial's 1e-4 against its 1e-3 there: 95.5 against 62.3 ACC (budget 0.01, seed 0).
LOW_RANK_TRIAL_LRS: dict[str, float] = {
    "trained-here": 1e-3,
    "cnn": 1e-2,
    "cnn-frozen-statistics": 1e-3,
    "transformer": 1e-3,
    "causal-lm": 1e-4,
}


def backbone_kind(
    model: nn.Module, trained_here: bool = False, frozen_statistics: bool = False
) -> str:
    """Which of `TRIAL_LRS`'s kinds `model` is.

    "trained-here" when a task of this model trained the backbone (the paper's protocol);
    "causal-lm" for a transformers model that generates text; "cnn" for a network with
    BatchNorm ("cnn-frozen-statistics" when the task runs the backbone's BatchNorm frozen,
    `frozen_statistics`); "transformer" otherwise (LayerNorm or RMSNorm networks: ViT, BERT,
    ConvNeXt).

    Example:
        >>> import torch
        >>> backbone_kind(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)))
        'cnn'
    """
    if trained_here:
        return "trained-here"
    can_generate = getattr(model, "can_generate", None)
    if callable(can_generate) and can_generate():
        return "causal-lm"
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return "cnn-frozen-statistics" if frozen_statistics else "cnn"
    return "transformer"


def resolve_trial_lr(
    lr: float | str,
    model: nn.Module,
    trained_here: bool = False,
    low_rank: bool = False,
    frozen_statistics: bool = False,
) -> float:
    """`lr` itself, or for "auto" the entry of `model`'s kind (`backbone_kind`) in `TRIAL_LRS`
    (the full trial) or `LOW_RANK_TRIAL_LRS` (`low_rank`: the low-rank trial).

    Example:
        >>> import torch
        >>> resolve_trial_lr("auto", torch.nn.Linear(2, 2), low_rank=True)
        0.001
    """
    if lr == "auto":
        table = LOW_RANK_TRIAL_LRS if low_rank else TRIAL_LRS
        return table[backbone_kind(model, trained_here, frozen_statistics)]
    return float(lr)


def trial_finetune(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: LossFn,
    epochs: int,
    steps: int | None,
    lr: float,
    trainable: Collection[str] | None = None,
    after_backward: Callable[[int, Any], None] | None = None,
    before_step: Callable[[int], None] | None = None,
    eval_modules: Collection[str] = (),
) -> int:
    """Train `model`'s parameters named in `trainable` (default: all) with Adam, unregularised;
    return the steps taken. The others are frozen for the trial; the modules named in
    `eval_modules` also stay in eval mode (norms run on the backbone's frozen statistics).

    `steps`, when given, stops training after that many batches whatever `epochs` says
    (looping over `data` again if needed). `after_backward(step, batch)` runs between each
    step's backward and its update (`TrialFisher` reads the gradients there), `before_step(step)`
    before its forward (`DenseGradientFisher` starts listening there).
    """
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or name in trainable)
        if p.requires_grad:
            params.append(p)
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    for name in eval_modules:
        model.get_submodule(name).eval()
    taken = 0
    epoch = 0
    while (steps is not None and taken < steps) or (steps is None and epoch < epochs):
        seen = 0
        for batch in data:
            optimizer.zero_grad(set_to_none=True)
            if before_step is not None:
                before_step(taken)
            loss_fn(model, batch).backward()
            if after_backward is not None:
                after_backward(taken, batch)
            optimizer.step()
            taken += 1
            seen += 1
            if steps is not None and taken >= steps:
                break
        if seen == 0:
            raise ValueError(
                "`data`: the trial data yielded no batch; give an iterable of "
                "(inputs, labels) batches or dicts, with at least one batch."
            )
        epoch += 1
    return taken


def planned_steps(data: Iterable[Any], epochs: int, steps: int | None) -> int | None:
    """How many steps `trial_finetune` will take, or None when `data` has no length."""
    if steps is not None:
        return steps
    try:
        return epochs * len(data)  # type: ignore[arg-type]
    except TypeError:
        return None


def trial_with_fisher(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: LossFn,
    weights: dict[str, torch.Tensor],
    *,
    fisher: str,
    fisher_data: Iterable[Any] | None,
    epochs: int,
    steps: int | None,
    lr: float,
    trainable: Collection[str] | None = None,
    lap: Callable[[str], None] | None = None,
    optional: Collection[str] = (),
    eval_modules: Collection[str] = (),
) -> tuple[int, dict[str, float]]:
    """`trial_finetune`, then the empirical Fisher of `weights`: read off the trial's last
    steps (`fisher="trial"`) or from a pass over `fisher_data` (default `data`) at its final
    weights (`fisher="pass"`). Returns the steps taken and {name: Fisher}; `lap("trial")` and
    `lap("fisher")` are called as each part ends (for timings). Weights named in `optional`
    may get no gradient (their Fisher is then 0); `eval_modules` as in `trial_finetune`."""
    lap = lap or (lambda phase: None)
    gathered = None
    if fisher == "trial":
        gathered = TrialFisher(weights, planned_steps(data, epochs, steps), optional)
    taken = trial_finetune(
        model,
        data,
        loss_fn,
        epochs=epochs,
        steps=steps,
        lr=lr,
        trainable=trainable,
        after_backward=None
        if gathered is None
        else lambda step, batch: gathered.after_backward(step, batch_size(batch)),
        eval_modules=eval_modules,
    )
    lap("trial")
    if gathered is not None:
        result = gathered.result()
    else:
        source = fisher_data if fisher_data is not None else data
        result = empirical_fisher(model, source, weights, loss_fn)
    lap("fisher")
    return taken, result
