"""Empirical Fisher per layer (HALRP.md section 3, step 2): the mean squared gradient.

Ways to measure it:
- `empirical_fisher`: the reference's separate pass (eval mode, true labels) over held-out
  batches at the trial's final weights; one forward and backward per batch.
- `TrialFisher`: the same statistic read off the trial's own gradients over its last steps
  (`TRIAL_FISHER_SHARE` of them, at near-final weights), at no extra forward or backward.
- `DenseGradientFisher`: the same statistic for layers whose weight is not a trained tensor
  (the low-rank trial trains scales and factors): each layer's dense weight gradient is made
  from its input and output gradient inside the backward, one layer at a time, and only its
  squared norm is kept.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .losses import LossFn, batch_size


def empirical_fisher(
    model: nn.Module, data: Iterable[Any], weights: dict[str, torch.Tensor], loss_fn: LossFn
) -> dict[str, float]:
    """One scalar per weight: `sum_b mean(grad_W^2) * |b| / n_batches`, as the reference.

    The model runs in eval mode and the loss uses the true labels. Only the weights' relative
    sizes matter to the rank choice, so the reference's scaling is kept as is.
    """
    was_training = model.training
    model.eval()
    # Only the measured weights need their gradient; the rest only pass gradients through.
    flags = {p: p.requires_grad for p in model.parameters()}
    measured = {id(w) for w in weights.values()}
    for p in flags:
        p.requires_grad_(id(p) in measured)
    totals = {name: 0.0 for name in weights}
    batches = 0
    try:
        for batch in data:
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            size = batch_size(batch)
            for name, w in weights.items():
                if w.grad is not None:
                    totals[name] += float(w.grad.float().pow(2).mean()) * size
            batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        for p, flag in flags.items():
            p.requires_grad_(flag)
    if batches == 0:
        raise ValueError("the Fisher data yielded no batch.")
    return {name: total / batches for name, total in totals.items()}


# Share of the trial's steps, counted from its end, whose gradients make `TrialFisher`'s Fisher.
TRIAL_FISHER_SHARE = 0.2


class TrialFisher:
    """Gathers `mean(grad_W^2) * |b|` of each weight after each trial step's backward, and
    averages it over the trial's last `TRIAL_FISHER_SHARE` of steps (at least one).

    When the trial's length is known up front only those steps are measured; otherwise every
    step is, and the last ones kept. Values stay on the weights' device until `result()`.

    Example:
        >>> layer = torch.nn.Linear(3, 2)
        >>> fisher = TrialFisher({"fc": layer.weight}, total_steps=5)
        >>> for step in range(5):
        ...     layer.zero_grad(); layer(torch.ones(4, 3)).sum().backward()
        ...     fisher.after_backward(step, batch_size=4)
        >>> round(fisher.result()["fc"], 3)  # grad = 4 everywhere: 16 * 4
        64.0
    """

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        total_steps: int | None,
        optional: Collection[str] = (),
    ) -> None:
        self.weights = weights
        self.optional = set(optional)  # names whose missing gradient counts as zero
        self.first_step = None if total_steps is None else total_steps - _window(total_steps)
        self.records: list[torch.Tensor] = []

    def after_backward(self, step: int, batch_size: int) -> None:
        """Record step `step` (0-based), if it can be among the last steps."""
        if self.first_step is not None and step < self.first_step:
            return
        missing = [n for n, w in self.weights.items() if w.grad is None]
        if any(n not in self.optional for n in missing):
            required = [n for n in missing if n not in self.optional]
            raise RuntimeError(f"the trial's loss gives no gradient to the weights {required}.")
        grads = [
            w.grad if w.grad is not None else torch.zeros_like(w) for w in self.weights.values()
        ]
        norms = torch._foreach_norm([g.float() for g in grads])
        sizes = torch.tensor([g.numel() for g in grads], device=norms[0].device)
        self.records.append(torch.stack(norms).pow(2) / sizes * batch_size)

    def result(self) -> dict[str, float]:
        if not self.records:
            raise ValueError("the trial took no step, so it measured no Fisher.")
        kept = (
            self.records[-_window(len(self.records)) :] if self.first_step is None else self.records
        )
        values = torch.stack(kept).mean(0).tolist()
        return dict(zip(self.weights, values, strict=True))


def _window(steps: int, share: float = TRIAL_FISHER_SHARE) -> int:
    return max(1, math.ceil(share * steps))


class GradientProbed(Protocol):
    """A layer that can make the squared norm of its weight's gradient from its input and the
    gradient of its output (`HalrpLayer.weight_gradient_norm2`)."""

    @property
    def weight(self) -> Tensor: ...

    def weight_gradient_norm2(self, x: Tensor, grad_output: Tensor) -> Tensor: ...

    def register_forward_hook(self, hook: Any) -> Any: ...


class DenseGradientFisher:
    """`TrialFisher`'s statistic, `mean(grad_W^2) * |b|` averaged over the trial's last
    `TRIAL_FISHER_SHARE` of steps, for layers trained through other parameters.

    A forward hook on each layer registers a hook on its output; in the backward that hook
    makes the dense gradient of the layer's effective weight from the layer's input (kept by
    autograd anyway) and the output's gradient, keeps its squared norm and drops it, so no dense
    gradient outlives its layer's backward. `before_step(step)` says whether a step is
    measured; `after_backward(step, batch_size)` records it. With `total_steps` None every step
    is measured and the last ones kept. A layer run more than once in a step adds the squared
    norms of its calls.
    """

    def __init__(
        self,
        layers: Mapping[str, GradientProbed],
        total_steps: int | None,
        share: float = TRIAL_FISHER_SHARE,
    ) -> None:
        self.layers = layers
        self.share = share
        self.first_step = None if total_steps is None else total_steps - _window(total_steps, share)
        self.records: list[Tensor] = []
        self._current: dict[str, Tensor] | None = None

    @contextlib.contextmanager
    def attached(self) -> Iterator[DenseGradientFisher]:
        handles = [
            layer.register_forward_hook(functools.partial(self._on_forward, name))
            for name, layer in self.layers.items()
        ]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._current = None

    def before_step(self, step: int) -> None:
        listening = self.first_step is None or step >= self.first_step
        self._current = {} if listening else None

    def _on_forward(self, name: str, layer: GradientProbed, args: tuple, output: Any) -> None:
        current = self._current
        if current is None or not isinstance(output, Tensor) or not output.requires_grad:
            return
        x = args[0]

        def on_gradient(grad: Tensor) -> None:
            value = layer.weight_gradient_norm2(x, grad).detach().float()
            current[name] = current[name] + value if name in current else value

        output.register_hook(on_gradient)

    def after_backward(self, step: int, batch_size: int) -> None:
        current, self._current = self._current, None
        if current is None:
            return
        missing = [n for n in self.layers if n not in current]
        if missing:
            raise RuntimeError(f"the trial's loss gives no gradient to the layers {missing}.")
        self.records.append(
            torch.stack([current[n] / self.layers[n].weight.numel() for n in self.layers])
            * batch_size
        )

    def result(self) -> dict[str, float]:
        if not self.records:
            raise ValueError("the trial took no step, so it measured no Fisher.")
        kept = (
            self.records[-_window(len(self.records), self.share) :]
            if self.first_step is None
            else self.records
        )
        values = torch.stack(kept).mean(0).tolist()
        return dict(zip(self.layers, values, strict=True))


def dense_gradient_fisher_pass(
    model: nn.Module, data: Iterable[Any], layers: Mapping[str, GradientProbed], loss_fn: LossFn
) -> dict[str, float]:
    """`empirical_fisher`'s pass (eval mode, true labels, every batch) for layers trained
    through other parameters, measured as `DenseGradientFisher` does. The trainable parameters
    get gradients on the way; they are cleared afterwards."""
    was_training = model.training
    model.eval()
    fisher = DenseGradientFisher(layers, total_steps=None, share=1.0)
    step = 0
    try:
        with fisher.attached():
            for batch in data:
                fisher.before_step(step)
                loss_fn(model, batch).backward()
                fisher.after_backward(step, batch_size(batch))
                step += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if step == 0:
        raise ValueError("the Fisher data yielded no batch.")
    return fisher.result()
