"""`halrp_adapt.load`: restore any subset of a shelf's tasks onto a fresh copy of the backbone."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..config import HalrpConfig
from ..files.serialization import backbone_fingerprint, load_task_tensors
from ..files.storage import (
    BASE_NAME,
    WEIGHTS_NAME,
    read_evidence,
    read_index,
    read_signature,
    read_task_config,
    read_tensors,
    shared_index_lock,
)
from .model import HalrpModel


def load(
    model: nn.Module,
    path_or_repo_id: str | os.PathLike,
    tasks: Sequence[str] | None = None,
    revision: str | None = None,
    **hub_kwargs: Any,
) -> HalrpModel:
    """Attach HALRP to `model` (if not yet) and restore `tasks` (default: all) from a folder or
    a Hugging Face Hub repo id; return the handle. Only the requested tasks' files are read
    (and downloaded, from the Hub, at `revision`).

    Everything is checked before the model changes: the backbone's fingerprint and shapes,
    each task's config and tensors. On any error the model is left as it was. Each task's
    signature, when it was saved with one, comes back too, so `predict_tasks` and
    `task_ids="auto"` choose among the loaded tasks.

    Example (a Hub repo; a local folder works the same)::

        import halrp_adapt, timm
        vit = timm.create_model("vit_small_patch16_224", pretrained=True)
        cl = halrp_adapt.load(vit, "my-org/vit-s-split-imagenet", tasks=["task3"])
        with cl.task("task3"):
            logits = cl(images)
    """
    from ..files.hub import resolve_source

    if isinstance(tasks, str):
        tasks = [tasks]
    root, trusted = resolve_source(path_or_repo_id, tasks, revision, **hub_kwargs)
    with shared_index_lock(root):
        index = read_index(root, trusted)
        names = list(index["tasks"]) if tasks is None else list(tasks)
        missing = [t for t in names if t not in index["tasks"]]
        if missing:
            raise ValueError(
                f"`tasks`: {missing} are not in {path_or_repo_id}; it holds {index['tasks']}."
            )
        configs = {t: read_task_config(root, t, trusted) for t in names}
        tensors = {t: read_tensors(root / t / WEIGHTS_NAME, trusted) for t in names}
        signatures = {t: read_signature(root, t, trusted) for t in names}
        evidences = {t: read_evidence(root, t, trusted) for t in names}
        base = read_tensors(root / BASE_NAME, trusted) if index.get("base_weights") else None

    handle = HalrpModel.of(model)
    created = handle is None
    previous_base: dict[str, Any] = {}
    if handle is None:  # same test as `created`, written so that `handle` is narrowed
        options = HalrpConfig.from_options(**index["options"])
        _check_backbone(model, options, index, base)
        if base is not None:
            previous_base = {
                k: v.detach().clone() for k, v in model.state_dict().items() if k in base
            }
            model.load_state_dict(base, strict=False)
        handle = HalrpModel(model, options)
    elif backbone_fingerprint(handle.model, handle.head_name) != index["backbone"]["fingerprint"]:
        raise ValueError(
            f"{path_or_repo_id} was saved on another backbone than the one attached to `model`."
        )
    added: list[str] = []
    try:
        for name in names:
            handle.add_task_from_config(name, configs[name])
            added.append(name)
            load_task_tensors(handle, name, tensors[name], source=str(root / name / WEIGHTS_NAME))
            handle._tasks[name].signature = signatures[name]
            handle._tasks[name].evidence = evidences[name]
    except BaseException:
        for name in added:
            handle.delete_task(name)
        if created:
            handle.unload().load_state_dict(previous_base, strict=False)
        raise
    return handle


def _check_backbone(
    model: nn.Module, options: HalrpConfig, index: dict[str, Any], base: dict[str, Any] | None
) -> None:
    """Raise ValueError, before anything changes, if `model` is not the shelf's backbone."""
    from ..adapters.heads import find_head
    from ..files.serialization import backbone_state

    head = find_head(model, options.head_module)
    state = backbone_state(model, head)
    expected_class = index["backbone"]["class"]
    here_class = f"{type(model).__module__}.{type(model).__qualname__}"
    if base is not None:
        wrong = [
            k for k, v in base.items() if k not in state or tuple(state[k].shape) != tuple(v.shape)
        ]
        if wrong or len(base) != len(state):
            raise ValueError(
                f"the shelf's backbone weights ({BASE_NAME}) do not fit `model` "
                f"({here_class}, saved from {expected_class}): first mismatch "
                f"{(wrong or sorted(set(state) - set(base)))[:3]}."
            )
        return
    here = backbone_fingerprint(model, head)
    if here != index["backbone"]["fingerprint"]:
        raise ValueError(
            f"`model` is not the backbone these tasks were saved on: it is a {here_class} "
            f"whose frozen weights have fingerprint {here[:12]}..., the shelf was saved from a "
            f"{expected_class} with fingerprint {index['backbone']['fingerprint'][:12]}... "
            "(another architecture, other pretrained weights, or a changed model)."
        )
