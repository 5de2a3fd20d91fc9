"""`HalrpLayer`: wraps a frozen weight layer and holds every task's r, s, A, B and bias.

For task t the layer computes `W_t = diag(r_t) W0 diag(s_t) + B_t A_t` without forming W_t:
the scaled path runs the base weight on `x * s` and multiplies the output by `r`; the low-rank
path runs `A` then `B`. Subclasses say how their weight is laid out and how the two paths run.

The math works on a *canonical* weight of shape (out, in_per_group, kernel_area): Linear is
(m, n, 1), a conv kernel (m, n/g, kh*kw), transformers' Conv1D (stored in x out) is transposed.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import Tensor, nn

from ..routing import TaskRouted


class HalrpLayer(TaskRouted):
    """Base class of the adapter layers; see the module docstring for the math."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.halrp_r = nn.ParameterDict()
        self.halrp_s = nn.ParameterDict()
        self.halrp_A = nn.ParameterDict()
        self.halrp_B = nn.ParameterDict()
        self.halrp_bias = nn.ParameterDict()

    @classmethod
    def handles_forward_of(cls, module: nn.Module) -> bool:
        """Whether this adapter reproduces `module`'s forward although its class overrides the
        registered type's (e.g. a conv that pads its input itself)."""
        return False

    # ---- geometry: subclasses override -------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def groups(self) -> int:
        return 1

    @property
    def kernel_area(self) -> int:
        return 1

    @property
    def supports_low_rank(self) -> bool:
        """Grouped convs keep only the scales: a dense B A would not fit their kernel."""
        return self.groups == 1

    def canonical(self, weight: Tensor) -> Tensor:
        """The layer's weight as (out, in_per_group, kernel_area)."""
        raise NotImplementedError

    def from_canonical(self, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def scaled_forward(self, x: Tensor, r: Optional[Tensor], s: Optional[Tensor]) -> Tensor:
        """`x` through diag(r) W0 diag(s), without bias."""
        raise NotImplementedError

    def low_rank_forward(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """`x` through B A (spread over the kernel for convs)."""
        raise NotImplementedError

    def channel_view(self, v: Tensor) -> Tensor:
        """View a per-output-channel vector so it broadcasts over this layer's output."""
        return v

    # ---- per-task state ----------------------------------------------------------------------
    def task_names(self) -> list[str]:
        return list(self.halrp_bias.keys() | self.halrp_r.keys())

    def add_task(self, task: str, scales: bool = True) -> None:
        """Give `task` identity scales (if `scales`) and a copy of the base bias; no factors."""
        w = self.weight
        if scales:
            self.halrp_r[task] = nn.Parameter(torch.ones(self.out_features, device=w.device,
                                                         dtype=w.dtype))
            self.halrp_s[task] = nn.Parameter(torch.ones(self.in_features, device=w.device,
                                                         dtype=w.dtype))
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None:
            self.halrp_bias[task] = nn.Parameter(bias.detach().clone())

    def set_scales(self, task: str, r: Tensor, s: Tensor) -> None:
        w = self.weight
        self.halrp_r[task] = nn.Parameter(r.detach().to(w.device, w.dtype).clone())
        self.halrp_s[task] = nn.Parameter(s.detach().to(w.device, w.dtype).clone())

    def set_low_rank(self, task: str, A: Tensor, B: Tensor) -> None:
        """Set the task's factors: A is (k, in), B is (out, k)."""
        if not self.supports_low_rank:
            raise ValueError(f"{type(self).__name__} with groups={self.groups} has no low-rank "
                             "path; only its scales are adapted.")
        if A.shape[1] != self.in_features or B.shape[0] != self.out_features \
                or A.shape[0] != B.shape[1]:
            raise ValueError(f"factor shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a "
                             f"layer of in={self.in_features}, out={self.out_features}.")
        w = self.weight
        self.halrp_A[task] = nn.Parameter(A.detach().to(w.device, w.dtype).clone())
        self.halrp_B[task] = nn.Parameter(B.detach().to(w.device, w.dtype).clone())

    def set_bias(self, task: str, bias: Tensor) -> None:
        if task in self.halrp_bias:
            with torch.no_grad():
                self.halrp_bias[task].copy_(bias)

    def rank(self, task: str) -> int:
        return self.halrp_A[task].shape[0] if task in self.halrp_A else 0

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [d[task] for d in self._task_dicts() if task in d]

    def remove_task(self, task: str) -> None:
        for d in self._task_dicts():
            if task in d:
                del d[task]
        self.frozen_tasks.discard(task)
        if self.active_task == task:
            self.active_task = None

    def _task_dicts(self) -> tuple[nn.ParameterDict, ...]:
        return (self.halrp_r, self.halrp_s, self.halrp_A, self.halrp_B, self.halrp_bias)

    # ---- forward and merge -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        task = self.active_task
        if task is None:
            return self.base_layer(x)
        return self.task_forward(x, task)

    def task_forward(self, x: Tensor, task: str) -> Tensor:
        r = self.halrp_r[task] if task in self.halrp_r else None
        s = self.halrp_s[task] if task in self.halrp_s else None
        y = self.scaled_forward(x, r, s)
        if task in self.halrp_bias:
            y = y + self.channel_view(self.halrp_bias[task])
        if task in self.halrp_A:
            y = y + self.low_rank_forward(x, self.halrp_A[task], self.halrp_B[task])
        return y

    def expand_input_scale(self, s: Tensor) -> Tensor:
        """s (in,) as an (out, in_per_group) grid matching the canonical weight."""
        g = self.groups
        per_group = s.numel() // g
        return s.view(g, 1, per_group).expand(g, self.out_features // g, per_group).reshape(
            self.out_features, per_group)

    def merged_weight(self, task: str) -> Tensor:
        """The task's full weight W_t in the base layer's layout."""
        wc = self.canonical(self.weight)
        if task in self.halrp_r:
            wc = wc * self.halrp_r[task][:, None, None]
            wc = wc * self.expand_input_scale(self.halrp_s[task])[:, :, None]
        if task in self.halrp_A:
            wc = wc + (self.halrp_B[task] @ self.halrp_A[task])[:, :, None]
        return self.from_canonical(wc)

    @torch.no_grad()
    def merged_layer(self, task: str) -> nn.Module:
        """A plain copy of the base layer carrying the task's merged weight and bias."""
        weight = nn.Parameter(self.merged_weight(task).detach().clone())
        memo = {id(self.base_layer.weight): weight}
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None and task in self.halrp_bias:
            memo[id(bias)] = nn.Parameter(self.halrp_bias[task].detach().clone())
        return copy.deepcopy(self.base_layer, memo)

    def extra_repr(self) -> str:
        ranks = {t: self.rank(t) for t in self.task_names()}
        return f"tasks={ranks}"
