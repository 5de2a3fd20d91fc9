"""FSDP2 for continual training: the frozen backbone sharded, each task's parameters whole.

A task trains a few percent of the backbone's parameters (scales, factors, biases, norms,
head), created anew for every task, while the backbone itself never trains after the first
task. So `ContinualTrainer` shards only the backbone, with `torch.distributed.fsdp.fully_shard`
applied the way Accelerate's FSDP2 plugin applies it (each module of the wrap policy's classes,
bottom up, then the root), and leaves every per-task parameter whole on every rank, averaging
their gradients itself (`average_gradients`). Forwards gather each block's weights as FSDP
does; rank estimation, new tasks' copies of the base norms and head, and saving need whole
tensors, which `full_weights` gathers for the duration of a block.

A sharded model cannot be deep-copied, so `shard_backbone` keeps a copy of the model's
structure on the meta device (no memory, `handle/plain_copy.py`), from which
`HalrpModel.merge` builds plain models.

Example (under `torchrun --nproc_per_node 2`, after `dist.init_process_group`):

    sharded = shard_backbone(handle, block_classes={"Block"})
    with full_weights(handle.model):
        handle.add_task("t1", num_classes=10)
        handle.estimate_ranks(data)          # main process only; the others wait
    loss = loss_fn(handle, batch) + handle.regularization_loss()
    loss.backward()
    average_gradients(handle.trainable_parameters())
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard

from ..adapters.routing import TaskRouted
from ..handle.plain_copy import remember_structure

if TYPE_CHECKING:
    from ..handle.model import HalrpModel


def block_classes(model: nn.Module, names: Collection[str] | None = None) -> set[str]:
    """Class names of the modules to shard one by one: `names` (Accelerate's
    `transformer_cls_names_to_wrap`) when given, else transformers' `_no_split_modules`, else
    the classes of a timm-style `model.blocks` list; empty (the root alone) otherwise."""
    if names:
        return set(names)
    no_split = getattr(model, "_no_split_modules", None)
    if no_split:
        return set(no_split)
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        kinds = {type(b) for b in blocks}
        if not any(issubclass(k, (nn.Sequential, nn.ModuleList)) for k in kinds):
            return {k.__name__ for k in kinds}
    return set()


def task_parameters(handle: HalrpModel) -> set[nn.Parameter]:
    """Every per-task parameter (all of a routed module's, except its base layer's)."""
    return {
        p
        for module in handle._routed()
        for name, p in module.named_parameters()
        if not name.startswith("base_layer.")
    }


def shard_backbone(
    handle: HalrpModel,
    block_classes: Collection[str] = (),
    reshard_after_forward: bool = True,
) -> list[FSDPModule]:
    """Shard `handle.model`'s frozen weights with FSDP2 across the default process group;
    return the sharded modules (the blocks, then the root).

    Tasks added later get whole (unsharded) parameters, so add them, and estimate their ranks,
    inside `full_weights`. A backbone that trains (`train_base`) must finish training first.
    """
    open_task = handle.open_task
    if open_task is not None and handle._tasks[open_task].trains_base:
        raise RuntimeError(
            "the open task trains the backbone (train_base=True): shard the backbone after "
            "end_task(), once only tasks' parameters train."
        )
    model = handle.model
    remember_structure(handle)
    ignored = task_parameters(handle)
    options: dict[str, Any] = {
        "reshard_after_forward": reshard_after_forward,
        "ignored_params": ignored,
    }
    inside_routed = {
        id(m) for routed in handle._routed() for m in routed.modules() if m is not routed
    }
    wrapped: list[FSDPModule] = []
    for module in reversed(list(model.modules())):  # bottom up, as Accelerate does
        if (
            module is not model
            and type(module).__name__ in block_classes
            and not isinstance(module, TaskRouted)
            and id(module) not in inside_routed
            and not isinstance(module, FSDPModule)
        ):
            wrapped.append(fully_shard(module, **options))
    wrapped.append(fully_shard(model, **options))
    return wrapped


@contextlib.contextmanager
def full_weights(model: nn.Module) -> Iterator[None]:
    """Every sharded weight of `model` whole on every rank for the block (a collective: call it
    on all ranks); nothing happens for a model that is not sharded."""
    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in sharded:
        module.unshard()
    try:
        yield
    finally:
        for module in sharded:
            module.reshard()


def average_gradients(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of whole (replicated) parameters over the ranks, in one
    all-reduce: what DDP would do for them."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
