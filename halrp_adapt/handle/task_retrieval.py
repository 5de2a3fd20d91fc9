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

import contextlib
import itertools
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..method.losses import LABEL_KEYS, batch_inputs, device_of, move_to
from ..method.task_evidence import TaskEvidence
from ..method.task_signature import PrototypeScorer, SignatureAccumulator, TaskSignature
from .mixed import _take, forward_tasks

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


@contextlib.contextmanager
def _head_inputs(handle: HalrpModel) -> Iterator[list[Tensor]]:
    """Inside the block, the classifier head's inputs of every forward are appended to the
    list it yields."""
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
        yield caught
    finally:
        hook.remove()


def _pooled(caught: list[Tensor]) -> Tensor:
    if not caught:
        raise RuntimeError("the model's forward never called its classifier head.")
    features = caught[-1]
    if features.dim() > 2:
        features = features.flatten(1, -2).mean(1)
    return features.detach()


def head_features(handle: HalrpModel, task: str | None, *args: Any, **kwargs: Any) -> Tensor:
    """The (batch, dim) input of the classifier head when the model runs through `task` (None:
    the frozen backbone), averaged over positions when the head sees more than 2 dims."""
    with _head_inputs(handle) as caught, handle.task(task):
        handle.model(*args, **kwargs)
    return _pooled(caught)


