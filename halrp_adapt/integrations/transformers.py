"""`HalrpTrainer`: a `transformers.Trainer` that learns one HALRP task.

Swap `Trainer(...)` for `HalrpTrainer(..., halrp_task="name")` in an existing script: before
training it attaches HALRP (once per model), adds the task and estimates its ranks on the
Trainer's own train dataloader with the model's own loss; while training it adds the
regularisation to the loss; after training it prunes and freezes the task and, with
`halrp_save_directory`, saves the task adapter with `save_pretrained`. Call it again on the same
model with another `halrp_task` for the next task: earlier tasks never change.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ..adapters.routing import check_task_name
from ..handle.attach import attach
from ..handle.model import HalrpModel
from ..method.losses import default_loss, logits_of, move_to


class HalrpTrainer(Trainer):
    """`transformers.Trainer` for one HALRP task of a continual sequence.

    Example::

        from halrp_adapt.integrations import HalrpTrainer
        for name, dataset, labels in tasks:
            trainer = HalrpTrainer(model=model, args=args, train_dataset=dataset,
                                   halrp_task=name, halrp_num_classes=labels,
                                   halrp_budget=0.05, halrp_save_directory="shelf/")
            trainer.train()
        handle = trainer.halrp              # the HalrpModel: set_task, report, push_to_hub ...
    """

    def __init__(
        self,
        model: Any = None,
        args: Any = None,
        *,
        halrp_task: str,
        halrp_budget: float = 0.05,
        halrp_num_classes: int | None = None,
        halrp_save_directory: str | None = None,
        halrp_trial_steps: int | None = None,
        halrp_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("`model` is required: HalrpTrainer adapts the model you pass.")
        self.halrp_task = check_task_name(halrp_task)
        handle = HalrpModel.of(model)
        if handle is None:
            handle = attach(model, budget=halrp_budget, **(halrp_options or {}))
        elif halrp_options:
            raise ValueError(
                "`halrp_options` apply when HALRP is first attached; this model "
                "already has it (its options are fixed)."
            )
        if halrp_task in handle.tasks and handle._tasks[halrp_task].finished:
            raise ValueError(
                f"`halrp_task`: task {halrp_task!r} is already learned; existing "
                f"tasks: {handle.tasks}."
            )
        self.halrp = handle
        self.halrp_num_classes = halrp_num_classes
        self.halrp_save_directory = halrp_save_directory
        self.halrp_trial_steps = halrp_trial_steps
        super().__init__(model=model, args=args, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Add and estimate the task, train it (regularised), then prune, freeze and save it."""
        handle, task = self.halrp, self.halrp_task
        if task not in handle.tasks:
            handle.add_task(task, num_classes=self.halrp_num_classes)
            if not handle._tasks[task].trains_base:
                handle.estimate_ranks(
                    self.get_train_dataloader(),
                    loss_fn=self._halrp_loss,
                    steps=self.halrp_trial_steps,
                )
            self.optimizer, self.lr_scheduler = None, None  # built on the task's parameters
        output = super().train(*args, **kwargs)
        # Norms with running statistics (BatchNorm) get them recomputed with the final
        # weights; a model without any (LayerNorm only) skips the pass.
        # The validation set, when there is one, standardises the task's evidence.
        single = self.eval_dataset is not None and not isinstance(self.eval_dataset, dict)
        held_out = self.get_eval_dataloader() if single else None
        stats = handle.end_task(
            calibration_data=self.get_train_dataloader(), held_out_data=held_out
        )
        self.log(
            {
                "halrp_growth": stats.growth,
                "halrp_mean_rank": sum(stats.ranks.values()) / max(len(stats.ranks), 1),
            }
        )
        if self.halrp_save_directory is not None and self.is_world_process_zero():
            handle.save_pretrained(self.halrp_save_directory, tasks=[task])
        return output

    # `num_items_in_batch` (absent in older transformers) is passed through **kwargs.
    def compute_loss(  # type: ignore[override]
        self, model: Any, inputs: Any, return_outputs: bool = False, **kwargs: Any
    ) -> Any:
        if self.halrp.task_head() is not None and "labels" in inputs:
            # A per-task head may have another class count than the model's config, which the
            # model's own loss would use: take cross-entropy on the logits instead.
            labels = inputs["labels"]
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            loss = torch.nn.functional.cross_entropy(logits_of(outputs), labels)
        else:
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if self.halrp.open_task is not None and model.training:
            loss = loss + self.halrp.regularization_loss()
        return (loss, outputs) if return_outputs else loss

    def _halrp_loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """The trial's and the Fisher pass's loss: as `compute_loss`, without regularisation."""
        if self.halrp.task_head() is not None:
            return default_loss(model, batch)
        device = next(model.parameters()).device
        output = model(**move_to(batch, device))
        if getattr(output, "loss", None) is None:
            raise ValueError("the model returned no loss: its batches need `labels`.")
        return output.loss
