"""The one idea every HALRP wrapper shares: which task's parameters the next forward uses.

`TaskRouted` is also a PEFT `BaseTunerLayer`, so PEFT and transformers see HALRP's wrappers as
adapter layers (one adapter = one task): they find the per-task containers structurally, and
`set_adapter`, `delete_adapter` and `enable_adapters` route, delete and disable tasks here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

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


class TaskRouted(nn.Module, BaseTunerLayer):
    """A module that holds per-task state and routes its forward through the active task.

    `active_task` None means the frozen backbone itself. `frozen_tasks` are tasks whose training
    has ended: their state is never trained again, and their normalisation runs in eval mode.
    Subclasses list their per-task containers in `adapter_layer_names` (PEFT's convention).
    """

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.active_task: str | None = None
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
