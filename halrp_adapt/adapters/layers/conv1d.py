"""HALRP adapter for transformers' `Conv1D` (GPT-2 style: weight stored in x out)."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import HalrpLayer
from .linear import dense_gradient_norm2, rows_outer_grads


class HalrpConv1D(HalrpLayer):
    """Like `HalrpLinear`, with the base weight transposed: `y = ((x * s) @ W0) * r + ...`."""

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    def canonical(self, weight: Tensor) -> Tensor:
        return weight.t().unsqueeze(-1)

    def from_canonical(self, weight: Tensor) -> Tensor:
        return weight.squeeze(-1).t().contiguous()

    def forward_with_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        y = torch.matmul(x, weight)
        return y if bias is None else y + bias

    def scaled_forward(
        self, x: Tensor, r: Tensor | None, s: Tensor | None, bias: Tensor | None = None
    ) -> Tensor:
        y = torch.matmul(x if s is None else x * s, self.weight)
        if r is None:
            return y if bias is None else y + bias
        return y * r if bias is None else torch.addcmul(bias, y, r)

    def low_rank_inner(self, x: Tensor, A: Tensor) -> Tensor:
        return torch.matmul(x, A.t())

    def low_rank_outer(self, z: Tensor, B: Tensor) -> Tensor:
        return torch.matmul(z, B.t())

    def low_rank_outer_grads(self, grad: Tensor, z: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        return rows_outer_grads(grad, z, B)

    def low_rank_inner_grads(self, grad_z: Tensor, x: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        return rows_outer_grads(grad_z, x, A)  # z = x A^T is the same product as z B^T

    def weight_gradient_norm2(self, x: Tensor, grad_output: Tensor) -> Tensor:
        return dense_gradient_norm2(x, grad_output)

    def base_product(self, h: Tensor, weight: Tensor | None = None) -> Tensor:
        return torch.matmul(h, self.weight if weight is None else weight)

    def base_product_input_grad(
        self, grad: Tensor, input_shape: torch.Size, weight: Tensor | None = None
    ) -> Tensor:
        return torch.matmul(grad, (self.weight if weight is None else weight).t())
