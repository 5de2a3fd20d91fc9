"""`ContinualTrainer`: learn a sequence of tasks with HALRP through Accelerate.

For each task: add_task, estimate_ranks (on the main process, then broadcast), train with the
regularisation, end_task (prune), evaluate every task seen so far, save that task's adapter,
write the metrics. Each task re-prepares the model with the accelerator (the trainable
parameters change from task to task), saves on the main process only, evaluates with
`gather_for_metrics`, and keeps the global batch size whatever the number of processes.
Under FSDP (`fsdp=True`, or an accelerator whose distributed type is FSDP) the frozen backbone
is sharded once instead (`sharding.py`) and the task's whole parameters averaged here.

A run writes into `output_dir`: `adapters/` (the shelf of tasks), `metrics.json`,
`accuracy_matrix.csv`, `tasks.csv`, `ranks.csv`, PNG plots, and `trainer_state.json`, from
which the same command resumes after the last finished task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast, broadcast_object_list, set_seed
from torch.utils.data import DataLoader

from ..data.task_splits import TaskData
from ..files.serialization import _live_task_tensors, is_sharded
from ..handle.model import HalrpModel
from ..handle.task_retrieval import forward_auto
from ..method.losses import LossFn, default_loss, logits_of, move_to
from .sharding import average_gradients, block_classes, full_weights, shard_backbone
from .tracking import RunTracker

STATE_NAME = "trainer_state.json"
SCENARIOS = ("task-incremental", "class-incremental")


@dataclass
class TrainConfig:
    """How each task is trained. Defaults: the reference's PMNIST script (Adam 1e-3, batch 128)."""

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128  # global: split over the processes
    eval_batch_size: int = 256
    lr_decay: float | None = None  # per-step multiplier (the reference's gamma); None: none
    trial_epochs: int | None = None  # None: the HalrpConfig's
    trial_steps: int | None = None
    seed: int = 0
    num_workers: int = 0
    grad_clip: float | None = None
    save_adapters: bool = True
    # The reference trains tasks after the first for `epochs - trial epochs`: the trial has
    # already seen the data (its biases, norms and head carry over).
    subtract_trial_epochs: bool = False
    # Deterministic algorithms: two runs give bit-identical accuracy matrices (slower on GPU).
    deterministic: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
        if not self.lr > 0:
            raise ValueError(f"`lr` must be > 0, got {self.lr}.")
        if self.lr_decay is not None and not 0 < self.lr_decay <= 1:
            raise ValueError(f"`lr_decay` must be in (0, 1], got {self.lr_decay}.")


