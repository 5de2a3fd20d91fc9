"""Per-task classifier heads: finding the head of a model and giving each task its own.

Where the head is looked for, in order: the `head_module` option; timm's
`pretrained_cfg["classifier"]` (what `get_classifier()` returns); the attributes transformers'
task models use (`classifier`, `score`, `lm_head`, ...); for a plain module, its last
`nn.Linear`. A transformers base model (e.g. `BertModel`) has no head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

from torch import nn

from .routing import TaskRouted, call_in_own_dtype

HF_HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs", "head", "fc", "last")


def find_head(model: nn.Module, head_module: str | None = None) -> str | None:
    """Return the dotted name of `model`'s classifier head, or None if it has none."""
    modules = dict(model.named_modules())
    if head_module is not None:
        if head_module not in modules or head_module == "":
            raise ValueError(
                f"`head_module` {head_module!r} is not a module of the model; "
                f"top-level modules: {[n for n, _ in model.named_children()]}."
            )
        return head_module
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("classifier"):
        name = cfg["classifier"]
        name = name[0] if isinstance(name, (list, tuple)) else name
        if name in modules:
            return name
    if hasattr(model, "get_classifier"):
        head = cast(Callable[[], nn.Module], model.get_classifier)()
        for name, module in modules.items():
            if module is head and name:
                return name
    is_hf = hasattr(model, "config") and hasattr(model, "base_model_prefix")
    for name in HF_HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    if is_hf:
        return None
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def new_head(head: nn.Module, num_classes: int | None, in_features: int | None = None) -> nn.Module:
    """A copy of `head` whose last Linear outputs `num_classes` (a plain copy if None)."""
    fresh = copy.deepcopy(head)
    for p in fresh.parameters():
        p.requires_grad_(True)
    if num_classes is None:
        return fresh
    last_name, last = None, None
    for name, module in fresh.named_modules():
        if isinstance(module, nn.Linear):
            last_name, last = name, module
    if last is None:
        if in_features is None:
            raise ValueError(
                f"cannot give a head of type {type(head).__name__} "
                f"{num_classes} classes: it has no nn.Linear; pass "
                "num_classes=None or choose another `head_module`."
            )
        return nn.Linear(in_features, num_classes)
    replacement = nn.Linear(
        last.in_features,
        num_classes,
        bias=last.bias is not None,
        device=last.weight.device,
        dtype=last.weight.dtype,
    )
    assert last_name is not None  # set together with `last`
    if last_name == "":
        return replacement
    parent_name, _, child = last_name.rpartition(".")
    parent = fresh.get_submodule(parent_name) if parent_name else fresh
    setattr(parent, child, replacement)
    return fresh


class TaskHead(TaskRouted):
    """Routes the classifier to the active task's own head; the base head when none is active."""

    adapter_layer_names = ("halrp_head",)

    def __init__(self, base_layer: nn.Module, in_features: int | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.halrp_head = nn.ModuleDict()
        self._given_in_features = in_features

    @property
    def in_features(self) -> int | None:
        """Width of the features the head reads (PEFT's adapter layers expose it)."""
        if self._given_in_features is not None:
            return self._given_in_features
        first = next((m for m in self.base_layer.modules() if isinstance(m, nn.Linear)), None)
        return first.in_features if first is not None else None

    @property
    def out_features(self) -> int | None:
        """Classes of the routed task's head (the base head's when no task is routed)."""
        task = self.routed_task
        head = self.base_layer if task is None else self.halrp_head[task]
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else None

    def add_task(self, task: str, num_classes: int | None) -> None:
        self.halrp_head[task] = new_head(self.base_layer, num_classes, self.in_features)

    def num_classes(self, task: str) -> int | None:
        linears = [m for m in self.halrp_head[task].modules() if isinstance(m, nn.Linear)]
        return linears[-1].out_features if linears else None

    def freeze_task(self, task: str) -> None:
        super().freeze_task(task)
        self.halrp_head[task].eval()

    def train(self, mode: bool = True) -> TaskHead:
        super().train(mode)
        for task in self.frozen_tasks:
            if task in self.halrp_head:
                self.halrp_head[task].train(False)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.row_routing is not None:
            return self.forward_rows(self.halrp_head, args, kwargs, pad_last=True)
        task = self.routed_task
        if task is None:
            return self.base_layer(*args, **kwargs)
        return call_in_own_dtype(self.halrp_head[task], args, kwargs)
