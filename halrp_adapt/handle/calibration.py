"""Running statistics that match the weights a task keeps.

While a task trains, its BatchNorm copies average statistics over weights that keep moving (the
scales rescale whole rows and columns, the SVD start moves them at step 0), and `end_task`'s
pruning changes the weights once more after the last update. So when a task ends, its own norm
copies get their running statistics recomputed with its final weights: one pass over the task's
data in train mode for those copies only, without gradients, with a cumulative average
(momentum None), as `torch.optim.swa_utils.update_bn` does. `update_bn` itself is not used: it
resets every BatchNorm of the model it is given, the other tasks' copies included.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..method.losses import forward_batch

if TYPE_CHECKING:
    from .model import HalrpModel


def task_batch_norms(handle: HalrpModel, task: str) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm modules inside task `task`'s own norm copies that keep running statistics."""
    found = []
    for norm in handle.task_norms().values():
        if task in norm.halrp_norm:
            found += [
                m
                for m in norm.halrp_norm[task].modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            ]
    return found


@torch.no_grad()
def recalibrate_norm_statistics(
    handle: HalrpModel, task: str, data: Iterable[Any], max_batches: int | None = None
) -> int:
    """Recompute task `task`'s BatchNorm running statistics on `data`; return the batches used.

    Only that task's norm copies change: every other module runs in eval mode, and the
    backbone's and other tasks' tensors are not written. `data` yields batches as the trainer's
    loaders do (`(x, y)`, dicts with or without labels, or plain input tensors).

    Example::

        cl.add_task("b", num_classes=10)
        ...  # train
        cl.end_task(calibration_data=train_loader)  # calls this after pruning
    """
    norms = task_batch_norms(handle, task)
    if not norms:
        return 0
    was_training = handle.model.training
    saved = [({k: v.clone() for k, v in bn.state_dict().items()}, bn.momentum) for bn in norms]
    handle.model.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the pass
        bn.train()
    used = 0
    try:
        with handle.task(task):
            for batch in data:
                if max_batches is not None and used >= max_batches:
                    break
                forward_batch(handle, batch)
                used += 1
        if used == 0:
            raise ValueError("`calibration_data` yielded no batch.")
    except BaseException:
        for bn, (state, _) in zip(norms, saved, strict=True):
            bn.load_state_dict(state)  # a failed pass leaves the statistics as they were
        raise
    finally:
        for bn, (_, momentum) in zip(norms, saved, strict=True):
            bn.momentum = momentum
        handle.model.train(was_training)
    return used
