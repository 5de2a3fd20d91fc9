"""What the scripts in `recipes/` share: arguments, their checks, and the run itself.

Every check runs before any training, and a bad argument ends the script with one line naming
the argument and what is allowed (argparse's `error`).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import HalrpConfig
from ..data.task_splits import TaskData
from ..handle.attach import attach


def recipe_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the recipe docstring's first line, the rest its epilog."""
    lines = doc.strip().splitlines()
    return argparse.ArgumentParser(
        description=lines[0],
        epilog="\n".join(lines[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_training_args(
    parser: argparse.ArgumentParser,
    *,
    epochs: int | None,
    batch_size: int,
    lr: float,
    budget: float,
    output_dir: str,
) -> None:
    group = parser.add_argument_group("training")
    group.add_argument(
        "--epochs",
        type=int,
        default=epochs,
        help="epochs per task" + ("" if epochs else " (default: the recipe's)"),
    )
    group.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help="global batch size, split over the processes",
    )
    group.add_argument("--lr", type=float, default=lr, help="Adam learning rate")
    group.add_argument(
        "--lr-decay",
        type=float,
        default=None,
        help="per-step learning-rate multiplier (the reference's gamma)",
    )
    group.add_argument(
        "--budget",
        type=float,
        default=budget,
        help="most parameters a task may add, as a share of the backbone's",
    )
    group.add_argument(
        "--trial-epochs",
        type=int,
        default=1,
        help="epochs of the rank-estimation trial (estRank_epoch)",
    )
    group.add_argument(
        "--trial-steps", type=int, default=None, help="cap the trial at this many steps"
    )
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms: the same command gives bit-identical "
        "results (slower on GPU)",
    )
    group.add_argument(
        "--output-dir",
        default=output_dir,
        help="adapters, metrics, plots; rerun the same command to resume",
    )
    group.add_argument(
        "--scenario",
        choices=["task-incremental", "class-incremental"],
        default="task-incremental",
        help="task-incremental: each test sample is scored with its task's name given; "
        "class-incremental: also without it, over every class seen so far (each sample's task "
        "found from the task signatures), with task retrieval's accuracy",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    group.add_argument(
        "--log-with",
        choices=["tensorboard", "wandb", "mlflow", "all"],
        default=None,
        help="experiment tracker(s), through Accelerate; TensorBoard files go to OUTPUT_DIR/halrp",
    )
    group.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the frozen backbone over the processes with FSDP2 (each task's parameters "
        "stay whole); implied by an Accelerate config with distributed_type FSDP",
    )
    group.add_argument(
        "--mixed-precision",
        choices=["no", "bf16", "fp16"],
        default=None,
        help="Accelerate's mixed precision (default: accelerate's config)",
    )


def check_output_dir(parser: argparse.ArgumentParser, path: str) -> None:
    target = Path(path).resolve()
    existing = target
    # A missing drive (Windows: `Z:\runs`) has no existing ancestor: its root is its own parent.
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.exists():
        parser.error(f"--output-dir {path}: neither it nor any folder above it exists")
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        parser.error(f"--output-dir {path}: {existing} is not a writable folder")


def check_training_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("epochs", "batch_size", "trial_epochs"):
        if getattr(args, name) < (0 if name == "trial_epochs" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.budget <= 1:
        parser.error(f"--budget must be in (0, 1], got {args.budget}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    check_output_dir(parser, args.output_dir)
    check_run_dependencies(parser, args)


def seed_run(args: argparse.Namespace) -> None:
    """Seed everything (and switch to deterministic algorithms with `--deterministic`) before
    the recipe builds its model and data, so that its initial weights follow `--seed` too."""
    from .trainer import seed_everything

    seed_everything(args.seed, args.deterministic)


def check_run_dependencies(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Everything the run imports after training (plots, trackers) is importable now."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    from .reporting import check_plotting

    try:
        check_plotting()
    except ImportError as err:
        parser.error(str(err))
    available = {
        "tensorboard": is_tensorboard_available,
        "wandb": is_wandb_available,
        "mlflow": is_mlflow_available,
    }
    tracker = getattr(args, "log_with", None)
    if tracker in available and not available[tracker]():
        parser.error(
            f"--log-with {tracker} needs the {tracker} package: pip install "
            f'"halrp-adapt[{tracker}]" (or choose another of '
            f"{sorted(available)}, or 'all' for whichever are installed)"
        )


def check_timm_model(parser: argparse.ArgumentParser, name: str, prefix: str = "") -> None:
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"{prefix}*")[:8] if prefix else []
        parser.error(
            f"--model {name!r} is not a timm model"
            + (f"; e.g. {', '.join(close)}" if close else "")
        )


def run_tasks(
    args: argparse.Namespace,
    model: nn.Module,
    tasks: Sequence[TaskData],
    halrp_options: dict[str, Any] | None = None,
    loss_fn: Callable | None = None,
    epochs_after_trial: bool = False,
) -> dict[str, Any]:
    """Attach HALRP, run the ContinualTrainer under Accelerate, return the results."""
    from accelerate import Accelerator

    from .trainer import ContinualTrainer, TrainConfig

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=args.mixed_precision,
        log_with=getattr(args, "log_with", None),
        project_dir=args.output_dir,
    )
    options = {"budget": args.budget, "trial_epochs": args.trial_epochs, **(halrp_options or {})}
    handle = attach(model, config=HalrpConfig.from_options(**options))
    config = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        lr_decay=args.lr_decay,
        deterministic=args.deterministic,
        trial_steps=args.trial_steps,
        seed=args.seed,
        subtract_trial_epochs=epochs_after_trial,
    )
    trainer = ContinualTrainer(
        handle,
        tasks,
        config,
        accelerator=accelerator,
        output_dir=args.output_dir,
        loss_fn=loss_fn,
        progress=not args.no_progress,
        scenario=args.scenario,
        fsdp=True if getattr(args, "fsdp", False) else None,
    )
    results = trainer.run()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        # Leave no process group for interpreter-exit destructors to tear down mid-thread.
        torch.distributed.destroy_process_group()
    return results
