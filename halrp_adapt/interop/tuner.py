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

from typing import TYPE_CHECKING, Any, cast

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..adapters.routing import NOT_ADDITIVE, TaskRouted
from ..config import HalrpConfig, HalrpType
from ..handle.model import HalrpModel

if TYPE_CHECKING:
    from peft.config import PeftConfig


class HalrpTuner(BaseTuner):
    """PEFT's view of a HALRP-adapted model (what `PeftModel.base_model` is)."""

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

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict | None = None,
        **kwargs: Any,
    ) -> None:
        config = cast(HalrpConfig, self.peft_config[adapter_name])  # this tuner holds only these
        handle = HalrpModel.of(model)
        if handle is None:
            handle = HalrpModel(model, config)
        handle.add_task_from_config(adapter_name, config)
        self.targeted_module_names = list(handle.adapter_layers())
        self.active_adapter = adapter_name

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
        """HALRP's tensors keep the dtype of the layers they belong to."""

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(f"{NOT_ADDITIVE}; got {names}.")
        self.halrp.set_task(names[0])
        self.active_adapter = names[0]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        self.halrp.delete_task(adapter_name)
        del self.peft_config[adapter_name]
        remaining = self.halrp.tasks
        self.active_adapter = remaining[-1] if remaining else []
        self.halrp.set_task(remaining[-1] if remaining else None)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        for module in self.model.modules():
            if isinstance(module, TaskRouted):
                module.enable_adapters(enabled)

    def disable_adapter_layers(self) -> None:
        self._enable_adapter_layers(False)

    def enable_adapter_layers(self) -> None:
        self._enable_adapter_layers(True)

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        """The model merged for one task (the active one, or `adapter_names[0]`), in place."""
        names = adapter_names or self.active_adapters
        if len(names) != 1:
            raise ValueError(f"{NOT_ADDITIVE}; merge one task, got {names}.")
        return self.halrp.merge(names[0], inplace=True)

    def unload(self) -> nn.Module:
        return self.halrp.unload()


def register_with_peft() -> None:
    """Enter HALRP in PEFT's tables (idempotent; done on `import halrp_adapt`)."""
    # The tables are typed as keyed by PeftType, which cannot be extended; PEFT looks them up
    # by value, and HalrpType.HALRP is a str member equal to "HALRP".
    PEFT_TYPE_TO_CONFIG_MAPPING[HalrpType.HALRP] = HalrpConfig  # type: ignore[index]
    PEFT_TYPE_TO_TUNER_MAPPING[HalrpType.HALRP] = HalrpTuner  # type: ignore[index]
    PEFT_TYPE_TO_PREFIX_MAPPING[HalrpType.HALRP] = HalrpTuner.prefix  # type: ignore[index]
