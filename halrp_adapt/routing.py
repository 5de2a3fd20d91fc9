"""The one idea every HALRP wrapper shares: which task's parameters the next forward uses."""

from __future__ import annotations

import re
from typing import Optional

from torch import nn

TASK_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def check_task_name(name: object) -> str:
    """Return `name` if it can key a ModuleDict and a folder on disk, else raise ValueError."""
    if not isinstance(name, str) or not TASK_NAME_PATTERN.match(name):
        raise ValueError(
            f"task name must be 1-128 characters of letters, digits, '_' or '-', got {name!r}."
        )
    return name


class TaskRouted(nn.Module):
    """A module that holds per-task state and routes its forward through the active task.

    `active_task` None means the frozen backbone itself. `frozen_tasks` are tasks whose training
    has ended: their state is never trained again, and their normalisation runs in eval mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active_task: Optional[str] = None
        self.frozen_tasks: set[str] = set()

    def task_names(self) -> list[str]:
        raise NotImplementedError

    def set_active_task(self, task: Optional[str]) -> None:
        self.active_task = task

    def freeze_task(self, task: str) -> None:
        self.frozen_tasks.add(task)
        for p in self.task_parameters(task):
            p.requires_grad_(False)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        raise NotImplementedError

    def remove_task(self, task: str) -> None:
        raise NotImplementedError
