"""HALRP inside timm's training tools: an optimiser from timm's factory over the open task's
parameters, and a loss wrapper that adds the regularisation, the two places where timm's
`train.py` (or any loop built on `timm.data` / `timm.optim`) needs to know about HALRP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..handle.model import HalrpModel


def create_halrp_optimizer(
    handle: HalrpModel, opt: str = "adamw", lr: float = 1e-3, **kwargs: Any
) -> torch.optim.Optimizer:
    """`timm.optim.create_optimizer_v2` over the open task's parameters.

    HALRP's own L2 (`wd` in `HalrpConfig`, inside `regularization_loss()`) already decays the
    task's parameters, so timm's `weight_decay` defaults to 0 here.

    Example::

        cl.add_task("t1", num_classes=10)
        cl.estimate_ranks(loader_train)
        optimizer = create_halrp_optimizer(cl, opt="adamw", lr=1e-3)
        loss_fn = RegularizedLoss(nn.CrossEntropyLoss(), cl)
    """
    from timm.optim import create_optimizer_v2

    handle._require_open("create_halrp_optimizer()")
    kwargs.setdefault("weight_decay", 0.0)
    return create_optimizer_v2(handle.trainable_parameters(), opt=opt, lr=lr, **kwargs)


class RegularizedLoss(nn.Module):
    """`criterion(output, target) + handle.regularization_loss()` while a task is open: a
    drop-in for timm's `train_loss_fn`.

    Example::

        train_loss_fn = RegularizedLoss(nn.CrossEntropyLoss(), cl)   # in timm's train.py
        loss = train_loss_fn(model(images), targets)
    """

    def __init__(self, criterion: nn.Module, handle: HalrpModel) -> None:
        super().__init__()
        self.criterion = criterion
        self._handle = [handle]  # a plain list: not a submodule of the loss

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.criterion(output, target)
        handle = self._handle[0]
        if handle.open_task is not None:
            loss = loss + handle.regularization_loss()
        return loss
