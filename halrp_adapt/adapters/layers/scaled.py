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
recomputed from `x` instead: the same gradient, at the cost of one product; so it is for a
16-bit output (autocast, a bf16 task), where the subtraction would lose too much.

Nothing activation-sized is made that the plain step does not make too: the scales go into
W0 instead of the activation where the weight is the smaller (`op(x; r W0 s)`, one weight-sized
tensor), the low-rank path's factor gradients come from its rank-k middle, and the per-channel
sums for `r` and `s` run a slice of the batch at a time.

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
# Reductions over a large activation run a slice of at most this many bytes at a time, so the
# elementwise products they need stay small; small activations go whole (fewer, larger ops).
SLICE_BYTES = 8 * 2**20


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
        if (r is not None or s is not None) and _folds(layer, x):
            out = layer.base_product(x, layer.scaled_weight(r, s))
        else:
            out = layer.base_product(x if s is None else x * layer.channel_view(s))
            if r is not None:
                out.mul_(layer.channel_view(r))
        if bias is not None:
            out.add_(layer.channel_view(bias))
        z = None  # the low-rank path's rank-k middle: small, kept for the factors' gradients
        if A is not None and B is not None:
            z = layer.low_rank_inner(x, A)
            out.add_(layer.low_rank_outer(z, B))
        ctx.layer = layer
        # The backward runs under the forward's autocast, as `torch.amp.custom_bwd` would: its
        # products then meet bf16/fp16 gradients in the same dtypes as the forward's did.
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        ctx.autocast = (device, torch.get_autocast_dtype(device)) if autocast else None
        ctx.save_for_backward(x, r, s, bias, A, B, z)
        # A detached alias shares the output's storage and version counter, not its graph:
        # no copy is kept, and an in-place change afterwards is seen in the backward.
        ctx.out, ctx.version = out.detach(), out._version
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        if ctx.autocast is None:
            return AdaptedForward._backward(ctx, grad)
        device, dtype = ctx.autocast
        with torch.autocast(device, dtype=dtype):
            return AdaptedForward._backward(ctx, grad)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, r, s, bias, A, B, z = ctx.saved_tensors
        layer: HalrpLayer = ctx.layer
        # Attributes of ctx live as long as the graph, which a training loop's `loss` holds
        # until the next step's forward is done: let go of the output now. A second backward
        # through a retained graph recomputes the product instead.
        out, ctx.out = ctx.out, None
        needs_x, needs_r, needs_s, needs_bias, needs_a, needs_b, _ = ctx.needs_input_grad
        grad_x = grad_r = grad_s = grad_bias = grad_a = grad_b = None
        if A is not None and B is not None:
            grad_z, grad_b = layer.low_rank_outer_grads(grad, z, B)
            grad_b = grad_b if needs_b else None
            if needs_x or needs_a:
                grad_x, grad_a = _low_rank_inner_grads(layer, grad_z, x, A, needs_x, needs_a)
        if needs_bias:
            grad_bias = grad.sum(layer.channel_dims(grad.dim()))
        if needs_r:
            assert r is not None  # autograd asks only for inputs that need a gradient
            grad_r = _r_gradient(out, ctx.version, layer, grad, x, r, s, bias, z, B)
        if needs_x or needs_s:
            if r is None:
                gh = layer.base_product_input_grad(grad, x.shape)
            elif _folds(layer, grad):
                gh = layer.base_product_input_grad(grad, x.shape, layer.scaled_weight(r, None))
            else:
                gh = layer.base_product_input_grad(grad * layer.channel_view(r), x.shape)
            if needs_s:
                grad_s = _channel_dot(layer, gh, x)
            if needs_x:
                if s is not None:
                    gh.mul_(layer.channel_view(s))
                grad_x = gh if grad_x is None else gh.add_(grad_x)
        return grad_x, grad_r, grad_s, grad_bias, grad_a, grad_b, None


