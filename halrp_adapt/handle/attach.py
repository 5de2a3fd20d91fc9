"""`attach`: wrap a model's layers with HALRP task adapters and return the handle."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import HalrpConfig
from .model import HalrpModel


def attach(
    model: nn.Module,
    budget: float = 0.05,
    *,
    config: HalrpConfig | None = None,
    autocast_adapter_dtype: bool = True,
    **options: Any,
) -> HalrpModel:
    """Attach HALRP task adapters to `model` (in place) and return the handle.

    `budget` bounds what each task may add, as a share of the backbone's parameters.
    `options` are the fields of `HalrpConfig` (or pass a whole `config`, which is copied,
    never changed). `autocast_adapter_dtype` (PEFT's option of the same name) gives the tasks
    of a float16 / bfloat16 backbone float32 tensors, so that small updates of the scales
    are not rounded away; False keeps the backbone's dtype.

    Example:
        >>> import timm, halrp_adapt
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
        ...                         patch_size=8, depth=2)
        >>> cl = halrp_adapt.attach(vit, budget=0.05)
        >>> cl.add_task("cifar_0", num_classes=10)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}.")
    if config is not None:
        if options:
            raise TypeError("pass either `config` or keyword options, not both.")
        if not isinstance(config, HalrpConfig):
            raise TypeError(f"`config` must be a HalrpConfig, got {type(config).__name__}.")
        if budget != config.budget and budget != 0.05:
            raise TypeError("`budget` is set in `config`; do not pass both.")
    else:
        config = HalrpConfig.from_options(budget=budget, **options)
    if not isinstance(autocast_adapter_dtype, bool):
        raise TypeError(
            f"`autocast_adapter_dtype` must be True or False, got {autocast_adapter_dtype!r}."
        )
    return HalrpModel(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
