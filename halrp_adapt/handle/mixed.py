"""Batches that mix tasks: each sample runs through its own task's adapters and head.

Two ways, with equal outputs (to float rounding):
- one pass (the default in eval mode): the whole batch runs through the model once. Every
  adapted layer applies the shared base weight to all rows, `r[row] * (W0 (s[row] * x))`, with
  each row's own scales and bias gathered from the tasks present, then each task's low-rank
  part on its own rows; norms and heads run per task on their rows.
- grouped: the samples of each task are gathered into one sub-batch and run through that task
  in one forward, and the outputs scattered back to their rows: one forward per task present.
  Each row's output is then bit-identical to running its task alone on its samples. Train mode
  uses it (batch statistics are per task group), and so does a model that reshapes its batch
  dimension (windowed attention), where a layer cannot tell the rows apart.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from ..adapters.routing import RowRouting, RowRoutingUnsupported

if TYPE_CHECKING:
    from .model import HalrpModel

TaskIds = Tensor | Sequence[int] | Sequence[str]
STRATEGIES = ("auto", "one-pass", "grouped")


def forward_tasks(
    handle: HalrpModel,
    task_ids: TaskIds,
    *args: Any,
    fill_value: float = float("-inf"),
    strategy: str = "auto",
    **kwargs: Any,
) -> Tensor:
    """Run each sample of the batch through its own task; return the stacked outputs (logits).

    `task_ids` holds one entry per sample: an index into `handle.tasks` or a task name. When
    tasks have heads of different sizes, shorter rows are padded with `fill_value` (-inf, so
    that argmax and softmax ignore the padding). `strategy` (see the module docstring):
    "one-pass", "grouped", or "auto": one pass in eval mode where the model allows it,
    grouped otherwise.

    Example:
        >>> import torch, halrp_adapt
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 2))
        >>> cl = halrp_adapt.attach(net, budget=0.9)
        >>> for name, classes in (("a", 2), ("b", 3)):
        ...     cl.add_task(name, num_classes=classes); _ = cl.end_task()
        >>> out = cl.eval().forward_tasks(["a", "b", "a"], torch.randn(3, 4))
        >>> out.shape, bool(torch.isinf(out[0, 2]))
        (torch.Size([3, 3]), True)
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"`strategy` must be one of {list(STRATEGIES)}, got {strategy!r}.")
    batch = _batch_size(args, kwargs)
    ids = _task_indices(handle, task_ids, batch)
    one_task = ids.numel() > 0 and bool((ids == ids[0]).all())  # then a plain task forward
    if not one_task and (
        strategy == "one-pass" or (strategy == "auto" and not handle.model.training)
    ):
        try:
            return _one_pass(handle, ids, args, kwargs, fill_value)
        except RowRoutingUnsupported as error:
            if strategy == "one-pass":
                raise ValueError(
                    f"`strategy='one-pass'` cannot run this model: {error}; use "
                    "strategy='grouped' (or 'auto')."
                ) from error
    return _grouped(handle, ids, args, kwargs, fill_value)


def _one_pass(
    handle: HalrpModel, ids: Tensor, args: tuple, kwargs: dict, fill_value: float
) -> Tensor:
    device = _input_device(args, kwargs)
    present = torch.unique(ids).tolist()
    position = torch.full((len(handle.tasks),), -1, dtype=torch.long)
    position[present] = torch.arange(len(present))
    routing = RowRouting(
        tasks=[handle.tasks[i] for i in present],
        index=position[ids].to(device),
        rows=[torch.nonzero(ids == i).squeeze(1).to(device) for i in present],
        fill_value=fill_value,
    )
    with _routed_by_rows(handle, routing):
        out = handle.model(*args, **kwargs)
    return cast(Tensor, getattr(out, "logits", out))


@contextlib.contextmanager
def _routed_by_rows(handle: HalrpModel, routing: RowRouting) -> Iterator[None]:
    modules = list(handle._routed())
    for module in modules:
        module.row_routing = routing
    try:
        yield
    finally:
        for module in modules:
            module.row_routing = None