def _low_rank_inner_grads(
    layer: HalrpLayer, grad_z: Tensor, x: Tensor, A: Tensor, needs_x: bool, needs_a: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of `low_rank_inner(x, A)` for `x` and `A`: the layer's own where it has
    them, else autograd's through the recomputed middle."""
    found = layer.low_rank_inner_grads(grad_z, x, A)
    if found is not None:
        grad_x, grad_a = found
        return (grad_x if needs_x else None), (grad_a if needs_a else None)
    with torch.enable_grad():
        xd = x.detach().requires_grad_(needs_x)
        ad = A.detach().requires_grad_(needs_a)
        wanted = [t for t, need in ((xd, needs_x), (ad, needs_a)) if need]
        grads = iter(torch.autograd.grad(layer.low_rank_inner(xd, ad), wanted, grad_z))
    return (next(grads) if needs_x else None), (next(grads) if needs_a else None)


def _folds(layer: HalrpLayer, activation: Tensor) -> bool:
    """Whether to scale W0 (a weight-sized tensor) rather than the activation."""
    return layer.weight.numel() <= activation.numel()


def _flat(layer: HalrpLayer, t: Tensor) -> Tensor:
    """`t` with the dimension to slice first: rows of channels for channels-last layers."""
    if layer.channel_dims(t.dim()) == tuple(range(t.dim() - 1)):
        return t.reshape(-1, t.shape[-1])
    return t


def _slices(t: Tensor) -> list[slice]:
    """Slices of `t`'s first dimension of at most `SLICE_BYTES` each (at least one row)."""
    n = t.shape[0]
    pieces = -(-t.numel() * t.element_size() // SLICE_BYTES)
    step = max(1, -(-n // max(1, pieces)))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def _channel_dot(layer: HalrpLayer, a: Tensor, b: Tensor) -> Tensor:
    """Per channel, the sum of `a * b` over everything else, a slice at a time."""
    a, b = _flat(layer, a), _flat(layer, b)
    dims = layer.channel_dims(a.dim())
    return torch.stack([(a[sl] * b[sl]).sum(dims) for sl in _slices(a)]).sum(0)


def _r_gradient(
    out: Tensor | None,
    version: int,
    layer: HalrpLayer,
    grad: Tensor,
    x: Tensor,
    r: Tensor,
    s: Tensor | None,
    bias: Tensor | None,
    z: Tensor | None,
    B: Tensor | None,
) -> Tensor:
    """Per output channel, the sum of `grad * op(s * x)`: `op(s * x)` from the output when it
    is as the forward left it, `(out - bias - B z) / r`, else recomputed; a slice at a time."""
    # Recovering the product by subtraction loses what a 16-bit output (autocast, a bf16 task)
    # rounded away, relative to the whole output: recompute it there instead.
    recover = (
        out is not None
        and out._version == version
        and out.dtype == r.dtype
        and out.element_size() >= 4
        and bool(r.abs().min() >= SMALLEST_SCALE)
    )
    g, xf = _flat(layer, grad), _flat(layer, x)
    o = _flat(layer, out) if out is not None and recover else None
    zf = None if z is None else _flat(layer, z)
    dims = layer.channel_dims(g.dim())
    weight = None if recover or s is None or not _folds(layer, x) else layer.scaled_weight(None, s)
    parts = []
    for sl in _slices(g):
        if o is not None:
            y = o[sl] - layer.channel_view(bias) if bias is not None else o[sl].clone()
            if zf is not None and B is not None:
                y.sub_(layer.low_rank_outer(zf[sl], B))
        elif weight is not None:
            y = layer.base_product(xf[sl], weight)
        else:
            y = layer.base_product(xf[sl] if s is None else xf[sl] * layer.channel_view(s))
        parts.append(y.mul_(g[sl]).sum(dims))
    total = torch.stack(parts).sum(0)
    return total / r if recover else total


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
