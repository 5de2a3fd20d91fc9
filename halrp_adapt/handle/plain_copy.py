"""Plain copies of a model that cannot be deep-copied (one sharded by FSDP).

`merge` builds a task's plain model by deep-copying the attached model with each routed module
replaced by its merged plain layer. FSDP refuses deep copies, so before sharding the trainer
calls `remember_structure`, which keeps the model's structure with every tensor on the meta
device (no memory); `plain_from_structure` then deep-copies that structure and fills each
tensor from the live model, whose weights must be whole at that moment.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .model import HalrpModel

STRUCTURE_KEY = "_halrp_structure"  # in the handle's __dict__: not a submodule


def remember_structure(handle: HalrpModel) -> None:
    """Keep `handle.model`'s structure, every tensor on the meta device, for `merge`."""
    memo: dict[int, Any] = {}
    for p in handle.model.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in handle.model.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    handle.__dict__[STRUCTURE_KEY] = copy.deepcopy(handle.model, memo)


def remembered_structure(handle: HalrpModel) -> nn.Module | None:
    return handle.__dict__.get(STRUCTURE_KEY)


def plain_from_structure(
    structure: nn.Module, live: nn.Module, parts: dict[str, nn.Module]
) -> nn.Module:
    """`structure` deep-copied with the modules named in `parts` replaced by them, and every
    other parameter and buffer a copy of `live`'s of the same name."""
    modules = dict(structure.named_modules())
    memo: dict[int, Any] = {id(modules[name]): part for name, part in parts.items()}
    plain = copy.deepcopy(structure, memo)
    values = {**dict(live.named_parameters()), **dict(live.named_buffers())}
    for name, tensor in [*plain.named_parameters(), *plain.named_buffers()]:
        if not tensor.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = plain.get_submodule(owner_name)
        value = values[name].detach().clone()
        if isinstance(tensor, nn.Parameter):
            setattr(owner, attr, nn.Parameter(value, requires_grad=tensor.requires_grad))
        else:
            persistent = attr not in owner._non_persistent_buffers_set
            owner.register_buffer(attr, value, persistent=persistent)
    return plain
