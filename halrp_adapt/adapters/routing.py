"""The one idea every HALRP wrapper shares: which task's parameters the next forward uses.

`TaskRouted` is also a PEFT `BaseTunerLayer`, so PEFT and transformers see HALRP's wrappers as
adapter layers (one adapter = one task): they find the per-task containers structurally, and
`set_adapter`, `delete_adapter` and `enable_adapters` route, delete and disable tasks here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

TASK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
NOT_ADDITIVE = (
    "HALRP adapters are not additive: each task has its own full set of scales, "
    "factors, norms and head, so only one task can be active at a time"
)


def check_task_name(name: object) -> str:
    """Return `name` if it can key a ModuleDict and a folder on disk, else raise ValueError."""
    if not isinstance(name, str) or not TASK_NAME_PATTERN.match(name):
        raise ValueError(
            f"task name must be 1-128 characters of letters, digits, '_' or '-', got {name!r}."
        )
    return name


# Names Windows reserves for devices in every folder, whatever the case or extension.
WINDOWS_RESERVED = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{port}{i}" for port in ("COM", "LPT") for i in range(1, 10)]
)


def case_twin(name: str, existing: Iterable[str]) -> str | None:
    """The existing name that differs from `name` only in case, if any.

    macOS and Windows file systems ignore case, so two such tasks would share one folder.

    >>> case_twin("TaskA", ["taska", "b"])
    'taska'
    """
    return next((t for t in existing if t != name and t.lower() == name.lower()), None)


def check_new_task_name(name: object, existing: Iterable[str]) -> str:
    """`check_task_name`, plus what a new task needs to be saved on every OS.

    Refuses Windows' device names (CON, NUL, COM1, ...) and a name that differs from an
    existing task's only in case. Loading does not apply these rules, so shelves made before
    them still load.

    >>> check_new_task_name("cats", existing=["dogs"])
    'cats'
    """
    checked = check_task_name(name)
    existing = list(existing)
    if checked in existing:
        raise ValueError(f"task {checked!r} already exists; existing tasks: {existing}.")
    if checked.upper() in WINDOWS_RESERVED:
        raise ValueError(
            f"task name {checked!r} is a device name on Windows "
            f"({', '.join(sorted(WINDOWS_RESERVED))}, any case), so its folder could not be "
            "saved or loaded there; choose another name."
        )
    twin = case_twin(checked, existing)
    if twin is not None:
        raise ValueError(
            f"task name {checked!r} differs from existing task {twin!r} only in case; on "
            "macOS and Windows both would share one folder. Choose another name."
        )
    return checked


@dataclass(frozen=True)
class RowRouting:
    """One forward of a batch whose rows belong to different tasks (`forward_tasks`).

    `index[i]` is the position in `tasks` of row i's task; `rows[j]` lists the rows of
    `tasks[j]`; a task None stands for rows that run through the backbone alone (PEFT's
    "__base__"); heads of different widths pad their rows with `fill_value`.
    """

    tasks: list[str | None]
    index: Tensor
    rows: list[Tensor]
    fill_value: float = float("-inf")

    @property
    def batch(self) -> int:
        return self.index.numel()

    def check(self, x: Tensor, where: str) -> None:
        """Raise `RowRoutingUnsupported` unless `x`'s first dimension is the batch's rows."""
        if x.dim() == 0 or x.shape[0] != self.batch:
            raise RowRoutingUnsupported(
                f"{where} got an input of shape {tuple(x.shape)}, whose first dimension is "
                f"not the batch of {self.batch} rows"
            )


class RowRoutingUnsupported(RuntimeError):
    """A layer cannot tell which task each row of its input belongs to (the model reshapes
    the batch dimension, e.g. windowed attention): the mixed batch must run task by task."""


def call_in_own_dtype(module: nn.Module, args: tuple, kwargs: dict) -> Any:
    """`module(*args, **kwargs)`, with a floating first input cast to the module's dtype and a
    tensor output cast back: a task's float32 norm or head copy inside a half-precision model."""
    x = args[0] if args else None
    own = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if not isinstance(x, Tensor) or not x.is_floating_point() or own is None or own == x.dtype:
        return module(*args, **kwargs)
    out = module(x.to(own), *args[1:], **kwargs)
    return out.to(x.dtype) if isinstance(out, Tensor) and out.is_floating_point() else out


