"""Default loss and batch handling for rank estimation: tuples `(x, y)` and dict batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[nn.Module, Any], Tensor]
LABEL_KEYS = ("labels", "label")


def move_to(batch: Any, device: torch.device) -> Any:
    """`batch` with every tensor inside moved to `device`."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading size of its first tensor."""
    if isinstance(batch, Tensor):
        return batch.shape[0]
    values = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, Tensor):
            return v.shape[0]
    raise TypeError("cannot tell the batch size: the batch holds no tensor.")


def logits_of(output: Any) -> Tensor:
    """Logits from a plain tensor, a transformers ModelOutput or a tuple."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; "
        "pass `loss_fn(model, batch)`."
    )


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def batch_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The model's positional and keyword inputs in a batch: `(x, y, ...)` gives `x`, a dict
    its entries without the label keys, a tensor itself."""
    if isinstance(batch, Mapping):
        return (), {k: v for k, v in batch.items() if k not in LABEL_KEYS}
    if isinstance(batch, (list, tuple)) and batch:
        return (batch[0],), {}
    if isinstance(batch, Tensor):
        return (batch,), {}
    raise TypeError(
        f"a batch must be a tensor, a tuple `(inputs, ...)` or a dict of model inputs; got "
        f"{type(batch).__name__}."
    )


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """`model`'s output on a batch's inputs (see `batch_inputs`)."""
    args, kwargs = batch_inputs(move_to(batch, device_of(model)))
    return model(*args, **kwargs)


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """Cross-entropy of `model` on a batch: `(x, y)` or a dict with `labels`/`label`.

    Dict batches are passed as keyword arguments without their labels, and the loss is taken on
    the logits, so a per-task head with its own number of classes works with any HF model.
    """
    batch = move_to(batch, device_of(model))
    if isinstance(batch, Mapping):
        key = next((k for k in LABEL_KEYS if k in batch), None)
        if key is None:
            raise ValueError(
                f"a dict batch needs one of the keys {LABEL_KEYS} for the default "
                "loss; pass `loss_fn(model, batch)` otherwise."
            )
        labels = batch[key]
        logits = logits_of(model(**{k: v for k, v in batch.items() if k not in LABEL_KEYS}))
    elif isinstance(batch, (list, tuple)) and len(batch) >= 2:
        labels = batch[1]
        logits = logits_of(model(batch[0]))
    else:
        raise TypeError(
            "the default loss takes batches `(inputs, labels)` or dicts with "
            f"'labels'; got {type(batch).__name__}. Pass `loss_fn(model, batch)`."
        )
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
