"""HALRP adapter for `torch.nn.Linear` (and any layer computing `x @ W.T + b` with W out x in)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import HalrpLayer


class HalrpLinear(HalrpLayer):
    """`y = ((x * s) @ W0.T) * r + bias + (x @ A.T) @ B.T` for the active task.

    Example:
        >>> import torch
        >>> layer = HalrpLinear(torch.nn.Linear(4, 3))
        >>> layer.add_task("t0"); layer.set_active_task("t0")
        >>> layer(torch.ones(2, 4)).shape
        torch.Size([2, 3])
    """

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    def canonical(self, weight: Tensor) -> Tensor:
        return weight.unsqueeze(-1)

    def from_canonical(self, weight: Tensor) -> Tensor:
        return weight.squeeze(-1)

    def forward_with_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, weight, bias)

    def scaled_forward(
        self, x: Tensor, r: Tensor | None, s: Tensor | None, bias: Tensor | None = None
    ) -> Tensor:
        h = x if s is None else x * s
        if r is None:
            return F.linear(h, self.weight, bias)
        y = F.linear(h, self.weight)
        return y * r if bias is None else torch.addcmul(bias, y, r)

    def low_rank_inner(self, x: Tensor, A: Tensor) -> Tensor:
        return F.linear(x, A)

    def low_rank_outer(self, z: Tensor, B: Tensor) -> Tensor:
        return F.linear(z, B)

    def low_rank_outer_grads(self, grad: Tensor, z: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        return rows_outer_grads(grad, z, B)

    def low_rank_inner_grads(self, grad_z: Tensor, x: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        return rows_outer_grads(grad_z, x, A)  # z = x A^T is the same product as z B^T

    def base_product(self, h: Tensor, weight: Tensor | None = None) -> Tensor:
        return F.linear(h, self.weight if weight is None else weight)

    def base_product_input_grad(
        self, grad: Tensor, input_shape: torch.Size, weight: Tensor | None = None
    ) -> Tensor:
        return torch.matmul(grad, self.weight if weight is None else weight)

    def weight_gradient_norm2(self, x: Tensor, grad_output: Tensor) -> Tensor:
        return dense_gradient_norm2(x, grad_output)


def dense_gradient_norm2(x: Tensor, grad_output: Tensor) -> Tensor:
    """`||G^T X||_F^2` for rows X (.., in) and G (.., out): the squared norm of a linear map's
    weight gradient (either layout), through the smaller of the (out, in) gradient and the two
    (rows, rows) Gram matrices."""
    xs = x.reshape(-1, x.shape[-1]).float()
    gs = grad_output.reshape(-1, grad_output.shape[-1]).float()
    rows = xs.shape[0]
    if rows * rows < xs.shape[1] * gs.shape[1]:
        return ((gs @ gs.T) * (xs @ xs.T)).sum()
    return (gs.T @ xs).pow(2).sum()


def rows_outer_grads(grad: Tensor, z: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of `z @ B.T` for rows z (.., k) and B (out, k), given the output's `grad`."""
    return torch.matmul(grad, B), grad.reshape(-1, grad.shape[-1]).t() @ z.reshape(-1, z.shape[-1])
