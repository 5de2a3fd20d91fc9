"""Export one task as a plain model that runs without halrp_adapt."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, cast

from safetensors.torch import save_file

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from ..handle.model import HalrpModel


def save_merged(handle: HalrpModel, task: str, save_directory: str | os.PathLike) -> Path:
    """Save task `task` merged into plain weights, in its library's own format.

    transformers models: `save_pretrained` (config.json + model.safetensors, `num_labels` set
    to the task's classes); timm models: `timm.models.save_for_hf` (config.json with the
    task's `num_classes` + model.safetensors); any other model: `model.safetensors` holding its
    state dict. Returns the folder.
    """
    plain = handle.merge(task).eval()
    root = Path(save_directory)
    root.mkdir(parents=True, exist_ok=True)
    num_classes = handle._tasks[task].config.num_classes
    if hasattr(plain, "save_pretrained") and hasattr(plain, "config"):
        hf_model = cast("PreTrainedModel", plain)
        if num_classes is not None and hasattr(hf_model.config, "num_labels"):
            hf_model.config.num_labels = num_classes
        hf_model.save_pretrained(root)
    elif isinstance(getattr(plain, "pretrained_cfg", None), dict):
        from timm.models import save_for_hf

        overrides = {}
        if num_classes is not None:
            # timm keeps the head's size as an attribute; nn.Module's __setattr__ typing
            # only admits Tensor | Module, but a plain attribute is fine at runtime.
            plain.num_classes = num_classes  # type: ignore[assignment]
            overrides["num_classes"] = num_classes
        # timm annotates `save_directory: str` but wraps it in Path() itself.
        save_for_hf(plain, root, model_config=overrides, safe_serialization=True)  # type: ignore[arg-type]
    else:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()},
            str(root / "model.safetensors"),
        )
    return root
