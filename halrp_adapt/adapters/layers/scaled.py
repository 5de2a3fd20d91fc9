"""A task's training forward, `r * op(s * x) + bias + B A x`, as one autograd step that keeps
no activation of its own.

Plain autograd keeps, per adapted layer, the input `x` (for the gradient of `s`), the scaled
input `s * x` (the base product saves its input) and the product `op(s * x)` (for the gradient
of `r`). The first is usually the tensor the previous layer kept already; the other two are
new, so a task's training step held about 1.5x LoRA's activations (saved-tensor bytes on
EfficientNet-Lite0 at 224 px and ViT-S/16). `AdaptedForward` keeps `x` and the output it
returns, which the next layer usually keeps anyway (a norm, an activation): in the backward,
`op(s * x) = (out - bias - B A x) / r`, the input side's gradient is `s * op^T(r * g)` from W0
alone, and the factors' gradients come from recomputing the rank-k path. If something changed
the output in place meanwhile (an in-place activation), or a scale is near 0, `op(s * x)` is
recomputed from `x` instead: the same gradient, at the cost of one product.

`op` is the frozen base layer's product without its bias (`HalrpLayer.base_product`), `op^T`
its input gradient (`HalrpLayer.base_product_input_grad`); channels lie on the last dimension
(Linear, Conv1D) or the second (Conv2d), as `HalrpLayer.channel_view` says.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .base import HalrpLayer

# Below this, dividing the output by a scale to recover the product loses too much precision.
SMALLEST_SCALE = 1e-2


class AdaptedForward(torch.autograd.Function):
    """`r * op(s * x) + bias + low_rank(x, A, B)`, keeping `x` and an alias of the output."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        r: Tensor | None,
        s: Tensor | None,
        bias: Tensor | None,
        A: Tensor | None,
        B: Tensor | None,
        layer: HalrpLayer,
    ) -> Tensor:
        h = x if s is None else x * layer.channel_view(s)
        out = layer.base_product(h)
        if r is not None:
            out = out * layer.channel_view(r)
        if bias is not None:
            out = out + layer.channel_view(bias)
        if A is not None and B is not None:
            out = out + layer.low_rank_forward(x, A, B)
        ctx.layer = layer
        ctx.input_shape = h.shape
        ctx.save_for_backward(x, r, s, bias, A, B)
        # A detached alias shares the output's storage and version counter, not its graph:
        # no copy is kept, and an in-place change afterwards is seen in the backward.
        ctx.out, ctx.version = out.detach(), out._version
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, r, s, bias, A, B = ctx.saved_tensors
        layer: HalrpLayer = ctx.layer
        needs_x, needs_r, needs_s, needs_bias, needs_a, needs_b, _ = ctx.needs_input_grad
        channels = layer.channel_dims(grad.dim())
        grad_x = grad_r = grad_s = grad_a = grad_b = None
        low_rank = None
        if A is not None and B is not None:
            with torch.enable_grad():
                xd = x.detach().requires_grad_(needs_x)
                ad, bd = A.detach().requires_grad_(needs_a), B.detach().requires_grad_(needs_b)
                z = layer.low_rank_forward(xd, ad, bd)
                wanted = [t for t, need in ((xd, needs_x), (ad, needs_a), (bd, needs_b)) if need]
                found = iter(torch.autograd.grad(z, wanted, grad) if wanted else ())
                grad_x = next(found) if needs_x else None
                grad_a = next(found) if needs_a else None
                grad_b = next(found) if needs_b else None
            low_rank = z.detach()
        grad_bias = grad.sum(channels) if needs_bias else None
        if needs_r:
            grad_r = (grad * _product(ctx, layer, x, r, s, bias, low_rank)).sum(channels)
        if needs_x or needs_s:
            gh = layer.base_product_input_grad(
                grad if r is None else grad * layer.channel_view(r), ctx.input_shape
            )
            if needs_s:
                grad_s = (gh * x).sum(layer.channel_dims(x.dim()))
            if needs_x:
                through = gh if s is None else gh * layer.channel_view(s)
                grad_x = through if grad_x is None else grad_x + through
        return grad_x, grad_r, grad_s, grad_bias, grad_a, grad_b, None


def _product(
    ctx: Any,
    layer: HalrpLayer,
    x: Tensor,
    r: Tensor,
    s: Tensor | None,
    bias: Tensor | None,
    low_rank: Tensor | None,
) -> Tensor:
    """`op(s * x)`: from the output when it is as the forward left it, else recomputed."""
    out = ctx.out
    if out._version == ctx.version and bool(r.abs().min() >= SMALLEST_SCALE):
        y = out if bias is None else out - layer.channel_view(bias)
        if low_rank is not None:
            y = y - low_rank
        return y / layer.channel_view(r)
    return layer.base_product(x if s is None else x * layer.channel_view(s))


def adapted_forward(
    layer: HalrpLayer,
    x: Tensor,
    r: Tensor | None,
    s: Tensor | None,
    bias: Tensor | None,
    A: Tensor | None,
    B: Tensor | None,
) -> Tensor:
    """A task's forward through `AdaptedForward` when anything needs a gradient (and the
    layer allows it), else through the layer's own fused ops. W0 is a constant of
    `AdaptedForward`: a task that trains the backbone itself (`train_base`) takes the plain path."""
    tensors = (x, r, s, bias, A, B)
    if (
        layer.lean_backward
        and not layer.weight.requires_grad
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in tensors)
    ):
        return AdaptedForward.apply(x, r, s, bias, A, B, layer)
    y = layer.scaled_forward(x, r, s, bias)
    return y if A is None or B is None else y + layer.low_rank_forward(x, A, B)
