"""HALRP adapter for `torch.nn.Conv2d`: any stride, padding, dilation and padding mode.

The low-rank delta is spatially uniform, `delta[o, i, :, :] = (B A)[o, i]`, so it runs cheaply
as a 1x1 conv with A (in -> k channels), a sum over each kernel window (a depthwise conv with a
kernel of ones, using the layer's own stride, padding and dilation), then a 1x1 conv with B.
Grouped and depthwise convs keep the scales only (`supports_low_rank` is False): a dense B A
would mix channels the base kernel never connects.
"""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor

from .base import HalrpLayer


class HalrpConv2d(HalrpLayer):
    """`y = conv(x * s, W0) * r + bias + window_sum(x A^T) B^T` for the active task."""

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def groups(self) -> int:
        return self.base_layer.groups

    @property
    def kernel_area(self) -> int:
        return self.weight.shape[2] * self.weight.shape[3]

    def canonical(self, weight: Tensor) -> Tensor:
        return weight.reshape(weight.shape[0], weight.shape[1], -1)

    def from_canonical(self, weight: Tensor) -> Tensor:
        return weight.reshape(self.weight.shape)

    def channel_view(self, v: Tensor) -> Tensor:
        return v.view(-1, 1, 1)

    def scaled_forward(self, x: Tensor, r: Optional[Tensor], s: Optional[Tensor]) -> Tensor:
        # Scaling input channels commutes with zero, reflect, replicate and circular padding.
        h = x if s is None else x * s.view(-1, 1, 1)
        y = self.base_layer._conv_forward(h, self.weight, None)
        return y if r is None else y * r.view(-1, 1, 1)

    def low_rank_forward(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        conv = self.base_layer
        k = A.shape[0]
        z = F.conv2d(x, A[:, :, None, None])
        ones = z.new_ones(k, 1, *conv.kernel_size)
        if conv.padding_mode != "zeros":
            z = F.pad(z, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            z = F.conv2d(z, ones, None, conv.stride, 0, conv.dilation, groups=k)
        else:
            z = F.conv2d(z, ones, None, conv.stride, conv.padding, conv.dilation, groups=k)
        return F.conv2d(z, B[:, :, None, None])