def per_task_rows(
    routing: RowRouting,
    x: Tensor,
    fn: Callable[[str | None, Tensor], Tensor],
    pad_last: bool = False,
) -> Tensor:
    """Run `fn(task, rows of x)` for each task present (None: rows of no task, which run
    through the backbone) and put the results back in row order; with `pad_last`, shorter last
    dimensions are padded with `routing.fill_value`."""
    pieces = [
        (rows, fn(task, x.index_select(0, rows)))
        for task, rows in zip(routing.tasks, routing.rows, strict=True)
    ]
    for _, piece in pieces:
        if not isinstance(piece, Tensor):
            raise RowRoutingUnsupported(f"a per-task module returned a {type(piece).__name__}")
    first = pieces[0][1]
    width = max(piece.shape[-1] for _, piece in pieces) if pad_last else first.shape[-1]
    out = first.new_full((routing.batch, *first.shape[1:-1], width), routing.fill_value)
    for rows, piece in pieces:
        if piece.shape[-1] == width:
            out.index_copy_(0, rows, piece)
        else:
            out[rows, ..., : piece.shape[-1]] = piece
    return out


class TaskRouted(nn.Module, BaseTunerLayer):
    """A module that holds per-task state and routes its forward through the active task.

    `active_task` None means the frozen backbone itself. `frozen_tasks` are tasks whose training
    has ended: their state is never trained again, and their normalisation runs in eval mode.
    Subclasses list their per-task containers in `adapter_layer_names` (PEFT's convention).
    """

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.active_task: str | None = None
        # Set only for the duration of one mixed-batch forward (`forward_tasks`).
        self.row_routing: RowRouting | None = None
        self.frozen_tasks: set[str] = set()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    @property
    def routed_task(self) -> str | None:
        """The task the next forward uses: the active one, unless adapters are disabled."""
        return None if self._disable_adapters else self.active_task

    def task_names(self) -> list[str]:
        names: dict[str, None] = {}
        for attr in self.adapter_layer_names + self.other_param_names:
            names.update(dict.fromkeys(getattr(self, attr).keys()))
        return list(names)

    def forward_rows(
        self, copies: nn.ModuleDict, args: tuple, kwargs: dict, pad_last: bool = False
    ) -> Tensor:
        """Under `row_routing`, each task's own module of `copies` on its rows of `args[0]`
        (the base module on rows of no task or of a task without a copy here)."""
        routing = self.row_routing
        assert routing is not None  # called only while a mixed batch is routed by rows
        routing.check(args[0], type(self).__name__)
        base = cast(nn.Module, self.base_layer)
        return per_task_rows(
            routing,
            args[0],
            lambda task, x: call_in_own_dtype(
                copies[task] if task is not None and task in copies else base,
                (x, *args[1:]),
                kwargs,
            ),
            pad_last=pad_last,
        )

    def cast_task(self, task: str, dtypes: tuple[torch.dtype, ...], to: torch.dtype) -> None:
        """Cast the task's floating tensors of one of `dtypes` to `to`."""
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if task not in container:
                continue
            entry = container[task]
            if isinstance(entry, nn.Module):
                if any(p.dtype in dtypes for p in entry.parameters()):
                    entry.to(to)
            elif entry.dtype in dtypes:
                container[task] = nn.Parameter(entry.detach().to(to), entry.requires_grad)

    def move_task(self, task: str, device: torch.device) -> None:
        """Move the task's tensors to `device` (e.g. "meta", for a loader that assigns them)."""
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if task not in container:
                continue
            entry = container[task]
            if isinstance(entry, nn.Module):
                entry.to(device)
            elif isinstance(entry, nn.Parameter):
                container[task] = nn.Parameter(entry.detach().to(device), entry.requires_grad)
            else:
                container[task] = entry.to(device)

    def set_active_task(self, task: str | None) -> None:
        self.active_task = task

    def freeze_task(self, task: str) -> None:
        self.frozen_tasks.add(task)
        for p in self.task_parameters(task):
            p.requires_grad_(False)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if task not in container:
                continue
            entry = container[task]
            params.extend(entry.parameters() if isinstance(entry, nn.Module) else [entry])
        return params

    def remove_task(self, task: str) -> None:
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if task in container:
                del container[task]
        self.frozen_tasks.discard(task)
        if self.active_task == task:
            self.active_task = None

    # ---- PEFT's BaseTunerLayer interface -----------------------------------------------------
    @property
    def active_adapter(self) -> str | list[str]:
        return self.active_task if self.active_task is not None else []

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        """Route through one task. Trainability is the handle's business, not the layer's."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if len(names) > 1:
            raise ValueError(f"{NOT_ADDITIVE}; got {names}.")
        self.set_active_task(names[0] if names else None)

    def delete_adapter(self, adapter_name: str) -> None:
        self.remove_task(adapter_name)

    def enable_adapters(self, enabled: bool) -> None:
        self._disable_adapters = not enabled

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "HALRP layers are merged per task by HalrpModel.merge(task) or "
            "PeftModel.merge_and_unload(), never in place on one layer."
        )

    def unmerge(self) -> None:
        raise NotImplementedError("HALRP layers are never merged in place.")
