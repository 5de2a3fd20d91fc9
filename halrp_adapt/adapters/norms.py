"""`TaskNorm`: a normalisation layer with one full copy per task.

Each task gets a deep copy of the base norm module, so every subclass keeps its own forward
(timm's `BatchNormAct2d` with its activation, `LayerNorm2d`'s permutes, RMSNorm variants).
The copy carries the affine parameters and the running statistics. A task may also keep no copy
(its budget placed elsewhere): it then runs the base module. The base module and the copies of
finished tasks always run in eval mode: their statistics never move again.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .routing import TaskRouted, call_in_own_dtype


class TaskNorm(TaskRouted):
    """Routes a normalisation layer's forward to the active task's own copy."""

    adapter_layer_names = ("halrp_norm",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.halrp_norm = nn.ModuleDict()
        self.base_layer.eval()

    def add_task(self, task: str) -> None:
        self.halrp_norm[task] = copy.deepcopy(self.base_layer)
        self.halrp_norm[task].train(self.training)

    def drop_task_copy(self, task: str) -> None:
        """Task `task` runs the base module here (frozen, eval mode) and stores no copy."""
        if task in self.halrp_norm:
            del self.halrp_norm[task]

    def freeze_task(self, task: str) -> None:
        super().freeze_task(task)
        if task in self.halrp_norm:
            self.halrp_norm[task].eval()

    def train(self, mode: bool = True) -> TaskNorm:
        super().train(mode)
        self.base_layer.train(False)
        for task in self.frozen_tasks:
            if task in self.halrp_norm:
                self.halrp_norm[task].train(False)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.row_routing is not None:
            return self.forward_rows(self.halrp_norm, args, kwargs)
        task = self.routed_task
        if task is None or task not in self.halrp_norm:
            return self.base_layer(*args, **kwargs)
        return call_in_own_dtype(self.halrp_norm[task], args, kwargs)

    @property
    def in_features(self) -> int | None:
        """Channels normalised (PEFT's adapter layers expose in/out features)."""
        base = self.base_layer
        for attr in ("num_features", "num_channels", "hidden_size"):
            if isinstance(getattr(base, attr, None), int):
                return getattr(base, attr)
        shape = getattr(base, "normalized_shape", None)
        if shape:
            return int(shape[-1])
        weight = getattr(base, "weight", None)
        return int(weight.shape[0]) if weight is not None else None

    @property
    def out_features(self) -> int | None:
        return self.in_features
