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

from ._version import __version__
from .adapters.layers import HalrpConv1D, HalrpConv2d, HalrpLayer, HalrpLinear
from .adapters.registry import register_layer_type, register_norm_type, supported_layer_types
from .config import HalrpConfig, HalrpType
from .handle.accounting import HalrpReport, TaskStats
from .handle.attach import attach
from .handle.loading import load
from .handle.model import HalrpModel
from .interop.suggest import suggest_lora_config
from .interop.tuner import HalrpTuner, register_with_peft
from .method.losses import default_loss

register_with_peft()

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