@dataclass
class RunState:
    """What a run has done so far; written after every task, read to resume."""

    finished: list[str] = field(default_factory=list)
    matrix: list[list[float]] = field(default_factory=list)
    times: dict[str, dict[str, float]] = field(default_factory=dict)
    # class-incremental scenario: after each task, accuracy over every class seen so far on
    # each seen task's test data, over all of it, and how often retrieval found the task
    ci_matrix: list[list[float]] = field(default_factory=list)
    ci_seen: list[float] = field(default_factory=list)
    retrieval: list[float] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> RunState:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            finished=list(data["finished"]),
            matrix=[list(r) for r in data["matrix"]],
            times=dict(data["times"]),
            ci_matrix=[list(r) for r in data.get("ci_matrix", [])],
            ci_seen=list(data.get("ci_seen", [])),
            retrieval=list(data.get("retrieval", [])),
        )


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed `random`, numpy and torch (accelerate's `set_seed`); with `deterministic`, also make
    torch use deterministic algorithms (and cuBLAS a fixed workspace), so that two runs of the
    same command give bit-identical results.

    Example::

        seed_everything(0, deterministic=True)   # before building the model
    """
    if deterministic:
        # cuBLAS refuses deterministic mode without a fixed workspace; read when CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_seed(seed % (2**32), deterministic=deterministic)


def _seed_worker(worker_id: int) -> None:
    # DataLoader seeds each worker's torch from its generator; numpy and random follow it.
    seed = torch.initial_seed() % (2**32)
    np.random.seed(seed)
    random.seed(seed)


class ContinualTrainer:
    """Runs a task sequence on a HALRP handle with an `accelerate.Accelerator`.

    Example:
        >>> import torch, halrp_adapt                                   # doctest: +ELLIPSIS
        >>> from halrp_adapt.training.trainer import ContinualTrainer, TrainConfig
        >>> from halrp_adapt.data.task_splits import embedded_fashion_mnist, split_into_tasks
        >>> train, test = embedded_fashion_mnist()
        >>> to_tensor = lambda im: torch.tensor(list(im.convert("L").getdata()),
        ...                                     dtype=torch.float32).view(1, 28, 28) / 255
        >>> tasks = split_into_tasks(train, test, 5, to_tensor)[:2]
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64),
        ...                           torch.nn.ReLU(), torch.nn.Linear(64, 10))
        >>> cl = halrp_adapt.attach(net, budget=0.5)
        >>> trainer = ContinualTrainer(cl, tasks, TrainConfig(epochs=1, batch_size=64),
        ...                            output_dir=None, progress=False, log=lambda *a: None)
        >>> result = trainer.run()
        >>> len(result["matrix"]), result["bwt"]
        (2, 0.0)
    """

    def __init__(
        self,
        handle: HalrpModel,
        tasks: Sequence[TaskData],
        config: TrainConfig,
        accelerator: Accelerator | None = None,
        output_dir: str | None = None,
        loss_fn: LossFn | None = None,
        progress: bool = True,
        log: Callable[..., None] | None = None,
        tracker_project: str = "halrp",
        scenario: str = "task-incremental",
        fsdp: bool | None = None,
    ) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"`scenario` must be one of {SCENARIOS}, got {scenario!r}.")
        if scenario == "class-incremental" and handle.config.task_signature is None:
            raise ValueError(
                "`scenario`='class-incremental' finds each input's task from the task "
                "signatures, and this model was attached with task_signature=None."
            )
        if not isinstance(handle, HalrpModel):
            raise TypeError(
                f"`handle` must come from halrp_adapt.attach, got {type(handle).__name__}."
            )
        names = [t.name for t in tasks]
        if len(set(names)) != len(names) or not names:
            raise ValueError(
                f"`tasks` must be a non-empty sequence with distinct names, got {names}."
            )
        self.handle, self.tasks, self.config = handle, list(tasks), config
        self.scenario = scenario
        self.accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
        n = self.accelerator.num_processes
        # FSDP: the backbone sharded (training/sharding.py); None follows the accelerator.
        self.fsdp = (
            self.accelerator.distributed_type == DistributedType.FSDP if fsdp is None else fsdp
        )
        if self.fsdp and n == 1:
            raise ValueError(
                "`fsdp`=True shards the backbone over several processes; start them with "
                "torchrun or accelerate launch (this run has one)."
            )
        if config.batch_size % n:
            raise ValueError(
                f"`batch_size` {config.batch_size} (global) must be divisible by the {n} processes."
            )
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.loss_fn = loss_fn or default_loss
        self.progress = progress and self.accelerator.is_local_main_process
        self._log = log or print
        self.state = RunState()
        self.tracker = RunTracker(self.accelerator, tracker_project)

    # ---- helpers -----------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.accelerator.is_main_process:
            self._log(message)

    def _loader(self, dataset: Any, train: bool, seed: int) -> DataLoader:
        per_process = self.config.batch_size if train else self.config.eval_batch_size
        if train:
            per_process //= self.accelerator.num_processes
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(
            dataset,
            batch_size=per_process,
            shuffle=train,
            generator=generator,
            num_workers=self.config.num_workers,
            worker_init_fn=_seed_worker,
            drop_last=False,
        )

    @property
    def adapters_dir(self) -> Path | None:
        return None if self.output_dir is None else self.output_dir / "adapters"

    # ---- resume ------------------------------------------------------------------------------
    def _resume(self) -> None:
        if self.output_dir is None or not (self.output_dir / STATE_NAME).exists():
            return
        state = RunState.read(self.output_dir / STATE_NAME)
        expected = [t.name for t in self.tasks[: len(state.finished)]]
        if state.finished != expected:
            raise ValueError(
                f"{self.output_dir} holds a run of tasks {state.finished}, not a "
                f"prefix of this run's {[t.name for t in self.tasks]}; use a new "
                "`output_dir`."
            )
        if state.finished:
            from ..handle.loading import load

            if self.handle.tasks:
                raise ValueError(
                    "resuming needs a handle without tasks: the finished tasks "
                    f"come from {self.adapters_dir}."
                )
            # Load onto the plain backbone, so that a backbone trained by the first task
            # (train_base) comes back from the shelf too.
            assert self.adapters_dir is not None  # output_dir is set
            self.handle = load(self.handle.unload(), self.adapters_dir, tasks=state.finished)
            self.handle.set_task(None)
        self.state = state
        self.log(f"resuming after {len(state.finished)} finished task(s): {state.finished}")

    # ---- one task ----------------------------------------------------------------------------
    def _estimate(self, task: TaskData, seed: int) -> None:
        """Rank estimation on the main process, then every process takes its result, so that
        all processes hold the very same ranks and initial factors."""
        acc, handle, name = self.accelerator, self.handle, task.name
        ranks: list[Any] = [None]
        if acc.is_main_process:
            loader = self._loader(task.train, train=True, seed=seed)
            fisher = None
            if task.val and handle.config.fisher == "pass":  # the reference: on validation
                fisher = self._loader(task.val, train=False, seed=seed)
            # the whole global batch on one process, as in a single-process run
            loader = DataLoader(
                loader.dataset,
                batch_size=self.config.batch_size,
                shuffle=True,
                generator=torch.Generator().manual_seed(seed),
                num_workers=self.config.num_workers,
            )
            ranks = [
                handle.estimate_ranks(
                    loader,
                    loss_fn=self.loss_fn,
                    fisher_data=fisher,
                    epochs=self.config.trial_epochs,
                    steps=self.config.trial_steps,
                )
            ]
        if acc.num_processes == 1:
            return
        ranks = broadcast_object_list(ranks, from_process=0)
        if not acc.is_main_process:
            for layer_name, layer in handle.adapter_layers().items():
                layer.set_scales(
                    name, torch.ones(layer.out_features), torch.ones(layer.in_features)
                )
                k = ranks[0].get(layer_name, 0)
                if k:
                    layer.set_low_rank(
                        name, torch.zeros(k, layer.in_features), torch.zeros(layer.out_features, k)
                    )
            handle._make_trainable(name)
        for tensor in _live_task_tensors(handle, name).values():
            tensor.data.copy_(broadcast(tensor.data.contiguous(), from_process=0))

    def _shard(self) -> None:
        """Under FSDP, shard the backbone once (after any task that trains it)."""
        if not self.fsdp or is_sharded(self.handle.model):
            return
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        names = getattr(plugin, "transformer_cls_names_to_wrap", None)
        reshard = getattr(plugin, "reshard_after_forward", True)
        self.handle.to(self.accelerator.device)
        shard_backbone(
            self.handle,
            block_classes(self.handle.model, names),
            reshard_after_forward=reshard if isinstance(reshard, bool) else True,
        )

    def _whole_weights(self) -> contextlib.AbstractContextManager[None]:
        """The sharded backbone's weights whole on every rank (a collective), or nothing."""
        return full_weights(self.handle.model) if self.fsdp else contextlib.nullcontext()

    def _epochs(self, task: TaskData) -> int:
        cfg = self.config
        if not cfg.subtract_trial_epochs or self.handle._tasks[task.name].trains_base:
            return cfg.epochs
        trial = (
            cfg.trial_epochs if cfg.trial_epochs is not None else self.handle.config.trial_epochs
        )
        return max(cfg.epochs - trial, 1)

    def _train(self, task: TaskData, seed: int, index: int = 0) -> None:
        acc, cfg, handle = self.accelerator, self.config, self.handle
        epochs = self._epochs(task)
        if self.fsdp and not is_sharded(handle.model):
            handle.to(acc.device)  # a base-training task runs before the backbone is sharded
        optimizer = torch.optim.Adam(handle.trainable_parameters(), lr=cfg.lr)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay or 1.0)
        loader = self._loader(task.train, train=True, seed=seed)
        if self.fsdp:  # the sharded backbone as it is; the task's parameters averaged here
            model, loader = handle, acc.prepare(loader)
        else:
            model, optimizer, loader, scheduler = acc.prepare(handle, optimizer, loader, scheduler)
        model.train()
        trainable = handle.trainable_parameters()  # once: the scan grows with the tasks
        from tqdm.auto import tqdm

        for epoch in range(epochs):
            bar = tqdm(
                loader,
                desc=f"{task.name} epoch {epoch + 1}/{epochs}",
                disable=not self.progress,
                leave=False,
            )
            for batch in bar:
                optimizer.zero_grad(set_to_none=True)
                if self.fsdp:
                    with acc.autocast():
                        loss = self.loss_fn(model, batch) + handle.regularization_loss()
                    loss.backward()
                    average_gradients(trainable)
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                else:
                    loss = self.loss_fn(model, batch) + handle.regularization_loss()
                    acc.backward(loss)
                    if cfg.grad_clip is not None:
                        acc.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                value = loss.item()
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                self.tracker.train_step(value, index)
        acc.free_memory()  # drop the prepared wrappers: the next task prepares afresh

    def _sync_task_state(self, name: str) -> None:
        """Give every process the main process's copy of the task (what gets saved). The
        parameters already agree; running statistics of norms do not (each process saw its own
        batches), and DDP would otherwise overwrite them from the main process later, while
        training another task, silently changing a finished task on the other processes."""
        if self.accelerator.num_processes == 1:
            return
        for tensor in _live_task_tensors(self.handle, name).values():
            tensor.data.copy_(broadcast(tensor.data.contiguous(), from_process=0))
        signature = self.handle.task_signature(name)
        if signature is not None:  # each process made it from the same data: keep rank 0's
            device = self.accelerator.device
            self.handle._tasks[name].signature = dataclasses.replace(
                signature,
                **{
                    key: broadcast(value.to(device).contiguous(), from_process=0).cpu()
                    for key, value in signature.to_tensors().items()
                },
            )

    @torch.no_grad()
    def evaluate(self, task: TaskData) -> float:
        """Top-1 accuracy (%) of `task` through its own adapters, over all processes."""
        acc, handle = self.accelerator, self.handle
        loader = acc.prepare(self._loader(task.test, train=False, seed=0))
        handle.eval()
        correct = total = 0
        with handle.task(task.name):
            for batch in loader:
                inputs, labels = self._split(batch)
                logits = logits_of(handle(**inputs) if isinstance(inputs, dict) else handle(inputs))
                predictions, labels = acc.gather_for_metrics((logits.argmax(-1), labels))
                correct += int((predictions == labels).sum())
                total += labels.numel()
        acc.free_memory()
        return 100.0 * correct / max(total, 1)

    @torch.no_grad()
    def evaluate_class_incremental(
        self, seen: Sequence[TaskData]
    ) -> tuple[list[float], float, float]:
        """Without the task's name: each seen task's test data through `task_ids="auto"`,
        scored over every class seen so far. Returns the accuracy (%) on each task's data, on
        all of it, and the share (%) of samples whose task retrieval found, over all
        processes."""
        acc, handle = self.accelerator, self.handle
        handle.eval()
        offsets = handle.class_offsets()
        row: list[float] = []
        found = total_all = correct_all = 0
        for index, task in enumerate(seen):
            loader = acc.prepare(self._loader(task.test, train=False, seed=0))
            correct = total = 0
            for batch in loader:
                inputs, labels = self._split(batch)
                args, kwargs = ((), inputs) if isinstance(inputs, dict) else ((inputs,), {})
                ids = handle.predict_tasks(*args, **kwargs)
                logits = forward_auto(handle, *args, predicted=ids, **kwargs)
                truth = labels + offsets[task.name][0]
                hits, right, labels = acc.gather_for_metrics(
                    (logits.argmax(-1) == truth, ids.to(labels.device) == index, labels)
                )
                correct += int(hits.sum())
                found += int(right.sum())
                total += labels.numel()
            row.append(100.0 * correct / max(total, 1))
            total_all += total
            correct_all += correct
            acc.free_memory()
        return row, 100.0 * correct_all / max(total_all, 1), 100.0 * found / max(total_all, 1)

    def _split(self, batch: Any) -> tuple[Any, torch.Tensor]:
        device = self.accelerator.device
        if isinstance(batch, dict):
            batch = move_to(batch, device)
            labels = batch.get("labels", batch.get("label"))
            return {k: v for k, v in batch.items() if k not in ("labels", "label")}, labels
        return move_to(batch[0], device), move_to(batch[1], device)

    # ---- the run -----------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Learn every task not yet finished; return the metrics (also written to disk)."""
        from .reporting import check_plotting, summarize, write_outputs

        if self.output_dir is not None and self.accelerator.is_main_process:
            check_plotting()  # fail now, not after the last task has trained
        self._resume()
        self.tracker.start(self.config, self.handle.config.options())
        for t, task in enumerate(self.tasks):
            if task.name in self.state.finished:
                continue
            seed = self.config.seed + 1000 * t
            seed_everything(seed, self.config.deterministic)
            times: dict[str, float] = {}
            start = time.perf_counter()
            trains_base = self.handle.config.train_base and not self.handle._tasks
            if not trains_base:
                self._shard()
            with self._whole_weights():  # a new task copies base norms and head; estimation
                self.handle.add_task(task.name, num_classes=task.num_classes)
                if not trains_base:
                    self._estimate(task, seed)
            if not trains_base:
                times["estimate"] = time.perf_counter() - start
                ranks = self.handle.task_stats(task.name).ranks
                self.log(
                    f"[{task.name}] ranks estimated in {times['estimate']:.1f}s: mean "
                    f"{sum(ranks.values()) / max(len(ranks), 1):.1f} over {len(ranks)} "
                    "layers"
                )
            mark = time.perf_counter()
            self._train(task, seed, t)
            times["train"] = time.perf_counter() - mark
            mark = time.perf_counter()
            # The task's norm statistics, recomputed with the weights it keeps (every process
            # passes over the whole training set, then takes the main process's copy).
            calibration = self._loader(task.train, train=False, seed=seed)
            held_out = self._loader(task.val, train=False, seed=seed) if task.val else None
            stats = self.handle.end_task(calibration_data=calibration, held_out_data=held_out)
            self._sync_task_state(task.name)
            times["prune"] = time.perf_counter() - mark
            self.log(
                f"[{task.name}] trained in {times['train']:.1f}s, pruned to growth "
                f"{stats.growth:.4f} (budget {self.handle.config.budget})"
            )
            mark = time.perf_counter()
            row = [self.evaluate(seen) for seen in self.tasks[: t + 1]]
            times["evaluate"] = time.perf_counter() - mark
            self.handle.record_metrics(task.name, accuracy=row[-1])
            self.log(
                f"[{task.name}] accuracy {row[-1]:.2f}%; all tasks: "
                + " ".join(f"{a:.1f}" for a in row)
            )
            if self.scenario == "class-incremental":
                mark = time.perf_counter()
                self._evaluate_without_task_names(t)
                times["evaluate"] += time.perf_counter() - mark
            self.tracker.task_done(
                [s.name for s in self.tasks[: t + 1]],
                row,
                task.name,
                stats,
                self.handle.report().total_growth,
            )
            self.state.matrix.append(row)
            self.state.finished.append(task.name)
            self.state.times[task.name] = times
            self._save(task)
        result = summarize(self)
        if self.output_dir is not None and self.accelerator.is_main_process:
            write_outputs(self, result)
        self.accelerator.wait_for_everyone()
        self.tracker.finish(self.output_dir if self.accelerator.is_main_process else None)
        return result

    def _evaluate_without_task_names(self, t: int) -> None:
        seen = self.tasks[: t + 1]
        ci_row, overall, retrieval = self.evaluate_class_incremental(seen)
        self.state.ci_matrix.append(ci_row)
        self.state.ci_seen.append(overall)
        self.state.retrieval.append(retrieval)
        self.log(
            f"[{seen[-1].name}] without task names: {overall:.2f}% over the "
            f"{sum(len(s.classes) for s in seen)} classes seen; task found for {retrieval:.2f}%"
        )
        self.tracker.class_incremental_done(overall, retrieval)

    def _save(self, task: TaskData) -> None:
        self.accelerator.wait_for_everyone()
        with self._whole_weights():  # the backbone's fingerprint reads whole weights
            if self.output_dir is not None and self.accelerator.is_main_process:
                self._write(task)
        self.accelerator.wait_for_everyone()

    def _write(self, task: TaskData) -> None:
        from ..files.storage import atomic_write

        assert self.output_dir is not None  # _save writes only with an output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        mark = time.perf_counter()
        if self.config.save_adapters:
            assert self.adapters_dir is not None  # output_dir is set
            self.handle.save_pretrained(self.adapters_dir, tasks=[task.name])
        self.state.times[task.name]["save"] = time.perf_counter() - mark
        payload = json.dumps(dataclasses.asdict(self.state), indent=2).encode()
        atomic_write(self.output_dir / STATE_NAME, lambda f: f.write(payload))
