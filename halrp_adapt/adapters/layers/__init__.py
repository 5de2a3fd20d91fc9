"""Adapter layers: each wraps one frozen base layer type."""

from .base import HalrpLayer
from .conv1d import HalrpConv1D
from .conv2d import HalrpConv2d
from .linear import HalrpLinear

__all__ = ["HalrpLayer", "HalrpLinear", "HalrpConv2d", "HalrpConv1D"]