def _grouped(
    handle: HalrpModel, ids: Tensor, args: tuple, kwargs: dict, fill_value: float
) -> Tensor:
    batch = ids.numel()
    pieces = []
    for index in torch.unique(ids).tolist():
        rows = torch.nonzero(ids == index).squeeze(1)
        sub_args = [_take(a, rows, batch) for a in args]
        sub_kwargs = {k: _take(v, rows, batch) for k, v in kwargs.items()}
        with handle.task(handle.tasks[index]):
            out = handle.model(*sub_args, **sub_kwargs)
        pieces.append((rows, getattr(out, "logits", out)))
    width = max(out.shape[-1] for _, out in pieces)
    first = pieces[0][1]
    result = first.new_full((batch, *first.shape[1:-1], width), fill_value)
    for rows, out in pieces:
        result[rows.to(result.device), ..., : out.shape[-1]] = out
    return result


def _task_indices(handle: HalrpModel, task_ids: TaskIds, batch: int) -> Tensor:
    names = handle.tasks
    if isinstance(task_ids, Tensor):
        ids = task_ids.detach().to("cpu").reshape(-1)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(
                f"`task_ids` must hold integer task indices or task names, got a "
                f"{ids.dtype} tensor."
            )
    else:
        values = list(task_ids)
        if values and all(isinstance(v, str) for v in values):
            task_names = cast(list[str], values)
            unknown = sorted({v for v in task_names if v not in names})
            if unknown:
                raise ValueError(f"`task_ids`: unknown tasks {unknown}; known tasks: {names}.")
            values = [names.index(v) for v in task_names]
        ids = torch.tensor(values, dtype=torch.long)
    if ids.numel() != batch:
        raise ValueError(f"`task_ids` must hold one entry per sample ({batch}), got {ids.numel()}.")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(names)):
        raise ValueError(
            f"`task_ids` must be in [0, {len(names)}) (indices into "
            f"handle.tasks: {names}), got {ids.tolist()}."
        )
    return ids.long()


def _batch_size(args: tuple, kwargs: dict) -> int:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise ValueError("forward_tasks needs at least one batched tensor input.")


def _input_device(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value.device
    return torch.device("cpu")


def _take(value: Any, rows: Tensor, batch: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    return value


BASE = "__base__"  # PEFT's name for rows that run through the backbone alone


@contextlib.contextmanager
def rows_routed_by_adapter(
    handle: HalrpModel, adapter_names: Any, args: tuple, kwargs: dict, training: bool
) -> Iterator[None]:
    """PEFT's `adapter_names=[...]` (one adapter name per sample, "__base__" for the backbone):
    every forward inside the block (a whole `generate` too) routes each row through its own
    task in one pass. PEFT's errors: training mode, a name that is no adapter, a list whose
    length is not the batch's. With beam search (`num_beams` > 1) each name covers its beams."""
    if training:
        raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE and n not in handle.tasks})
    if unknown:
        raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}")
    batch = _first_batch_size(args, kwargs)
    if batch is not None and batch != len(names):
        raise ValueError(
            "Length of `adapter_names` should be the same as the number of inputs, but got "
            f"{len(names)} and {batch} respectively."
        )
    beams = kwargs.get("num_beams")
    if isinstance(beams, int) and beams > 1:
        names = [n for n in names for _ in range(beams)]
    present: list[str | None] = []
    for n in names:
        task = None if n == BASE else n
        if task not in present:
            present.append(task)
    device = _input_device(args, kwargs)
    index = torch.tensor([present.index(None if n == BASE else n) for n in names])
    routing = RowRouting(
        tasks=present,
        index=index.to(device),
        rows=[torch.nonzero(index == i).squeeze(1).to(device) for i in range(len(present))],
    )
    try:
        with _routed_by_rows(handle, routing):
            yield
    except RowRoutingUnsupported as error:
        raise ValueError(
            f"`adapter_names` needs every adapted layer to see the batch's rows: {error}. Run "
            "each adapter's samples in their own batch (set_adapter), or halrp.forward_tasks("
            "..., strategy='grouped')."
        ) from error


def _first_batch_size(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    return None
