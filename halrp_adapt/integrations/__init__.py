"""Integrations with the training tools people already use: transformers' `Trainer`
(`HalrpTrainer`), timm's optimiser factory and loss
(`create_halrp_optimizer`, `RegularizedLoss`)."""

from __future__ import annotations

from typing import Any

__all__ = ["HalrpTrainer", "create_halrp_optimizer", "RegularizedLoss"]


def __getattr__(name: str) -> Any:  # import transformers / timm only when asked for
    if name == "HalrpTrainer":
        from .transformers import HalrpTrainer

        return HalrpTrainer
    if name in ("create_halrp_optimizer", "RegularizedLoss"):
        from . import timm as timm_integration

        return getattr(timm_integration, name)
    raise AttributeError(name)
