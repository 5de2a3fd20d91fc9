"""A task's change as a standard PEFT LoRA adapter: `export_lora`.

A HALRP task changes a layer's weight by `diag(r) W0 diag(s) - W0 + B A`. LoRA holds a change
`B' A'` of some rank, so the export decomposes each layer's exact change by SVD and keeps its
numerical rank: the result is exact (up to `tolerance` of the change's largest singular value)
whenever that rank fits `max_rank`. The scales make most changes full-rank, so by default
`max_rank` is the layer's full rank (exact, but then not small); a smaller `max_rank` is refused
layer by layer with the reason instead of silently approximating. Grouped and depthwise convs
are refused when their task changed them (PEFT's LoRA factorises dense kernels only).

The task's biases ride along with PEFT's `bias="lora_only"`, its norms and head as
`modules_to_save`, so loading the folder with `PeftModel.from_pretrained` reproduces the task.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..handle.model import HalrpModel

ADAPTER = "default"


class LoraExportError(ValueError):
    """The task's change cannot be written exactly as a LoRA adapter; the message says why."""


def export_lora(
    handle: HalrpModel,
    task: str,
    backbone: nn.Module,
    save_directory: str | os.PathLike,
    max_rank: int | None = None,
    tolerance: float = 1e-6,
) -> Path:
    """Write task `task` of `handle` as a PEFT LoRA adapter folder built on `backbone`, a fresh
    copy of the same backbone (with a head of the task's size if the task has its own head).

    Example::

        cl = halrp_adapt.load(timm.create_model("resnet18", pretrained=True), "shelf/")
        export_lora(cl, "task3", timm.create_model("resnet18", pretrained=True,
                                                   num_classes=10), "task3-lora/")
        peft_model = PeftModel.from_pretrained(fresh_resnet18_10_classes, "task3-lora/")
    """
    from peft import LoraConfig, get_peft_model

    handle._info(task)
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1
    ):
        raise ValueError(f"`max_rank` must be None or an int >= 1, got {max_rank!r}.")
    factors, biases = _layer_changes(handle, task, max_rank, tolerance)
    norms, head = handle.task_norms(), handle.task_head()
    keep = [n for n, norm in norms.items() if task in norm.halrp_norm]  # the others: the base's
    if head is not None:
        assert handle.head_name is not None  # task_head() is None without a head name
        keep.append(handle.head_name)
    names = sorted(set(factors) | set(biases))
    if not names:
        raise LoraExportError(f"task {task!r} changes no adaptable layer; nothing to export.")
    ranks = {n: factors[n][0].shape[0] if n in factors else 1 for n in names}
    config = LoraConfig(
        r=max(ranks.values()),
        lora_alpha=max(ranks.values()),
        target_modules="^(?:" + "|".join(re.escape(n) for n in names) + ")$",
        rank_pattern={f"^{re.escape(n)}": ranks[n] for n in names},
        alpha_pattern={f"^{re.escape(n)}": ranks[n] for n in names},  # scale alpha / r = 1
        bias="lora_only" if biases else "none",
        modules_to_save=keep or None,
        init_lora_weights=False,
    )
    peft_model = get_peft_model(backbone, config)
    modules = dict(cast(nn.Module, peft_model.base_model.model).named_modules())
    with torch.no_grad():
        for name in names:
            layer = modules[name]
            A, B = factors.get(name, (None, None))
            lora_a, lora_b = layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight
            lora_a.copy_(A.reshape(lora_a.shape) if A is not None else torch.zeros_like(lora_a))
            lora_b.copy_(B.reshape(lora_b.shape) if B is not None else torch.zeros_like(lora_b))
            if name in biases:
                layer.get_base_layer().bias.copy_(biases[name])
        for name in keep:
            if name in norms:
                own = norms[name].halrp_norm[task]
            else:
                assert head is not None  # the only entry of `keep` that is not a norm is the head
                own = head.halrp_head[task]
            modules[name].modules_to_save[ADAPTER] = copy.deepcopy(own)
    peft_model.save_pretrained(str(save_directory))
    return Path(save_directory)


def _layer_changes(
    handle: HalrpModel, task: str, max_rank: int | None, tolerance: float
) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor]]:
    """{layer: (A, B)} for every layer whose weight the task changes, {layer: bias} for every
    layer whose bias it changes; LoraExportError for a change LoRA cannot hold exactly."""
    factors, biases, refused = {}, {}, []
    with torch.no_grad():
        for name, layer in handle.adapter_layers().items():
            bias = layer.halrp_bias[task] if task in layer.halrp_bias else None
            base_bias = getattr(layer.base_layer, "bias", None)
            if bias is not None and base_bias is not None and not torch.equal(bias, base_bias):
                biases[name] = bias.detach().clone()
            delta = (layer.merged_weight(task) - layer.weight).double()
            if not bool(delta.abs().max() > 0):
                continue
            if layer.groups > 1:
                refused.append(
                    f"{name}: a grouped conv (groups={layer.groups}) that the task "
                    "rescales; PEFT's LoRA factorises dense kernels only"
                )
                continue
            matrix = _as_lora_matrix(layer.base_layer, delta)
            U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
            rank = int((S > tolerance * S[0]).sum())
            if max_rank is not None and rank > max_rank:
                refused.append(
                    f"{name}: the change has numerical rank {rank} (the scales r, s "
                    f"make it so), above `max_rank`={max_rank}"
                )
                continue
            root = S[:rank].sqrt()
            factors[name] = (
                (root[:, None] * Vh[:rank]).to(layer.weight.dtype),
                (U[:, :rank] * root[None, :]).to(layer.weight.dtype),
            )
    if refused:
        raise LoraExportError(
            f"task {task!r} cannot be written exactly as LoRA: "
            + "; ".join(refused)
            + ". Use `merge` for a plain model, or "
            "raise `max_rank`."
        )
    return factors, biases


def _as_lora_matrix(base: nn.Module, delta: Tensor) -> Tensor:
    """The weight change as the (out, in) matrix PEFT's LoRA factorises for this layer type."""
    if isinstance(base, nn.Conv2d):
        return delta.reshape(delta.shape[0], -1)
    if isinstance(base, nn.Linear):
        return delta
    return delta.T  # transformers' Conv1D keeps (in, out)
