"""HALRP adapter for `torch.nn.Conv2d`: any stride, padding, dilation and padding mode.

The low-rank delta is spatially uniform, `delta[o, i, :, :] = (B A)[o, i]`, so it runs cheaply
as a 1x1 conv with A (in -> k channels), a sum over each kernel window (a depthwise conv with a
kernel of ones, using the layer's own stride, padding and dilation), then a 1x1 conv with B.
Grouped and depthwise convs keep the scales only (`supports_low_rank` is False): a dense B A
would mix channels the base kernel never connects.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.grad import conv2d_input, conv2d_weight

from ..routing import RowRouting
from .base import HalrpLayer


def _timm_pad_same(conv: nn.Conv2d, x: Tensor) -> Tensor:
    from timm.layers.padding import pad_same

    # timm annotates these as List[int] but indexes them only; its own Conv2dSame passes tuples.
    return pad_same(x, conv.kernel_size, conv.stride, conv.dilation)  # type: ignore[arg-type]


# Conv2d subclasses that pad their input in forward (TensorFlow-style "SAME"): how to pad.
# Zero padding commutes with both paths, so padding first and convolving with padding 0 is exact.
DYNAMIC_PADDING: dict[str, Callable[[nn.Conv2d, Tensor], Tensor]] = {
    "timm.layers.conv2d_same.Conv2dSame": _timm_pad_same,
    "timm.layers.conv2d_same.Conv2dSameExport": _timm_pad_same,
}


def _padder(conv: nn.Module) -> Callable[[nn.Conv2d, Tensor], Tensor] | None:
    cls = type(conv)
    return DYNAMIC_PADDING.get(f"{cls.__module__}.{cls.__qualname__}")


class HalrpConv2d(HalrpLayer):
    """`y = conv(x * s, W0) * r + bias + window_sum(x A^T) B^T` for the active task."""

    base_layer: nn.Conv2d

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.pad = _padder(base_layer)  # looked up once: every forward asks
        # The lean backward needs the product's input gradient as a transposed conv: zero
        # padding given as numbers (or padded beforehand), not "same" nor reflect/replicate.
        conv = self.base_layer
        self.lean_backward = self.pad is not None or (
            conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
        )

    @classmethod
    def handles_forward_of(cls, module: nn.Module) -> bool:
        return _padder(module) is not None

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

    def row_view(self, v: Tensor, ndim: int) -> Tensor:
        return v.view(*v.shape, 1, 1)

    def rows_forward(self, x: Tensor, routing: RowRouting) -> Tensor:
        pad = self.pad
        return super().rows_forward(x if pad is None else pad(self.base_layer, x), routing)

    def task_forward(self, x: Tensor, task: str) -> Tensor:
        pad = self.pad
        return super().task_forward(x if pad is None else pad(self.base_layer, x), task)

    def forward_with_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        conv = self.base_layer
        if self.pad is not None:  # x is already padded
            return F.conv2d(x, weight, bias, conv.stride, 0, conv.dilation, conv.groups)
        return conv._conv_forward(x, weight, bias)

    def scaled_forward(
        self, x: Tensor, r: Tensor | None, s: Tensor | None, bias: Tensor | None = None
    ) -> Tensor:
        # Scaling input channels commutes with zero, reflect, replicate and circular padding.
        conv = self.base_layer
        if s is not None and self.weight.shape[1] == 1:
            # One input channel per output (depthwise): conv(x * s) = conv(x) * s[its input],
            # so s joins r on the output and the scaled input is never made (or kept).
            per_output = s.repeat_interleave(self.out_features // self.groups)
            r, s = (per_output if r is None else r * per_output), None
        h = x if s is None else x * s.view(-1, 1, 1)
        fused = bias if r is None else None
        if self.pad is not None:  # x is already padded
            y = F.conv2d(h, self.weight, fused, conv.stride, 0, conv.dilation, conv.groups)
        else:
            y = conv._conv_forward(h, self.weight, fused)
        if r is None:
            return y
        if bias is None:
            return y * r.view(-1, 1, 1)
        return torch.addcmul(bias.view(-1, 1, 1), y, r.view(-1, 1, 1))

    def low_rank_inner(self, x: Tensor, A: Tensor) -> Tensor:
        conv = self.base_layer
        k = A.shape[0]
        z = F.conv2d(x, A[:, :, None, None])
        if self._pointwise():  # the window sum is the identity, strided
            if conv.stride != (1, 1):
                z = z[:, :, :: conv.stride[0], :: conv.stride[1]]
            return z
        ones = z.new_ones(k, 1, *conv.kernel_size)
        if self.pad is not None:  # x is already padded
            return F.conv2d(z, ones, None, conv.stride, 0, conv.dilation, groups=k)
        if conv.padding_mode != "zeros":
            z = F.pad(z, conv._reversed_padding_repeated_twice, mode=conv.padding_mode)
            return F.conv2d(z, ones, None, conv.stride, 0, conv.dilation, groups=k)
        return F.conv2d(z, ones, None, conv.stride, conv.padding, conv.dilation, groups=k)

    def _pointwise(self) -> bool:
        """A one-pixel window with no padding: the low-rank path is a strided 1x1 conv."""
        conv = self.base_layer
        return conv.kernel_size == (1, 1) and (
            isinstance(conv.padding, str) or not any(conv.padding) or self.pad is not None
        )

    def low_rank_inner_grads(
        self, grad_z: Tensor, x: Tensor, A: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        if not self._pointwise():
            return None
        sh, sw = self.base_layer.stride
        strided = (sh, sw) != (1, 1)
        seen = x[:, :, ::sh, ::sw] if strided else x
        grad_seen, grad_a = self.low_rank_outer_grads(grad_z, seen, A)  # same 1x1 product
        if not strided:
            return grad_seen, grad_a
        grad_x = x.new_zeros(x.shape)
        grad_x[:, :, ::sh, ::sw] = grad_seen
        return grad_x, grad_a

    def low_rank_outer(self, z: Tensor, B: Tensor) -> Tensor:
        return F.conv2d(z, B[:, :, None, None])

    def low_rank_outer_grads(self, grad: Tensor, z: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        grad_z = F.conv2d(grad, B.t()[:, :, None, None])
        # sum over images of (out, pixels) @ (pixels, k): (images, out, k), never output-sized
        grad_b = torch.bmm(grad.flatten(2), z.flatten(2).transpose(1, 2)).sum(0)
        return grad_z, grad_b

    def weight_gradient_norm2(self, x: Tensor, grad_output: Tensor) -> Tensor:
        conv = self.base_layer
        if self.pad is not None:
            x = self.pad(conv, x)
        elif any(conv._reversed_padding_repeated_twice):
            mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
            x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        grad = conv2d_weight(
            x.float(),
            self.weight.shape,
            grad_output.float(),
            stride=conv.stride,
            padding=0,
            dilation=conv.dilation,
            groups=conv.groups,
        )
        return grad.pow(2).sum()

    def channel_dims(self, ndim: int) -> tuple[int, ...]:
        return (0, *range(2, ndim))

    def base_product(self, h: Tensor, weight: Tensor | None = None) -> Tensor:
        conv = self.base_layer
        w = self.weight if weight is None else weight
        if self.pad is not None:  # h is already padded
            return F.conv2d(h, w, None, conv.stride, 0, conv.dilation, conv.groups)
        return conv._conv_forward(h, w, None)

    def base_product_input_grad(
        self, grad: Tensor, input_shape: torch.Size, weight: Tensor | None = None
    ) -> Tensor:
        conv = self.base_layer
        padding = 0 if self.pad is not None else conv.padding
        return conv2d_input(
            input_shape,
            self.weight if weight is None else weight,
            grad,
            stride=conv.stride,
            padding=padding,  # type: ignore[arg-type]  # numbers here (lean_backward)
            dilation=conv.dilation,
            groups=conv.groups,
        )
