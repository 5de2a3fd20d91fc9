"""halrp_adapt: HALRP task adapters for any pretrained PyTorch network.

Example:
    >>> import torch, halrp_adapt
    >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
    ...                           torch.nn.Linear(16, 4))
    >>> cl = halrp_adapt.attach(net, budget=0.5)
    >>> cl.add_task("a", num_classes=2)
    >>> stats = cl.end_task()
    >>> stats.growth <= 0.5
    True
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .accounting import HalrpReport, TaskStats
from .config import HalrpConfig, HalrpType
from .layers import HalrpConv1D, HalrpConv2d, HalrpLayer, HalrpLinear
from .loading import load
from .losses import default_loss
from .model import HalrpModel
from .registry import register_layer_type, register_norm_type, supported_layer_types
from .suggest import suggest_lora_config
from .tuner import HalrpTuner, register_with_peft

register_with_peft()

__version__ = "0.1.0"


def attach(
    model: nn.Module, budget: float = 0.05, *, config: HalrpConfig | None = None, **options: Any
) -> HalrpModel:
    """Attach HALRP task adapters to `model` (in place) and return the handle.

    `budget` bounds what each task may add, as a share of the backbone's parameters.
    `options` are the fields of `HalrpConfig` (or pass a whole `config`).

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
    return HalrpModel(model, config)


__all__ = [
    "attach",
    "load",
    "HalrpConfig",
    "HalrpType",
    "HalrpTuner",
    "HalrpModel",
    "HalrpReport",
    "TaskStats",
    "HalrpLayer",
    "HalrpLinear",
    "HalrpConv2d",
    "HalrpConv1D",
    "register_layer_type",
    "register_norm_type",
    "supported_layer_types",
    "default_loss",
    "suggest_lora_config",
    "__version__",
]
