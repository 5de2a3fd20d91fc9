"""Empirical Fisher per layer (HALRP.md section 3, step 2): the mean squared gradient."""

from __future__ import annotations

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
