"""Empirical Fisher per layer (HALRP.md section 3, step 2): the mean squared gradient.

Two ways to measure it:
- `empirical_fisher`: the reference's separate pass (eval mode, true labels) over held-out
  batches at the trial's final weights; one forward and backward per batch.
- `TrialFisher`: the same statistic read off the trial's own gradients over its last steps
  (`TRIAL_FISHER_SHARE` of them, at near-final weights), at no extra forward or backward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .losses import LossFn, batch_size


def empirical_fisher(
    model: nn.Module, data: Iterable[Any], weights: dict[str, torch.Tensor], loss_fn: LossFn
) -> dict[str, float]:
    """One scalar per weight: `sum_b mean(grad_W^2) * |b| / n_batches`, as the reference.

    The model runs in eval mode and the loss uses the true labels. Only the weights' relative
    sizes matter to the rank choice, so the reference's scaling is kept as is.
    """
    was_training = model.training
    model.eval()
    # Only the measured weights need their gradient; the rest only pass gradients through.
    flags = {p: p.requires_grad for p in model.parameters()}
    measured = {id(w) for w in weights.values()}
    for p in flags:
        p.requires_grad_(id(p) in measured)
    totals = {name: 0.0 for name in weights}
    batches = 0
    try:
        for batch in data:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            size = batch_size(batch)
            for name, w in weights.items():
                if w.grad is not None:
                    totals[name] += float(w.grad.float().pow(2).mean()) * size
            batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if batches == 0:
        raise ValueError("the Fisher data yielded no batch.")
    return {name: total / batches for name, total in totals.items()}


# Share of the trial's steps, counted from its end, whose gradients make `TrialFisher`'s Fisher.
TRIAL_FISHER_SHARE = 0.2


class TrialFisher:
    """Gathers `mean(grad_W^2) * |b|` of each weight after each trial step's backward, and
    averages it over the trial's last `TRIAL_FISHER_SHARE` of steps (at least one).

    When the trial's length is known up front only those steps are measured; otherwise every
    step is, and the last ones kept. Values stay on the weights' device until `result()`.

    Example:
        >>> layer = torch.nn.Linear(3, 2)
        >>> fisher = TrialFisher({"fc": layer.weight}, total_steps=5)
        >>> for step in range(5):
        ...     layer.zero_grad(); layer(torch.ones(4, 3)).sum().backward()
        ...     fisher.after_backward(step, batch_size=4)
        >>> round(fisher.result()["fc"], 3)  # grad = 4 everywhere: 16 * 4
        64.0
    """

    def __init__(self, weights: dict[str, torch.Tensor], total_steps: int | None) -> None:
        self.weights = weights
        self.first_step = None if total_steps is None else total_steps - _window(total_steps)
        self.records: list[torch.Tensor] = []

    def after_backward(self, step: int, batch_size: int) -> None:
        """Record step `step` (0-based), if it can be among the last steps."""
        if self.first_step is not None and step < self.first_step:
            return
        grads = [w.grad for w in self.weights.values()]
        if any(g is None for g in grads):
            missing = [n for n, w in self.weights.items() if w.grad is None]
            raise RuntimeError(f"the trial's loss gives no gradient to the weights {missing}.")
        norms = torch._foreach_norm([g.float() for g in grads])  # type: ignore[union-attr]
        sizes = torch.tensor([g.numel() for g in grads], device=norms[0].device)  # type: ignore[union-attr]
        self.records.append(torch.stack(norms).pow(2) / sizes * batch_size)

    def result(self) -> dict[str, float]:
        if not self.records:
            raise ValueError("the trial took no step, so it measured no Fisher.")
        kept = (
            self.records[-_window(len(self.records)) :] if self.first_step is None else self.records
        )
        values = torch.stack(kept).mean(0).tolist()
        return dict(zip(self.weights, values, strict=True))


def _window(steps: int) -> int:
    return max(1, math.ceil(TRIAL_FISHER_SHARE * steps))
