"""Experiment trackers through Accelerate's tracker API (TensorBoard, Weights & Biases, MLflow,
... whatever `Accelerator(log_with=...)` names): per-step loss, the accuracy row after each task,
ranks and growth, and the run's plots as images at the end. With no tracker it does nothing."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..handle.accounting import TaskStats

PLOTS = ("accuracy_matrix", "ranks", "growth", "class_incremental")


class RunTracker:
    """What `ContinualTrainer` sends to the accelerator's trackers, keyed as
    `train/loss`, `accuracy/<task>`, `accuracy/mean`, `growth/<task>`, `growth/total`,
    `ranks/<task>/mean`, `ranks/<task>/<layer>`, in the class-incremental scenario
    `class_incremental/accuracy` and `retrieval/accuracy`, and `plots/<name>`."""

    def __init__(self, accelerator: Accelerator, project: str) -> None:
        self.accelerator = accelerator
        self.project = project
        self.on = bool(getattr(accelerator, "log_with", None))
        self.step = 0

    def start(self, config: Any, options: dict[str, Any]) -> None:
        if self.on:
            flat = {
                f"train_{k}": v
                for k, v in dataclasses.asdict(config).items()
                if isinstance(v, (int, float, str, bool))
            }
            flat.update(
                {
                    f"halrp_{k}": v
                    for k, v in options.items()
                    if isinstance(v, (int, float, str, bool))
                }
            )
            self.accelerator.init_trackers(self.project, config=flat)

    def train_step(self, loss: float, task_index: int) -> None:
        if self.on:
            self.accelerator.log({"train/loss": loss, "train/task": task_index}, step=self.step)
        self.step += 1

    def task_done(
        self, tasks: list[str], row: list[float], name: str, stats: TaskStats, total_growth: float
    ) -> None:
        if not self.on:
            return
        values: dict[str, float] = {f"accuracy/{t}": a for t, a in zip(tasks, row, strict=False)}
        values["accuracy/mean"] = sum(row) / len(row)
        values[f"growth/{name}"] = stats.growth
        values["growth/total"] = total_growth
        ranks = stats.ranks
        values[f"ranks/{name}/mean"] = sum(ranks.values()) / max(len(ranks), 1)
        values.update({f"ranks/{name}/{layer}": r for layer, r in ranks.items()})
        self.accelerator.log(values, step=self.step)

    def class_incremental_done(self, seen_accuracy: float, retrieval: float) -> None:
        if self.on:
            values = {"class_incremental/accuracy": seen_accuracy, "retrieval/accuracy": retrieval}
            self.accelerator.log(values, step=self.step)

    def finish(self, output_dir: Path | None) -> None:
        if not self.on:
            return
        if output_dir is not None:
            try:
                self._log_plots(output_dir)
            except Exception as err:  # the run's files are written; never fail it here
                warnings.warn(
                    f"could not send the plots to the trackers: {type(err).__name__}: {err}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.accelerator.end_training()

    def _log_plots(self, output_dir: Path) -> None:
        import numpy as np
        from PIL import Image

        images = {
            f"plots/{name}": np.asarray(Image.open(output_dir / f"{name}.png").convert("RGB"))
            for name in PLOTS
            if (output_dir / f"{name}.png").is_file()
        }
        for tracker in self.accelerator.trackers:
            if images and hasattr(tracker, "log_images"):
                try:
                    tracker.log_images(images, step=self.step, dataformats="HWC")
                except TypeError:  # trackers whose log_images takes no dataformats
                    tracker.log_images(images, step=self.step)
