"""Tensors in and out of a task, in PEFT's key naming, and the backbone's fingerprint.

A task's tensors are named as PEFT names an adapter's: the model path under
``base_model.model.``, then the container, without the task name. For example
``base_model.model.blocks.0.attn.qkv.halrp_A`` (a dense factor),
``...qkv.halrp_A_values`` and ``...qkv.halrp_A_mask`` (a compact one),
``base_model.model.blocks.0.norm1.halrp_norm.weight`` (a norm copy) and
``base_model.model.head.halrp_head.weight`` (the head).
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from ..adapters.routing import TaskRouted

if TYPE_CHECKING:
    from ..handle.model import HalrpModel

PEFT_PREFIX = "base_model.model."
SAMPLES_PER_TENSOR = 1024


def _live_task_tensors(handle: HalrpModel, task: str) -> dict[str, Tensor]:
    """{file key: the live tensor} for every tensor task `task` owns."""
    out: dict[str, Tensor] = {}
    for module_name, module in handle.model.named_modules():
        if not isinstance(module, TaskRouted):
            continue
        for attr in module.adapter_layer_names + module.other_param_names:
            container = getattr(module, attr)
            if task not in container:
                continue
            key = f"{PEFT_PREFIX}{module_name}.{attr}"
            entry = container[task]
            if isinstance(entry, nn.Module):
                for suffix, tensor in entry.state_dict(keep_vars=True).items():
                    out[f"{key}.{suffix}"] = tensor
            else:
                out[key] = entry
    return out


def task_state_dict(
    handle: HalrpModel, task: str, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """A detached CPU copy of task `task`'s tensors in PEFT naming, floats cast to `dtype`."""
    out = {}
    for key, tensor in _live_task_tensors(handle, task).items():
        t = tensor.detach()
        if torch.is_floating_point(t):
            t = t.to(dtype)
        out[key] = t.to("cpu").contiguous()
    return out


@torch.no_grad()
def load_task_tensors(
    handle: HalrpModel, task: str, tensors: dict[str, Tensor], source: str
) -> None:
    """Copy `tensors` into task `task`'s skeleton; every key, shape and value is checked first.

    Raises ValueError naming `source` and the first problem; nothing is written then.
    """
    live = _live_task_tensors(handle, task)
    missing, unexpected = sorted(set(live) - set(tensors)), sorted(set(tensors) - set(live))
    if missing or unexpected:
        raise ValueError(
            f"{source}: tensors do not match the task's layers: missing "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
            f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}."
        )
    for key, target in live.items():
        value = tensors[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"{source}: tensor {key} has shape {tuple(value.shape)}, the model "
                f"expects {tuple(target.shape)}."
            )
        if torch.is_floating_point(target) != torch.is_floating_point(value):
            raise ValueError(
                f"{source}: tensor {key} has dtype {value.dtype}, the model expects {target.dtype}."
            )
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{source}: tensor {key} holds NaN or infinite values.")
    for key, target in live.items():
        target.copy_(tensors[key])


def backbone_state(model: nn.Module, head: str | None = None) -> dict[str, Tensor]:
    """The frozen backbone's tensors under the names they have in the plain model, without the
    classifier head `head`: what the task adapters are relative to. `model` may be plain or
    adapted (its adapter entries are left out)."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, TaskRouted):
            skip += [f"{name}.{a}." for a in module.adapter_layer_names + module.other_param_names]
    out = {}
    for key, tensor in _state(model).items():
        if any(key.startswith(prefix) for prefix in skip):
            continue
        plain = key.replace(".base_layer.", ".")
        if head is not None and (plain == head or plain.startswith(head + ".")):
            continue
        out[plain] = tensor
    return out


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 (`fully_shard`) wraps any module of `model`.

    >>> is_sharded(torch.nn.Linear(2, 2))
    False
    """
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _state(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict(keep_vars=True)`; for a model sharded by FSDP, the same entries read
    from the modules themselves, whose weights must then be gathered (FSDP's own state dict
    would hand back the shards, and reshard the modules as it does)."""
    if not is_sharded(model):
        return model.state_dict(keep_vars=True)
    out: dict[str, Tensor] = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        entries = [*module._parameters.items()]
        entries += [
            (n, b)
            for n, b in module._buffers.items()
            if n not in module._non_persistent_buffers_set
        ]
        for name, tensor in entries:
            if tensor is None:
                continue
            if isinstance(tensor, DTensor):
                raise RuntimeError(
                    f"the backbone is sharded (FSDP) and {dot}{name} is not gathered: read it "
                    "inside halrp_adapt.training.sharding.full_weights(model), on every rank."
                )
            out[f"{dot}{name}"] = tensor
    return out


def backbone_fingerprint(model: nn.Module, head: str | None = None) -> str:
    """sha256 over the backbone's names, shapes, dtypes and up to 1,024 evenly spaced values of
    each tensor: cheap on large models, and different whenever architecture or weights differ
    in practice."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone_state(model, head).items()):
        t = tensor.detach()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.flatten()
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].to("cpu")
        if torch.is_floating_point(sample):
            sample = sample.to(torch.float64)
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
