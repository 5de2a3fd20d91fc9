"""HALRP as a PEFT method: `HalrpTuner` and its registration in PEFT's type tables.

PEFT's `register_peft_method` only accepts names of its own `PeftType` enum, so HALRP enters
the tables (config, tuner, key prefix) under `HalrpType.HALRP`, a str-valued Enum member equal
to "HALRP". After `import halrp_adapt`: `peft.get_peft_model(model, HalrpConfig(...))`,
`PeftModel.from_pretrained(model, shelf, subfolder=task, adapter_name=task)`, `load_adapter`,
`set_adapter`, `delete_adapter`, `merge_and_unload`, and transformers' `model.load_adapter`.

There is one implementation: the tuner keeps no state of its own and drives the same
`HalrpModel` handle that `attach` returns (`tuner.halrp`). One PEFT adapter is one task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import BaseTuner
from torch import Tensor, nn

from ..adapters.routing import NOT_ADDITIVE, TaskRouted
from ..config import HalrpConfig, HalrpType
from ..handle.accounting import HalrpReport, TaskStats
from ..handle.mixed import rows_routed_by_adapter
from ..handle.model import HalrpModel

if TYPE_CHECKING:
    from peft.config import PeftConfig


class HalrpTuner(BaseTuner):
    """PEFT's view of a HALRP-adapted model (what `PeftModel.base_model` is).

    PEFT's calls mean what they mean in PEFT: `add_adapter` / `load_adapter` add a task without
    activating it, `set_adapter(name)` routes through it and, if it is not finished, trains it
    (one task trains at a time), `adapter_names=[...]` runs each sample through its own adapter
    ("__base__": the backbone), `merge_and_unload(safe_merge=True)` checks for NaNs. HALRP's
    own steps are reachable from the `PeftModel` too: `estimate_ranks`, `regularization_loss`,
    `end_task` and `report` act on the task being trained. Each adapter keeps its own copy of
    its config (`peft_config[name]`), so the object passed in is never changed.
    """

    prefix = "halrp_"
    tuner_layer_cls = TaskRouted
    target_module_mapping: dict[str, list[str]] = {}

    @property
    def halrp(self) -> HalrpModel:
        """The handle: add_task, estimate_ranks, regularization_loss, end_task, report..."""
        handle = HalrpModel.of(self.model)
        if handle is None:
            raise RuntimeError("this model has no HALRP handle (it was unloaded).")
        return handle

    # ---- HALRP's steps, reachable as `peft_model.<step>(...)` --------------------------------
    def estimate_ranks(self, data: Iterable[Any], **kwargs: Any) -> dict[str, int]:
        """`HalrpModel.estimate_ranks` for the adapter being trained."""
        return self.halrp.estimate_ranks(data, **kwargs)

    def regularization_loss(self) -> Tensor:
        """`HalrpModel.regularization_loss` of the adapter being trained."""
        return self.halrp.regularization_loss()

    def end_task(self, *args: Any, **kwargs: Any) -> TaskStats:
        """`HalrpModel.end_task`: prune, norm statistics, signature, freeze the adapter being
        trained (it stays active; PEFT then saves it as a finished task)."""
        stats = self.halrp.end_task(*args, **kwargs)
        return stats

    def report(self) -> HalrpReport:
        """`HalrpModel.report`: per-task ranks, parameter counts and growth."""
        return self.halrp.report()

    # ---- PEFT's tuner interface --------------------------------------------------------------
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
        **kwargs: Any,
    ) -> None:
        config = self.peft_config[adapter_name]
        if not isinstance(config, HalrpConfig):
            raise TypeError(f"HalrpTuner takes a HalrpConfig, got {type(config).__name__}.")
        handle = HalrpModel.of(model)
        if handle is None:
            # Autocasting is PEFT's own step after injection (`_cast_adapter_dtype`).
            handle = HalrpModel(model, config, autocast_adapter_dtype=False)
        own = handle.add_task_from_config(
            adapter_name,
            config,
            activate=adapter_name in self.active_adapters,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=False,
        )
        self.peft_config[adapter_name] = own
        self.targeted_module_names = list(handle.adapter_layers())

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("HALRP wraps layers through HalrpModel, not one by one.")

    @staticmethod
    def _check_target_module_exists(peft_config: PeftConfig, key: str) -> bool:
        return False

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        return peft_config

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        handle = self.halrp
        for p in handle.parameters():
            p.requires_grad_(False)
        if handle.open_task is not None:
            handle._make_trainable(handle.open_task)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's autocast: a task's float16 / bfloat16 tensors become float32 (the layers
        run only W0's product in the backbone's dtype)."""
        if autocast_adapter_dtype:
            self.halrp.cast_task_tensors(adapter_name)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Route through one task; train it unless it is finished or `inference_mode`."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(
                f"{NOT_ADDITIVE}; got {names}. Mix tasks sample by sample with "
                "model(x, adapter_names=[...])."
            )
        if names[0] not in self.peft_config:
            raise ValueError(f"Adapter {names[0]} not found.")
        self.halrp.activate(names[0], train=not inference_mode)
        self.active_adapter = names[0]

    def set_requires_grad(
        self, adapter_names: str | Sequence[str], requires_grad: bool = True
    ) -> None:
        """Only the task being trained has trainable tensors: `requires_grad=True` makes the
        named unfinished task the one (finished tasks never train again)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        handle = self.halrp
        if not requires_grad:
            for name in names:
                for p in handle._task_parameters(name):
                    p.requires_grad_(False)
            return
        if len(names) != 1:
            raise ValueError(f"HALRP trains one task at a time; got {names}.")
        info = handle._info(names[0], "adapter_names")
        if info.finished:
            raise ValueError(
                f"adapter {names[0]!r} is a finished HALRP task; its tensors never train again "
                "(earlier tasks' outputs stay bit-identical). Add a new adapter to train."
            )
        handle._open_task(names[0])

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        handle = self.halrp
        was_active = adapter_name in self.active_adapters
        handle.delete_task(adapter_name)
        del self.peft_config[adapter_name]
        if was_active:
            remaining = handle.tasks
            self.active_adapter = remaining[0] if remaining else []
            handle.set_task(remaining[0] if remaining else None)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        for module in self.model.modules():
            if isinstance(module, TaskRouted):
                module.enable_adapters(enabled)

    def disable_adapter_layers(self) -> None:
        self._enable_adapter_layers(False)

    def enable_adapter_layers(self) -> None:
        self._enable_adapter_layers(True)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """`model(x, adapter_names=[...])` and `generate(..., adapter_names=[...])`: each sample
        through its own adapter ("__base__": the backbone), in one pass (HALRP's row routing)."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        with rows_routed_by_adapter(self.halrp, adapter_names, args, kwargs, self.training):
            yield

    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        raise NotImplementedError(
            "HALRP cannot merge a task in place: W0 is shared by every task and must stay "
            "bit-identical. Call merge_and_unload() (or halrp.merge(task) for a copy) for a "
            "plain model of one task; the adapted model runs any task unmerged."
        )

    def unmerge_adapter(self) -> None:
        raise NotImplementedError(
            "HALRP never merges in place, so there is nothing to unmerge (see merge_adapter)."
        )

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """The model merged for one task (the active one, or `adapter_names[0]`), in place;
        `safe_merge` first checks the merged weights for NaN / inf and raises on any."""
        names = adapter_names or self.active_adapters
        if len(names) != 1:
            raise ValueError(f"{NOT_ADDITIVE}; merge one task, got {names}.")
        handle = self.halrp
        handle._info(names[0], "adapter_names")
        if safe_merge:
            for layer_name, layer in handle.adapter_layers().items():
                if not torch.isfinite(layer.merged_weight(names[0])).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {names[0]} seems to "
                        f"be broken (layer {layer_name!r})"
                    )
        merged = handle.merge(names[0], inplace=True)
        self._drop_peft_config(merged)
        return merged

    def unload(self) -> nn.Module:
        model = self.halrp.unload()
        self._drop_peft_config(model)
        return model

    @staticmethod
    def _drop_peft_config(model: nn.Module) -> None:
        if "peft_config" in model.__dict__:
            del model.__dict__["peft_config"]


def register_with_peft() -> None:
    """Enter HALRP in PEFT's tables (idempotent; done on `import halrp_adapt`)."""
    # The tables are typed as keyed by PeftType, which cannot be extended; PEFT looks them up
    # by value, and HalrpType.HALRP is a str member equal to "HALRP".
    PEFT_TYPE_TO_CONFIG_MAPPING[HalrpType.HALRP] = HalrpConfig  # type: ignore[index]
    PEFT_TYPE_TO_TUNER_MAPPING[HalrpType.HALRP] = HalrpTuner  # type: ignore[index]
    PEFT_TYPE_TO_PREFIX_MAPPING[HalrpType.HALRP] = HalrpTuner.prefix  # type: ignore[index]
