"""`HalrpLayer`: wraps a frozen weight layer and holds every task's r, s, A, B and bias.

For task t the layer computes `W_t = diag(r_t) W0 diag(s_t) + B_t A_t` without forming W_t:
the scaled path runs the base weight on `x * s` and multiplies the output by `r`; the low-rank
path runs `A` then `B`. Subclasses say how their weight is laid out and how the two paths run.

The math works on a *canonical* weight of shape (out, in_per_group, kernel_area): Linear is
(m, n, 1), a conv kernel (m, n/g, kh*kw), transformers' Conv1D (stored in x out) is transposed.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from peft.tuners._buffer_dict import BufferDict
from torch import Tensor, nn

from ...method.sparse import compact, expand, worth_compacting
from ..routing import RowRouting, TaskRouted
from .scaled import adapted_forward


def _own(t: Tensor, like: Tensor, dtype: torch.dtype | None = None) -> nn.Parameter:
    """A contiguous copy of `t` on `like`'s device, in `dtype` (default `like`'s). Contiguous on
    purpose: a factor sliced out of an SVD is strided, and the same values in another memory
    layout take another matmul path, which would break bit-identical outputs after a save/load
    round trip."""
    return nn.Parameter(
        t.detach().to(like.device, dtype or like.dtype).clone(memory_format=torch.contiguous_format)
    )


class HalrpLayer(TaskRouted):
    """Base class of the adapter layers; see the module docstring for the math.

    A factor is held densely (`halrp_A[task]`) while its task trains; once the task is pruned,
    a factor with enough zeros is held compactly (`halrp_A_values[task]` + `halrp_A_mask[task]`,
    see `method/sparse.py`), so that `state_dict()` and the saved files follow the pruned size.
    """

    adapter_layer_names = (
        "halrp_r",
        "halrp_s",
        "halrp_A",
        "halrp_B",
        "halrp_bias",
        "halrp_A_values",
        "halrp_B_values",
    )
    other_param_names = ("halrp_A_mask", "halrp_B_mask")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.halrp_r = nn.ParameterDict()
        self.halrp_s = nn.ParameterDict()
        self.halrp_A = nn.ParameterDict()
        self.halrp_B = nn.ParameterDict()
        self.halrp_bias = nn.ParameterDict()
        self.halrp_A_values = nn.ParameterDict()
        self.halrp_B_values = nn.ParameterDict()
        self.halrp_A_mask = BufferDict(persistent=True)
        self.halrp_B_mask = BufferDict(persistent=True)
        self.task_ranks: dict[str, int] = {}

    @classmethod
    def handles_forward_of(cls, module: nn.Module) -> bool:
        """Whether this adapter reproduces `module`'s forward although its class overrides the
        registered type's (e.g. a conv that pads its input itself)."""
        return False

    # ---- geometry: subclasses override -------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        return cast(Tensor, self.base_layer.weight)

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

    def scaled_forward(
        self, x: Tensor, r: Tensor | None, s: Tensor | None, bias: Tensor | None = None
    ) -> Tensor:
        """`x` through diag(r) W0 diag(s), plus `bias` (fused into the product or the scaling,
        never a pass of its own)."""
        raise NotImplementedError

    def low_rank_forward(self, x: Tensor, A: Tensor, B: Tensor) -> Tensor:
        """`x` through B A (spread over the kernel for convs)."""
        return self.low_rank_outer(self.low_rank_inner(x, A), B)

    def low_rank_inner(self, x: Tensor, A: Tensor) -> Tensor:
        """`x` through A: the rank-k middle of `low_rank_forward` (k channels)."""
        raise NotImplementedError

    def low_rank_outer(self, z: Tensor, B: Tensor) -> Tensor:
        """The rank-k middle `z` through B: the last step of `low_rank_forward`."""
        raise NotImplementedError

    def low_rank_outer_grads(self, grad: Tensor, z: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """The gradients of `low_rank_outer(z, B)` for `z` and `B`, given the output's `grad`,
        without making an output-sized tensor."""
        raise NotImplementedError

    def low_rank_inner_grads(
        self, grad_z: Tensor, x: Tensor, A: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """The gradients of `low_rank_inner(x, A)` for `x` and `A`, given the middle's
        `grad_z`, where the layer has a closed form; None lets autograd do it."""
        return None

    # The frozen product alone, for `scaled.AdaptedForward` (training keeps fewer activations).
    lean_backward = True  # a subclass whose product has no such input gradient sets False

    def base_product(self, h: Tensor, weight: Tensor | None = None) -> Tensor:
        """`h` through W0 (or `weight`, in W0's layout), without the bias."""
        raise NotImplementedError

    def base_product_input_grad(
        self, grad: Tensor, input_shape: torch.Size, weight: Tensor | None = None
    ) -> Tensor:
        """The gradient of `base_product` (with W0 or `weight`) for its input of `input_shape`."""
        raise NotImplementedError

    def scaled_weight(self, r: Tensor | None, s: Tensor | None) -> Tensor:
        """diag(r) W0 diag(s) in W0's layout (either scale may be None), in W0's dtype."""
        wc = self.canonical(self.weight)
        if r is not None and s is not None:
            wc = wc * (r[:, None] * self.expand_input_scale(s))[:, :, None]
        elif r is not None:
            wc = wc * r[:, None, None]
        elif s is not None:
            wc = wc * self.expand_input_scale(s)[:, :, None]
        return self.from_canonical(wc)

    def channel_dims(self, ndim: int) -> tuple[int, ...]:
        """The dimensions of an input or output of `ndim` dimensions that are not channels."""
        return tuple(range(ndim - 1))

    def weight_gradient_norm2(self, x: Tensor, grad_output: Tensor) -> Tensor:
        """`||dL/dW||_F^2` of the layer's effective weight, from its input `x` (as `forward`
        got it) and its output's gradient, in float32; the dense gradient lives only inside
        this call (the low-rank trial's Fisher, `method/fisher.py` `DenseGradientFisher`)."""
        raise NotImplementedError

    def channel_view(self, v: Tensor) -> Tensor:
        """View a per-output-channel vector so it broadcasts over this layer's output."""
        return v

    def row_view(self, v: Tensor, ndim: int) -> Tensor:
        """View per-row channel vectors (rows, channels) so they broadcast over an input or
        output of `ndim` dimensions (channels last here)."""
        return v.view(v.shape[0], *[1] * (ndim - 2), v.shape[1])

    # ---- per-task state ----------------------------------------------------------------------
    def add_task(self, task: str, scales: bool = True, bias: bool = True) -> None:
        """Give `task` identity scales (if `scales`) and a copy of the base bias (if `bias`);
        no factors. A task without its own bias uses the base layer's, frozen."""
        w = self.weight
        if scales:
            self.halrp_r[task] = nn.Parameter(
                torch.ones(self.out_features, device=w.device, dtype=w.dtype)
            )
            self.halrp_s[task] = nn.Parameter(
                torch.ones(self.in_features, device=w.device, dtype=w.dtype)
            )
        base_bias = getattr(self.base_layer, "bias", None)
        if bias and base_bias is not None:
            self.halrp_bias[task] = _own(base_bias, base_bias)

    def task_bias(self, task: str) -> Tensor | None:
        """The bias task `task` runs with: its own copy, else the base layer's (or None)."""
        if task in self.halrp_bias:
            return self.halrp_bias[task]
        return cast(Tensor | None, getattr(self.base_layer, "bias", None))

    def drop_scales(self, task: str) -> None:
        """The task runs with the base weight's own scale (r = s = 1) here and stores none."""
        for container in (self.halrp_r, self.halrp_s):
            if task in container:
                del container[task]

    def drop_bias(self, task: str) -> None:
        """The task runs with the base layer's bias here and stores none."""
        if task in self.halrp_bias:
            del self.halrp_bias[task]

    def task_dtype(self, task: str) -> torch.dtype:
        """The dtype of the task's tensors here: float32 on a half-precision backbone with
        autocast (the handle's `autocast_adapter_dtype`), else the base weight's."""
        for attr in ("halrp_r", "halrp_bias", "halrp_A", "halrp_A_values"):
            container = getattr(self, attr)
            if task in container:
                return container[task].dtype
        return self.weight.dtype

    def set_scales(self, task: str, r: Tensor, s: Tensor) -> None:
        w, dtype = self.weight, self.task_dtype(task)
        self.halrp_r[task] = _own(r, w, dtype)
        self.halrp_s[task] = _own(s, w, dtype)

    def set_low_rank(self, task: str, A: Tensor, B: Tensor) -> None:
        """Set the task's factors: A is (k, in), B is (out, k)."""
        if not self.supports_low_rank:
            raise ValueError(
                f"{type(self).__name__} with groups={self.groups} has no low-rank "
                "path; only its scales are adapted."
            )
        if (
            A.shape[1] != self.in_features
            or B.shape[0] != self.out_features
            or A.shape[0] != B.shape[1]
        ):
            raise ValueError(
                f"factor shapes A{tuple(A.shape)} B{tuple(B.shape)} do not fit a "
                f"layer of in={self.in_features}, out={self.out_features}."
            )
        w, dtype = self.weight, self.task_dtype(task)
        self._drop_factors(task)
        self.halrp_A[task] = _own(A, w, dtype)
        self.halrp_B[task] = _own(B, w, dtype)
        self.task_ranks[task] = A.shape[0]

    def factor_shape(self, task: str, which: str) -> tuple[int, int]:
        k = self.rank(task)
        return (k, self.in_features) if which == "A" else (self.out_features, k)

    def factor(self, task: str, which: str) -> Tensor | None:
        """The task's dense factor `which` ("A" or "B"), expanded if held compactly."""
        dense = getattr(self, f"halrp_{which}")
        if task in dense:
            return dense[task]
        values = getattr(self, f"halrp_{which}_values")
        if task not in values:
            return None
        return expand(
            values[task], getattr(self, f"halrp_{which}_mask")[task], self.factor_shape(task, which)
        )

    @torch.no_grad()
    def compact_factors(self, task: str) -> None:
        """Hold each of the task's factors compactly if that takes fewer bytes."""
        for which in ("A", "B"):
            dense = getattr(self, f"halrp_{which}")
            if task in dense and worth_compacting(dense[task]):
                values, mask = compact(dense[task])
                del dense[task]
                getattr(self, f"halrp_{which}_values")[task] = nn.Parameter(
                    values, requires_grad=False
                )
                getattr(self, f"halrp_{which}_mask")[task] = mask

    def add_factor_skeleton(self, task: str, rank: int, nonzeros: dict[str, int | None]) -> None:
        """Factors of the right shapes, to be filled by `load_state_dict`: dense where
        `nonzeros[which]` is None, compact with that many values otherwise. Until then the task
        is the backbone (B = 0) and, like a new LoRA adapter, trainable (A random)."""
        w = self.weight
        self._drop_factors(task)
        self.task_ranks[task] = rank
        for which in ("A", "B"):
            shape = self.factor_shape(task, which)
            count = nonzeros.get(which)
            if count is None:
                dense = torch.zeros(shape, device=w.device, dtype=w.dtype)
                if which == "A":
                    nn.init.kaiming_uniform_(dense, a=5**0.5)  # nn.Linear's own init
                getattr(self, f"halrp_{which}")[task] = nn.Parameter(dense)
                continue
            getattr(self, f"halrp_{which}_values")[task] = nn.Parameter(
                torch.zeros(count, device=w.device, dtype=w.dtype), requires_grad=False
            )
            getattr(self, f"halrp_{which}_mask")[task] = torch.zeros(
                (shape[0] * shape[1] + 7) // 8, device=w.device, dtype=torch.uint8
            )

    def clear_low_rank(self, task: str) -> None:
        """Remove the task's factors: the layer's change is its scales and bias alone."""
        self._drop_factors(task)

    def _drop_factors(self, task: str) -> None:
        for attr in (
            "halrp_A",
            "halrp_B",
            "halrp_A_values",
            "halrp_B_values",
            "halrp_A_mask",
            "halrp_B_mask",
        ):
            container = getattr(self, attr)
            if task in container:
                del container[task]
        self.task_ranks.pop(task, None)

    def set_bias(self, task: str, bias: Tensor) -> None:
        if task in self.halrp_bias:
            with torch.no_grad():
                self.halrp_bias[task].copy_(bias)

    def rank(self, task: str) -> int:
        return self.task_ranks.get(task, 0)

    def remove_task(self, task: str) -> None:
        super().remove_task(task)
        self.task_ranks.pop(task, None)

    # ---- forward and merge -------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.row_routing is not None:
            return self.rows_forward(x, self.row_routing)
        task = self.routed_task
        if task is None:
            return self.base_layer(x)
        return self.task_forward(x, task)

    def rows_forward(self, x: Tensor, routing: RowRouting) -> Tensor:
        """Each row of `x` through its own task, in one pass of the shared base weight:
        `r[row] * (W0 (s[row] * x)) + bias[row]`, then each task's `B A` on its rows only.
        Rows of no task (None) get the backbone's own output."""
        routing.check(x, type(self).__name__)
        dtype = next(
            (self.task_dtype(t) for t in routing.tasks if t is not None), self.weight.dtype
        )
        xa = x.to(dtype)
        s = self._per_row(self.halrp_s, routing, self.in_features, dtype)
        h = xa if s is None else xa * self.row_view(s, x.dim())
        y = self.scaled_forward(h.to(self.weight.dtype), None, None).to(dtype)
        r = self._per_row(self.halrp_r, routing, self.out_features, dtype)
        if r is not None:
            y = y * self.row_view(r, y.dim())
        bias = self._per_row(self.halrp_bias, routing, self.out_features, dtype, base_bias=True)
        if bias is not None:
            y = y + self.row_view(bias, y.dim())
        for task, rows in zip(routing.tasks, routing.rows, strict=True):
            if task is not None and self.rank(task):
                A, B = self.factor(task, "A"), self.factor(task, "B")
                assert A is not None and B is not None  # a task with a rank holds both factors
                y = y.index_add(0, rows, self.low_rank_forward(xa.index_select(0, rows), A, B))
        return y.to(x.dtype)

    def _per_row(
        self,
        entries: nn.ParameterDict,
        routing: RowRouting,
        size: int,
        dtype: torch.dtype,
        base_bias: bool = False,
    ) -> Tensor | None:
        """Each row's task's vector from `entries` (rows, size), in `dtype`. A task without
        one (or rows of no task) get ones, or with `base_bias` the base layer's bias (zeros
        without one); None when no task present has one (and, with `base_bias`, the base
        layer has no bias)."""
        has_base_bias = base_bias and getattr(self.base_layer, "bias", None) is not None
        if not has_base_bias and not any(t in entries for t in routing.tasks if t is not None):
            return None
        w = self.weight
        if has_base_bias:
            missing = cast(Tensor, self.base_layer.bias).to(dtype)
        else:
            missing = w.new_full((size,), 0.0 if base_bias else 1.0, dtype=dtype)
        table = torch.stack(
            [
                entries[t].to(dtype) if t is not None and t in entries else missing
                for t in routing.tasks
            ]
        )
        return table[routing.index]

    def forward_with_weight(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The base layer's operation with another weight (in the base layout) and bias."""
        raise NotImplementedError

    def task_forward(self, x: Tensor, task: str) -> Tensor:
        if self.folds(x, task):
            return self.folded_forward(x, task)
        return self.activation_forward(x, task)

    def folds(self, x: Tensor, task: str) -> bool:
        """Whether to fold r, s and B A into one weight (cost ~ the weight's size) rather than
        apply them to the activations (cost ~ the input's size).

        Folding pays at inference when the input is the larger. In training it would make
        autograd compute the gradient of the whole folded weight: a second full-size product
        for a dense layer, and slower than the activation passes even for a depthwise conv
        (measured on EfficientNet-Lite0: 1.22x LoRA's step folding its 3x3 depthwise convs,
        1.73x folding the 5x5 ones too, against 1.18x folding none).
        """
        if self._needs_grad(task):
            return False
        return x.numel() >= self.weight.numel()

    def _needs_grad(self, task: str) -> bool:
        if not torch.is_grad_enabled():
            return False
        if self.weight.requires_grad:
            return True
        return any(
            d[task].requires_grad
            for d in (self.halrp_r, self.halrp_s, self.halrp_A, self.halrp_B, self.halrp_bias)
            if task in d
        )

    def folded_forward(self, x: Tensor, task: str) -> Tensor:
        bias = self.task_bias(task)
        weight = self.merged_weight(task).to(x.dtype)
        return self.forward_with_weight(x, weight, None if bias is None else bias.to(x.dtype))

    def activation_forward(self, x: Tensor, task: str) -> Tensor:
        r = self.halrp_r[task] if task in self.halrp_r else None
        s = self.halrp_s[task] if task in self.halrp_s else None
        bias = self.task_bias(task)
        A = B = None
        if self.rank(task):
            A, B = self.factor(task, "A"), self.factor(task, "B")
            assert A is not None and B is not None  # a task with a rank holds both factors
        dtype = self.task_dtype(task)
        if dtype == self.weight.dtype == x.dtype:
            return adapted_forward(self, x, r, s, bias, A, B)
        # float32 task tensors on a half-precision base: only W0's product in its dtype
        xa = x.to(dtype)
        h = xa if s is None else xa * self.channel_view(s)
        y = self.scaled_forward(h.to(self.weight.dtype), None, None).to(dtype)
        if r is not None:
            y = y * self.channel_view(r)
        if bias is not None:
            y = y + self.channel_view(bias)
        if A is not None and B is not None:
            y = y + self.low_rank_forward(xa, A, B)
        return y.to(self.weight.dtype)

    def expand_input_scale(self, s: Tensor) -> Tensor:
        """s (in,) as an (out, in_per_group) grid matching the canonical weight."""
        g = self.groups
        per_group = s.numel() // g
        return (
            s.view(g, 1, per_group)
            .expand(g, self.out_features // g, per_group)
            .reshape(self.out_features, per_group)
        )

    def merged_weight(self, task: str) -> Tensor:
        """The task's full weight W_t in the base layer's layout, in the task's dtype."""
        wc = self.canonical(self.weight).to(self.task_dtype(task))
        if task in self.halrp_r:
            wc = wc * self.halrp_r[task][:, None, None]
            wc = wc * self.expand_input_scale(self.halrp_s[task])[:, :, None]
        if self.rank(task):
            B, A = self.factor(task, "B"), self.factor(task, "A")
            assert A is not None and B is not None  # a task with a rank holds both factors
            wc = wc + (B @ A)[:, :, None]
        return self.from_canonical(wc)

    @torch.no_grad()
    def merged_layer(self, task: str) -> nn.Module:
        """A plain copy of the base layer carrying the task's merged weight and bias."""
        base_weight = cast(Tensor, self.base_layer.weight)
        weight = nn.Parameter(self.merged_weight(task).detach().to(base_weight.dtype).clone())
        memo = {id(self.base_layer.weight): weight}
        bias = getattr(self.base_layer, "bias", None)
        if bias is not None and task in self.halrp_bias:
            memo[id(bias)] = nn.Parameter(self.halrp_bias[task].detach().to(bias.dtype).clone())
        return copy.deepcopy(self.base_layer, memo)

    def extra_repr(self) -> str:
        ranks = {t: self.rank(t) for t in self.task_names()}
        return f"tasks={ranks}"
