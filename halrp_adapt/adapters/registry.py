"""Which layer types HALRP adapts, and with which adapter class.

Two tables, both open to users:
- weight layers -> adapter class (`register_layer_type`), first match wins, latest first;
- normalisation layers that get a per-task copy (`register_norm_type`).

A type may be given as a class or as a dotted path (``"transformers.pytorch_utils.Conv1D"``)
that is resolved only once its module has been imported, so that importing halrp_adapt does
not import transformers.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import cast

from torch import nn

from .layers import HalrpConv1D, HalrpConv2d, HalrpLayer, HalrpLinear

LayerType = type | str

_ADAPTERS: list[tuple[LayerType, type[HalrpLayer]]] = [
    (nn.Linear, HalrpLinear),
    (nn.Conv2d, HalrpConv2d),
    ("transformers.pytorch_utils.Conv1D", HalrpConv1D),
]

_NORMS: list[LayerType] = [
    nn.modules.batchnorm._NormBase,  # BatchNorm1d/2d/3d, SyncBatchNorm, InstanceNorm
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
]


def _resolve(layer_type: LayerType) -> type | None:
    if isinstance(layer_type, type):
        return layer_type
    module_name, _, attr = layer_type.rpartition(".")
    if module_name not in sys.modules:
        return None
    return getattr(importlib.import_module(module_name), attr, None)


def _name(layer_type: LayerType) -> str:
    return layer_type if isinstance(layer_type, str) else layer_type.__name__


def register_layer_type(layer_type: LayerType, adapter_cls: type[HalrpLayer]) -> None:
    """Adapt layers of `layer_type` with `adapter_cls` (a `HalrpLayer` subclass).

    A layer that computes ``x @ W.T + b`` with ``W`` of shape (out, in) can reuse `HalrpLinear`.

    Example:
        >>> import torch
        >>> from halrp_adapt import HalrpLinear, register_layer_type
        >>> class MyLinear(torch.nn.Linear):
        ...     pass
        >>> register_layer_type(MyLinear, HalrpLinear)
    """
    if not (isinstance(layer_type, str) or isinstance(layer_type, type)):
        raise TypeError(f"`layer_type` must be a class or a dotted path, got {layer_type!r}.")
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, HalrpLayer)):
        raise TypeError(f"`adapter_cls` must be a subclass of HalrpLayer, got {adapter_cls!r}.")
    for i, (known, _) in enumerate(_ADAPTERS):
        if known == layer_type:
            warnings.warn(
                f"replacing the adapter registered for {_name(layer_type)}.", stacklevel=2
            )
            del _ADAPTERS[i]
            break
    _ADAPTERS.insert(0, (layer_type, adapter_cls))


def adapter_class_for(module: nn.Module) -> type[HalrpLayer] | None:
    """The adapter class for `module`: exact type first, then the latest registered base."""
    resolved = [(_resolve(t), cls) for t, cls in _ADAPTERS]
    for layer_type, cls in resolved:
        if layer_type is type(module):
            return cls
    for layer_type, cls in resolved:
        if layer_type is not None and isinstance(module, layer_type):
            # A subclass with its own forward (weight standardisation, dynamic padding...)
            # computes something else than the adapter would: only wrap it if the adapter
            # says it reproduces that forward.
            # `layer_type` is a Module class here: `module` is an instance of it.
            same_forward = type(module).forward is cast(type[nn.Module], layer_type).forward
            return cls if same_forward or cls.handles_forward_of(module) else None
    return None


def supported_layer_types() -> list[str]:
    return [_name(t) for t, _ in _ADAPTERS]


def register_norm_type(norm_type: LayerType) -> None:
    """Give every layer of `norm_type` a per-task copy of its parameters and buffers.

    Example:
        >>> import torch
        >>> from halrp_adapt import register_norm_type
        >>> class MyNorm(torch.nn.Module):
        ...     pass
        >>> register_norm_type(MyNorm)
    """
    if not (isinstance(norm_type, str) or isinstance(norm_type, type)):
        raise TypeError(f"`norm_type` must be a class or a dotted path, got {norm_type!r}.")
    if norm_type not in _NORMS:
        _NORMS.append(norm_type)


def is_norm(module: nn.Module) -> bool:
    """True for normalisation layers that carry parameters or running statistics.

    Besides the registered types, any leaf module whose class name ends in ``Norm`` (e.g.
    transformers' ``T5LayerNorm`` or ``LlamaRMSNorm``) counts.
    """
    if not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()):
        return False
    for norm_type in _NORMS:
        resolved = _resolve(norm_type)
        if resolved is not None and isinstance(module, resolved):
            return True
    is_leaf = not any(True for _ in module.children())
    return is_leaf and type(module).__name__.lower().endswith("norm")