def routed_features(
    handle: HalrpModel, task_ids: Tensor, *args: Any, fill_value: float, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """(head inputs, logits) of each sample run through its own task (`forward_tasks`), the
    head inputs caught in that same forward (once, or once per task group on the grouped
    path); a head called any other way costs one more forward per task present."""
    with _head_inputs(handle) as caught:
        logits = forward_tasks(handle, task_ids, *args, fill_value=fill_value, **kwargs)
    if len(caught) == 1 and caught[0].shape[0] == logits.shape[0]:
        return _pooled(caught), logits
    # The grouped path (`mixed._grouped`) ran the head once per task, in `unique` order.
    batch = logits.shape[0]
    groups = [torch.nonzero(task_ids == i).squeeze(1) for i in torch.unique(task_ids).tolist()]
    if len(caught) == len(groups) and all(
        c.shape[0] == len(rows) for c, rows in zip(caught, groups, strict=True)
    ):
        parts = [_pooled([c]) for c in caught]
    else:  # a head called some other way: read each group's input with its own forward
        parts = [
            head_features(
                handle,
                handle.tasks[int(task_ids[rows[0]])],
                *[_take(a, rows, batch) for a in args],
                **{k: _take(v, rows, batch) for k, v in kwargs.items()},
            )
            for rows in groups
        ]
    features = parts[0].new_zeros(batch, parts[0].shape[1])
    for rows, part in zip(groups, parts, strict=True):
        features[rows.to(part.device)] = part
    return features, logits


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


@torch.no_grad()
def compute_evidence(
    handle: HalrpModel,
    task: str,
    data: Iterable[Any],
    held_out: Iterable[Any] | None = None,
    max_batches: int | None = None,
    rank: int | None = None,
) -> TaskEvidence | None:
    """Task `task`'s evidence: its own-feature statistics from `data` (labelled batches), its
    readings' moments from `held_out` (its validation batches; None: `data` again, which reads
    a little more confident than unseen inputs do), in eval mode, changing nothing. None when
    the model's output is not (batch, classes) logits, where `task_ids="auto"` does not apply."""
    features, logits = [], []
    was_training = handle.model.training
    handle.model.eval()
    try:
        for batch in itertools.islice(data if held_out is None else held_out, max_batches):
            args, kwargs = batch_inputs(move_to(batch, device_of(handle)))
            with _head_inputs(handle) as caught, handle.task(task):
                out = handle.model(*args, **kwargs)
            output = getattr(out, "logits", out)
            if output.dim() != 2:  # not class logits (a language model): auto does not apply
                return None
            features.append(_pooled(caught))
            logits.append(output.detach())
    finally:
        handle.model.train(was_training)
    if not features:
        raise ValueError("no batch reached the task evidence (empty held-out data).")
    own = compute_signature(handle, task, data, "task", max_batches, rank)
    return TaskEvidence.calibrated(own, torch.cat(features), torch.cat(logits))


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


# The frozen log posterior and the candidates' evidence (a sum of two z-scores) are added with
# this weight, chosen on study 10 (benchmarks/README.md, section 10): weight 10 did worse on all
# four sequences, weight 1 on the three pretrained backbones (better on the from-scratch ViT).
EVIDENCE_WEIGHT = 3.0


def evidence_for(
    handle: HalrpModel, device: torch.device
) -> list[tuple[TaskEvidence, PrototypeScorer]] | None:
    """[(evidence, its scorer)] per loaded task, in task order, cached until the tasks change;
    None when a task has none (saved by an older version, or ended without data)."""
    evidences = [handle._tasks[t].evidence for t in handle.tasks]
    present = [e for e in evidences if e is not None]
    if len(present) < len(evidences):
        return None
    key = (tuple(handle.tasks), tuple(id(e) for e in present), str(device))
    cached = handle.__dict__.get("_evidence_cache")
    if cached is not None and cached[0] == key:
        return cached[1]
    pairs = [(e, e.scorer(device)) for e in present]
    handle.__dict__["_evidence_cache"] = (key, pairs)
    return pairs


def candidate_logits(
    handle: HalrpModel, candidates: int, *args: Any, check_below: float = 2.0, **kwargs: Any
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Each sample's `candidates` best tasks by the frozen features' task posterior, and the
    sample run through each: (task ids (batch, k), their log posteriors (batch, k), local
    logits (batch, k, classes), -inf past each task's classes, evidence (batch, k)). Only
    samples whose best posterior is below `check_below` run through candidates after the
    first; the others' later columns are -inf logits and -inf evidence. Evidence is -inf
    throughout when a loaded task has none (`TaskEvidence`)."""
    scorer = scorer_for(handle, device_of(handle))
    if not scorer.shared:
        raise ValueError(
            "retrieval_candidates > 1 needs task signatures of the frozen backbone's features "
            "(task_signature='backbone')."
        )
    log_tasks = scorer.task_log_posterior(head_features(handle, None, *args, **kwargs))
    top = log_tasks.topk(min(candidates, log_tasks.shape[1]), 1)
    evidence = evidence_for(handle, log_tasks.device)
    batch = log_tasks.shape[0]
    unsure = torch.nonzero(top.values[:, 0].exp() < check_below).squeeze(1)
    inf = float("-inf")  # so that padding never adds to a head's softmax
    logits: list[Tensor | None] = []
    scores: list[Tensor] = []
    for column, ids in enumerate(top.indices.T):
        rows = torch.arange(batch, device=ids.device) if column == 0 else unsure
        if rows.numel() == 0:
            logits.append(None)
            scores.append(log_tasks.new_full((batch,), inf))
            continue
        sub_args = [_take(a, rows, batch) for a in args]
        sub_kwargs = {k: _take(v, rows, batch) for k, v in kwargs.items()}
        sub_ids = ids[rows]
        features, local = routed_features(handle, sub_ids, *sub_args, fill_value=inf, **sub_kwargs)
        local = _class_logits(local)
        full = local.new_full((batch, local.shape[1]), inf)
        full[rows.to(local.device)] = local
        logits.append(full)
        score = log_tasks.new_full((batch,), inf)
        if evidence is not None:
            for index in torch.unique(sub_ids).tolist():
                mine = sub_ids == index
                value, task_scorer = evidence[index]
                score[rows[mine]] = value.score(
                    features[mine.to(features.device)],
                    local[mine.to(local.device)],
                    task_scorer,
                ).to(score)
        scores.append(score)
    first = logits[0]
    assert first is not None  # the first candidate runs for every sample
    width = max(x.shape[1] for x in logits if x is not None)
    filled = [
        first.new_full((batch, width), inf)
        if x is None
        else torch.nn.functional.pad(x, (0, width - x.shape[1]), value=inf)
        for x in logits
    ]
    return top.indices, top.values, torch.stack(filled, 1), torch.stack(scores, 1)


def checked_candidates(
    handle: HalrpModel, candidates: int, *args: Any, **kwargs: Any
) -> tuple[Tensor, Tensor]:
    """(task ids, local logits): of each sample's `candidates` best tasks
    (`candidate_logits`), the one with the highest `log p(task | x) + EVIDENCE_WEIGHT *
    evidence`, where the evidence (`TaskEvidence`) says, in the candidate's own adapted
    features and head, how typical the input is of that task. Samples whose best posterior
    reaches `retrieval_check_below` keep their first candidate."""
    ids, log_posterior, logits, evidence = candidate_logits(
        handle, candidates, *args, check_below=handle.config.retrieval_check_below, **kwargs
    )
    pick = (log_posterior.to(evidence) + EVIDENCE_WEIGHT * evidence).argmax(1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return ids.gather(1, pick.unsqueeze(1)).squeeze(1), logits[rows, pick.to(logits.device)]


def _warn_no_evidence(handle: HalrpModel) -> None:
    missing = [t for t in handle.tasks if handle._tasks[t].evidence is None]
    if missing and not handle.__dict__.get("_warned_no_evidence"):
        handle.__dict__["_warned_no_evidence"] = True
        warnings.warn(
            f"tasks {missing} have no task evidence (saved by an older version, or ended "
            "without calibration data), so task_ids='auto' trusts the frozen features alone "
            "(retrieval_candidates=1), as before; handle.add_evidence(name, data) gives a task "
            "its evidence.",
            UserWarning,
            stacklevel=3,
        )


def forward_auto(
    handle: HalrpModel,
    *args: Any,
    fill_value: float = float("-inf"),
    predicted: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Logits over every loaded task's classes: each sample through the task retrieval picks
    (or `predicted`, from `predict_tasks` already run on these inputs), its logits placed at
    that task's offset, `fill_value` elsewhere. With k = `retrieval_candidates` > 1 (and no
    `predicted`), the k best tasks of each sample not sure enough of its first are checked by
    their own evidence (`checked_candidates`)."""
    offsets = class_offsets(handle)
    candidates = handle.config.candidates
    if (
        candidates > 1
        and predicted is None
        and any(handle._tasks[t].evidence is None for t in handle.tasks)
    ):
        _warn_no_evidence(handle)
        candidates = 1
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
