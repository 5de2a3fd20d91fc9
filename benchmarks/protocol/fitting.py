"""The training loop, scoring and compute accounting every method of a quality study shares.

Equal compute: `--epochs` is the number of passes over each task's training data that every
method gets. HALRP's trial fine-tune is one of them (the reference's way: its tasks after the
first train `n_epochs - estRank_epoch` epochs), so HALRP trains `epochs - trial_epochs` after
it; `passes` records what each method took.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from halrp_adapt.method.losses import default_loss, forward_batch, logits_of, move_to

TRIAL_EPOCHS = 1  # HALRP's trial fine-tune, counted in `--epochs`


def add_protocol_args(parser: argparse.ArgumentParser) -> None:
    """The protocol's settings that `make_sequence` and the training read (shared by every
    study built on these sequences)."""
    parser.add_argument("--epochs", type=int, default=2,
                        help="passes over each task's training data, for every method; "
                             "HALRP's trial pass counts (it trains epochs - 1 after it)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--data", choices=["embedded", "full"], default="embedded")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tasks", type=int, default=None,
                        help="learn only the first N tasks of each sequence")
    parser.add_argument("--max-train-batches", type=int, default=None,
                        help="at most N training batches per task")


def halrp_epochs(args: Any, trains_base: bool, trial: int = TRIAL_EPOCHS) -> tuple[int, int]:
    """(trial epochs, training epochs) of one HALRP task within `args.epochs` passes; a task
    that trains the backbone itself has no trial. A trial of every pass leaves none after it
    (the task keeps the trial's scales, biases, norms and head, and the SVD of its factors)."""
    if trains_base:
        return 0, args.epochs
    if args.epochs < trial:
        raise SystemExit(f"--epochs {args.epochs}: HALRP's trial takes {trial} of the passes, "
                         f"so at equal compute every method needs at least {trial}")
    return trial, args.epochs - trial


def on(batch: Any, device: torch.device) -> Any:
    return move_to(batch, device)


@torch.no_grad()
def accuracy(model: nn.Module, data: list, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for batch in data:
        batch = on(batch, device)
        labels = batch["labels"] if isinstance(batch, dict) else batch[1]
        logits = logits_of(forward_batch(model, batch))
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / total


def fit(model: nn.Module, groups: list[dict], data: list, epochs: int, device: torch.device,
        extra_loss: Callable[[], torch.Tensor] | None = None,
        after_step: Callable[[int], None] | None = None,
        frozen_norms: Sequence[nn.Module] = ()) -> None:
    """Adam over `groups` for `epochs` passes over `data`. `frozen_norms` stay in eval mode
    (a peer too small for its own norm statistics uses the base's, unchanged)."""
    optimizer = torch.optim.Adam(groups)
    model.train()
    for norm in frozen_norms:
        norm.eval()
    step = 0
    for _ in range(epochs):
        for batch in data:
            loss = default_loss(model, on(batch, device))
            if extra_loss is not None:
                loss = loss + extra_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            step += 1


def recalibrate(model: nn.Module, data: list, device: torch.device) -> None:
    """BatchNorm statistics recomputed with the final weights (what HALRP's end_task does)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        update_bn([on(b, device)[0] for b in data], model)


def norm_names(model: nn.Module) -> list[str]:
    kinds = (nn.modules.batchnorm._NormBase, nn.LayerNorm)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


__all__ = ["TRIAL_EPOCHS", "accuracy", "add_protocol_args", "fit", "halrp_epochs", "logits_of",
           "norm_names", "on", "recalibrate"]
