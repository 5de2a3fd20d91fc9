"""The trial fine-tune of rank estimation (HALRP.md section 3, step 1)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .losses import LossFn


def trial_finetune(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: LossFn,
    epochs: int,
    steps: int | None,
    lr: float,
) -> int:
    """Train every parameter of `model` with Adam, unregularised; return the steps taken.

    `steps`, when given, stops training after that many batches whatever `epochs` says
    (looping over `data` again if needed).
    """
    params = list(model.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    taken = 0
    epoch = 0
    while (steps is not None and taken < steps) or (steps is None and epoch < epochs):
        seen = 0
        for batch in data:
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
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
