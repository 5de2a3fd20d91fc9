"""Task-agnostic inference: find each input's task from the task signatures, then route it.

Features are the classifier head's input (averaged over positions when the head sees a
sequence), caught by a forward pre-hook on the head, so any model with a head works unchanged.
Two designs, chosen per attachment by `HalrpConfig.task_signature`:

- "backbone" (default): the frozen backbone's features. One extra forward (with no task
  active) gives every sample's features; all tasks' prototypes share one space and one pooled
  covariance. Auto routing costs that pass plus one forward per task present.
- "task": each task's own adapted features, scored against that task's prototypes with its
  own covariance. One forward per loaded task, so the cost grows with the tasks.

`benchmarks/class_incremental.py` measures both; see benchmarks/README.md for the figures that
chose the default.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..method.losses import LABEL_KEYS, batch_inputs, device_of, move_to
from ..method.task_signature import PrototypeScorer, SignatureAccumulator, TaskSignature
from .mixed import forward_tasks

if TYPE_CHECKING:
    from .model import HalrpModel


def batch_labels(batch: Any) -> Tensor | None:
    """A batch's class labels: the second entry of a tuple, a dict's `labels`/`label`."""
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        return batch[key] if key is not None else None
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    return None


def head_features(handle: HalrpModel, task: str | None, *args: Any, **kwargs: Any) -> Tensor:
    """The (batch, dim) input of the classifier head when the model runs through `task` (None:
    the frozen backbone), averaged over positions when the head sees more than 2 dims."""
    if handle.head_name is None:
        raise ValueError(
            "task retrieval reads the classifier head's input, and this model has no head "
            "(set `head_module` in attach)."
        )
    caught: list[Tensor] = []

    def catch(module: Any, inputs: tuple, kw: dict) -> None:
        value = inputs[0] if inputs else next(v for v in kw.values() if isinstance(v, Tensor))
        caught.append(value)

    hook = handle.model.get_submodule(handle.head_name).register_forward_pre_hook(
        catch, with_kwargs=True
    )
    try:
        with handle.task(task):
            handle.model(*args, **kwargs)
    finally:
        hook.remove()
    if not caught:
        raise RuntimeError("the model's forward never called its classifier head.")
    features = caught[-1]
    if features.dim() > 2:
        features = features.flatten(1, -2).mean(1)
    return features.detach()


@torch.no_grad()
def compute_signature(
    handle: HalrpModel,
    task: str,
    data: Iterable[Any],
    features: str,
    max_batches: int | None = None,
    rank: int | None = None,
) -> TaskSignature:
    """Task `task`'s signature from `data` (batches with labels), in eval mode, changing
    nothing in the model; its scatter cut to `rank` eigenpairs plus the diagonal (None: whole)."""
    accumulator = SignatureAccumulator()
    was_training = handle.model.training
    handle.model.eval()
    per_sample: bool | None = None  # decided on the first batch
    try:
        for batch in itertools.islice(data, max_batches):
            args, kwargs = batch_inputs(move_to(batch, device_of(handle)))
            x = head_features(handle, task if features == "task" else None, *args, **kwargs)
            labels = batch_labels(batch)
            if per_sample is None:
                # Labels that are not one per sample (a language model's token labels) are
                # not classes of the task: it then gets one prototype.
                per_sample = labels is not None and labels.numel() == x.shape[0]
            accumulator.update(x, labels if per_sample else None)
    finally:
        handle.model.train(was_training)
    return accumulator.finish(features).compressed(rank)


def scorer_for(handle: HalrpModel, device: torch.device) -> PrototypeScorer:
    """The prototype scorer of the handle's tasks, cached until the set of tasks changes."""
    tasks = handle.tasks
    signatures = {t: handle._tasks[t].signature for t in tasks}
    missing = [t for t, s in signatures.items() if s is None]
    if not tasks:
        raise ValueError("task retrieval needs at least one task.")
    if missing:
        having = [t for t in tasks if t not in missing]
        beside = f"; tasks with one: {having}" if having else ""
        raise ValueError(
            f"tasks {missing} have no task signature, so inputs cannot be routed to them"
            f"{beside}. A signature is made by end_task(calibration_data=...) with labelled "
            "batches; add one to a finished task with handle.add_signature(name, data), or "
            "load only tasks that have one (load(..., tasks=[...]))."
        )
    kinds = {s.features for s in signatures.values() if s is not None}
    if len(kinds) > 1:
        raise ValueError(
            f"the loaded tasks' signatures use different features ({sorted(kinds)}): "
            "retrieval needs one kind; load tasks saved with the same `task_signature`."
        )
    key = (tuple(tasks), tuple(id(s) for s in signatures.values()), str(device))
    cached = handle.__dict__.get("_retrieval_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    ordered = [s for s in signatures.values() if s is not None]
    scorer = PrototypeScorer(ordered, shared=kinds == {"backbone"}, device=device)
    handle.__dict__["_retrieval_cache"] = (key, scorer)
    return scorer


def predict_tasks(handle: HalrpModel, *args: Any, **kwargs: Any) -> Tensor:
    """Each sample's task, as an index into `handle.tasks` (see `HalrpModel.predict_tasks`)."""
    scorer = scorer_for(handle, device_of(handle))
    if scorer.shared:
        return scorer.predict_tasks(head_features(handle, None, *args, **kwargs))
    return scorer.predict_tasks([head_features(handle, t, *args, **kwargs) for t in handle.tasks])


def class_offsets(handle: HalrpModel) -> dict[str, tuple[int, int]]:
    """{task: (offset, classes)}: where each task's classes sit in the global class space, in
    the order the tasks were learned."""
    head = handle.task_head()
    offsets, start = {}, 0
    for task in handle.tasks:
        width = head.num_classes(task) if head is not None else None
        if width is None:
            raise ValueError(
                f"task {task!r} has no head of its own with a known number of classes, so it "
                "has no place in a global class space (attach with task_heads=True and give "
                "add_task a num_classes)."
            )
        offsets[task] = (start, width)
        start += width
    return offsets


def _class_logits(local: Tensor) -> Tensor:
    if local.dim() != 2:
        raise ValueError(
            f"task_ids='auto' gives class logits (batch, classes); this model's output is "
            f"{tuple(local.shape)}."
        )
    return local


def candidate_logits(
    handle: HalrpModel, candidates: int, *args: Any, **kwargs: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Each sample's `candidates` best tasks by the frozen features' task posterior, and the
    sample run through each: (task ids (batch, k), their log posteriors (batch, k), local
    logits (batch, k, classes), -inf past each task's classes)."""
    scorer = scorer_for(handle, device_of(handle))
    if not scorer.shared:
        raise ValueError(
            "retrieval_candidates > 1 needs task signatures of the frozen backbone's features "
            "(task_signature='backbone')."
        )
    log_tasks = scorer.task_log_posterior(head_features(handle, None, *args, **kwargs))
    top = log_tasks.topk(min(candidates, log_tasks.shape[1]), 1)
    inf = float("-inf")  # so that padding never adds to a head's softmax
    logits = [
        _class_logits(forward_tasks(handle, ids, *args, fill_value=inf, **kwargs))
        for ids in top.indices.T
    ]
    width = max(x.shape[1] for x in logits)
    logits = [torch.nn.functional.pad(x, (0, width - x.shape[1]), value=inf) for x in logits]
    return top.indices, top.values, torch.stack(logits, 1)


def checked_candidates(
    handle: HalrpModel, candidates: int, *args: Any, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """(task ids, local logits): of each sample's `candidates` best tasks
    (`candidate_logits`), the one with the highest `log p(task | x) + log max_c p_head(c | x)`:
    its own head's confidence re-checks the frozen features' guess in the task's adapted
    features."""
    ids, log_posterior, logits = candidate_logits(handle, candidates, *args, **kwargs)
    confidence = torch.log_softmax(logits.float(), 2).amax(2)
    pick = (log_posterior.to(confidence) + confidence).argmax(1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return ids.gather(1, pick.unsqueeze(1)).squeeze(1), logits[rows, pick]


def forward_auto(
    handle: HalrpModel,
    *args: Any,
    fill_value: float = float("-inf"),
    predicted: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Logits over every loaded task's classes: each sample through the task retrieval picks
    (or `predicted`, from `predict_tasks` already run on these inputs), its logits placed at
    that task's offset, `fill_value` elsewhere. With `retrieval_candidates` k > 1 (and no
    `predicted`), each sample's k best tasks are checked by their own heads
    (`checked_candidates`)."""
    offsets = class_offsets(handle)
    candidates = handle.config.retrieval_candidates
    if predicted is None and candidates > 1 and len(handle.tasks) > 1:
        ids, local = checked_candidates(handle, candidates, *args, **kwargs)
    else:
        ids = predict_tasks(handle, *args, **kwargs) if predicted is None else predicted
        local = _class_logits(forward_tasks(handle, ids, *args, fill_value=fill_value, **kwargs))
    result = local.new_full((local.shape[0], sum(w for _, w in offsets.values())), fill_value)
    ids = ids.to(local.device)
    for index in torch.unique(ids).tolist():
        start, width = offsets[handle.tasks[index]]
        rows = ids == index
        result[rows, start : start + width] = local[rows, :width]
    return result
