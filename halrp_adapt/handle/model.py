"""`HalrpModel`: the handle `attach` returns. It owns the task life cycle.

add_task -> estimate_ranks -> train (regularization_loss, trainable_parameters) -> end_task.

The model is modified in place: target layers become `HalrpLayer`s, normalisation layers
`TaskNorm`s and the classifier a `TaskHead`, all keyed by task name inside nn.ParameterDict /
nn.ModuleDict, so `.to()`, `state_dict()`, DDP and FSDP see every task's tensors.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from accelerate import init_empty_weights
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..adapters.heads import TaskHead, find_head
from ..adapters.layers import HalrpLayer
from ..adapters.norms import TaskNorm
from ..adapters.registry import adapter_class_for
from ..adapters.routing import TaskRouted, check_new_task_name, check_task_name
from ..adapters.targets import select_norms, select_scaled, select_targets
from ..config import HalrpConfig
from ..files.export import save_merged
from ..files.hub import push_to_hub
from ..files.serialization import backbone_fingerprint
from ..files.storage import save_pretrained
from ..method.losses import LossFn, batch_inputs
from ..method.pruning import prune_, prune_threshold
from ..method.task_evidence import TaskEvidence
from ..method.task_signature import TaskSignature
from .accounting import HalrpReport, TaskStats, fixed_task_cost, task_stats
from .calibration import recalibrate_norm_statistics, task_batch_norms
from .estimate import estimate_task
from .mixed import forward_tasks
from .placement import decide_statistics, fit_parts_to_budget, smallest_part_cost
from .plain_copy import plain_from_structure, remembered_structure
from .task_retrieval import (
    class_offsets,
    compute_evidence,
    compute_signature,
    forward_auto,
    predict_tasks,
)


@dataclass
class TaskInfo:
    """What the handle knows of a task beyond its tensors. `config` is the task's own
    `HalrpConfig` (the same object PEFT keeps in `peft_config[task]`)."""

    name: str
    config: HalrpConfig
    finished: bool = False
    estimate: Any | None = field(default=None, repr=False)
    signature: TaskSignature | None = field(default=None, repr=False)
    evidence: TaskEvidence | None = field(default=None, repr=False)

    @property
    def trains_base(self) -> bool:
        return self.config.trains_base


class _HandleRef:
    """The model's link back to its handle: not a submodule, and dropped by deepcopy (a merged
    copy of the model has no handle)."""

    def __init__(self, handle: HalrpModel | None) -> None:
        self.handle = handle

    def __deepcopy__(self, memo: dict) -> _HandleRef:
        return _HandleRef(None)

    def __reduce__(self) -> tuple:
        return (_HandleRef, (None,))


class HalrpModel(nn.Module):
    """A backbone with HALRP task adapters. Build it with `halrp_adapt.attach`.

    Example:
        >>> import torch, halrp_adapt
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
        ...                           torch.nn.Linear(16, 4))
        >>> cl = halrp_adapt.attach(net, budget=0.5)
        >>> cl.add_task("first", num_classes=3)
        >>> cl(torch.randn(2, 8)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, model: nn.Module, config: HalrpConfig, autocast_adapter_dtype: bool = True
    ) -> None:
        super().__init__()
        if any(isinstance(m, TaskRouted) for m in model.modules()):
            raise ValueError(
                "`model` already has HALRP adapters attached; attach once and use "
                "add_task for new tasks."
            )
        self.model = model
        # The handle's own copy: what its tasks start from. Nothing HALRP does changes the
        # caller's object (each task keeps its own copy too, in TaskInfo.config).
        self.config = copy.deepcopy(config)
        # Half-precision backbones get float32 task tensors (PEFT's autocast_adapter_dtype):
        # a scale of 1 cannot move by less than 2**-8 in bfloat16.
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self._tasks: dict[str, TaskInfo] = {}
        self._open: str | None = None  # the task being trained, if any
        self._trainable: list[nn.Parameter] = []  # the open task's, while it trains
        self._warned_uncalibrated = False
        head = find_head(model, config.head_module)
        self.base_class = f"{type(model).__module__}.{type(model).__qualname__}"
        if head is not None and _is_tied(model, head):
            head_is_shared = True  # e.g. a causal LM whose lm_head is the token embedding
        else:
            head_is_shared = not config.task_heads
        self.head_name = head
        # The model's modules as attached: what a later PEFT adapter's options are checked on.
        self._attached_modules = list(model.named_modules())
        targets = select_targets(model, head, config.target_modules, config.exclude_modules)
        norms = select_norms(model, head, targets)
        self._scaled_layers = set(select_scaled(targets, config.scale_modules))
        self.backbone_params = _count_outside(model, head)
        for p in model.parameters():
            p.requires_grad_(False)
        for name in targets:
            module = model.get_submodule(name)
            adapter_cls = adapter_class_for(module)
            assert adapter_cls is not None  # select_targets keeps only adaptable layers
            _replace(model, name, adapter_cls(module))
        for name in norms:
            _replace(model, name, TaskNorm(model.get_submodule(name)))
        if head is not None and not head_is_shared:
            in_features = getattr(model, "num_features", None)
            _replace(model, head, TaskHead(model.get_submodule(head), in_features))
        # The wrappers never change after this, and walking named_modules() would also walk
        # every task's norm and head copies: keep them by name.
        self._routed_by_name: dict[str, TaskRouted] = {
            n: m for n, m in model.named_modules() if isinstance(m, TaskRouted)
        }
        self._check_budget_covers_fixed_cost()
        model.__dict__["_halrp_handle_ref"] = _HandleRef(self)

    @staticmethod
    def of(model: nn.Module) -> HalrpModel | None:
        """The handle attached to `model`, if any."""
        ref = model.__dict__.get("_halrp_handle_ref")
        handle = ref.handle if ref is not None else None
        return handle if handle is not None and handle.model is model else None

    # ---- inspection --------------------------------------------------------------------------
    @property
    def tasks(self) -> list[str]:
        """Task names in the order they were added."""
        return list(self._tasks)

    @property
    def open_task(self) -> str | None:
        """The task being trained (added, not yet ended), if any."""
        return self._open

    @property
    def unfinished_tasks(self) -> list[str]:
        """Tasks added and not yet ended: the open one and, through PEFT, adapters added
        beside it (`add_adapter`) that wait for `set_adapter` to be trained."""
        return [n for n, t in self._tasks.items() if not t.finished]

    @property
    def backbone_trained_here(self) -> bool:
        """Whether a task of this model trained the backbone itself (`train_base=True`)."""
        return any(info.trains_base for info in self._tasks.values())

    @property
    def active_task(self) -> str | None:
        """The task the next forward runs (None: the frozen backbone)."""
        for module in self._routed():
            return module.active_task
        return None

    def adapter_layers(self) -> dict[str, HalrpLayer]:
        """{layer name: adapter layer}, named as the layers were in the original model."""
        return {n: m for n, m in self._routed_by_name.items() if isinstance(m, HalrpLayer)}

    def task_norms(self) -> dict[str, TaskNorm]:
        return {n: m for n, m in self._routed_by_name.items() if isinstance(m, TaskNorm)}

    def task_head(self) -> TaskHead | None:
        head = self.model.get_submodule(self.head_name) if self.head_name else None
        return head if isinstance(head, TaskHead) else None

    def _routed(self) -> Iterator[TaskRouted]:
        return iter(list(self._routed_by_name.values()))

    def _info(self, task: str, argument: str = "name") -> TaskInfo:
        if not isinstance(task, str) or task not in self._tasks:
            raise ValueError(f"`{argument}`: unknown task {task!r}; known tasks: {self.tasks}.")
        return self._tasks[task]

    def _require_open(self, action: str) -> TaskInfo:
        task = self.open_task
        if task is None:
            waiting = self.unfinished_tasks
            hint = (
                f"set_adapter({waiting[0]!r}) trains an unfinished task again"
                if waiting
                else "call add_task(name) first (through PEFT: add_adapter(name, config), "
                "then set_adapter(name))"
            )
            raise RuntimeError(f"{action} needs a task in training: {hint}.")
        return self._tasks[task]

    # ---- the task life cycle -----------------------------------------------------------------
    def add_task(self, name: str, num_classes: int | None = None) -> None:
        """Add task `name` with identity scales, the base biases and norms, and its own head.

        `num_classes` sizes the task's head; None copies the backbone's head as it is.
        The new task becomes active and is the only one with trainable parameters.
        """
        check_new_task_name(name, self.tasks)
        if self.open_task is not None:
            raise RuntimeError(
                f"task {self.open_task!r} is still in training: call end_task() before add_task()."
            )
        self._add_new_task(
            name, self.config, num_classes, open_it=True, autocast=self.autocast_adapter_dtype
        )

    def _add_new_task(
        self,
        name: str,
        options: HalrpConfig,
        num_classes: int | None,
        open_it: bool,
        autocast: bool,
        low_cpu_mem_usage: bool = False,
    ) -> HalrpConfig:
        """A new task to train, with `options` (a copy is the task's own config); open and
        routed when `open_it`, else waiting, frozen and not routed."""
        head = self.task_head()
        if num_classes is not None:
            if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
                raise ValueError(f"`num_classes` must be an int >= 1 or None, got {num_classes!r}.")
            if head is None:
                raise ValueError(
                    "`num_classes` was given but the model has no per-task head "
                    "(none found, or task_heads=False, or a head tied to the "
                    "embeddings); set `head_module` in attach or pass "
                    "num_classes=None."
                )
        trains_base = self.config.train_base and not self._tasks
        scaled = set(select_scaled(list(self.adapter_layers()), options.scale_modules))
        if not trains_base:  # a PEFT adapter's own budget and scales are checked as attach's
            self._check_budget_covers_fixed_cost(options.budget, scaled, options.placement)
        self._add_skeleton(name, options, scaled, trains_base, num_classes, low_cpu_mem_usage)
        config = dataclasses.replace(
            copy.deepcopy(options),
            num_classes=num_classes,
            trains_base=trains_base,
            inference_mode=False,
            rank_pattern={},
            sparse_pattern={},
            metrics={},
        )
        if not trains_base and options.placement == "budget" and options.norm_modules is None:
            decide_statistics(self, name, options.budget)
        self._tasks[name] = TaskInfo(name, config)
        if not config.init_weights and not trains_base and not low_cpu_mem_usage:
            self._perturb(name, config)
        if autocast:
            self.cast_task_tensors(name)
        if open_it:
            self._open_task(name)
            self.set_task(name)
        else:
            for p in self._task_parameters(name):
                p.requires_grad_(False)
        self._refresh_task_config(name)
        return config

    def add_task_from_config(
        self,
        name: str,
        config: HalrpConfig,
        *,
        activate: bool = True,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool | None = None,
    ) -> HalrpConfig:
        """Add task `name` as `config` describes it and return the task's own copy of it: a new
        task to train when its config has no ranks yet, else a saved task's exact skeleton
        (shapes only, identity until values are loaded), finished when `config.inference_mode`
        is set. This is how PEFT adds adapters (`get_peft_model`, `add_adapter`,
        `load_adapter`); `config` itself is never changed.

        `activate` routes through the task and, unless finished, trains it; otherwise it waits
        (PEFT's `add_adapter`: `set_adapter(name)` activates it). `low_cpu_mem_usage` makes a
        saved task's tensors on the meta device, for a loader that assigns them.
        `autocast_adapter_dtype` (default: the handle's) gives a half-precision backbone's task
        float32 tensors.
        """
        autocast = (
            self.autocast_adapter_dtype
            if autocast_adapter_dtype is None
            else autocast_adapter_dtype
        )
        check_task_name(name)
        if name in self._tasks:
            raise ValueError(f"task {name!r} already exists; existing tasks: {self.tasks}.")
        self.check_structure(config)
        if not config.rank_pattern and not config.trains_base and not config.inference_mode:
            check_new_task_name(name, self.tasks)
            return self._add_new_task(
                name,
                config,
                config.num_classes,
                open_it=activate,
                autocast=autocast,
                low_cpu_mem_usage=low_cpu_mem_usage,
            )
        self.check_compatible(config)
        own = copy.deepcopy(config)
        scaled = set(select_scaled(list(self.adapter_layers()), own.scale_modules))
        self._add_skeleton(
            name, own, scaled, own.trains_base, own.num_classes, low_cpu_mem_usage, own.rank_pattern
        )
        self._tasks[name] = TaskInfo(name, own, finished=bool(own.inference_mode))
        if autocast:
            self.cast_task_tensors(name)
        if own.inference_mode:
            for module in self._routed():
                if name in module.task_names():
                    module.freeze_task(name)
        elif activate:
            self._open_task(name)
        else:
            for p in self._task_parameters(name):
                p.requires_grad_(False)
        if activate:
            self.set_task(name)
        return own

    def _add_skeleton(
        self,
        name: str,
        config: HalrpConfig,
        scaled: set[str],
        trains_base: bool,
        num_classes: int | None,
        low_cpu_mem_usage: bool,
        ranks: dict[str, int] | None = None,
    ) -> None:
        """Give task `name` its entries in every wrapper: scales (on `scaled` layers), biases,
        factors of `ranks`, norm copies and head. With `low_cpu_mem_usage` they are made on the
        meta device (accelerate's init_empty_weights; norm and head copies moved there), for a
        loader that assigns the saved tensors."""
        layers, head = self.adapter_layers(), self.task_head()
        empty = init_empty_weights(include_buffers=False)
        with empty if low_cpu_mem_usage else contextlib.nullcontext():
            biased = None if config.bias_modules is None else set(config.bias_modules)
            for layer_name, layer in layers.items():
                layer.add_task(
                    name,
                    scales=not trains_base and layer_name in scaled,
                    bias=biased is None or layer_name in biased,
                )
                rank = (ranks or {}).get(layer_name, 0)
                if rank:
                    layer.add_factor_skeleton(
                        name,
                        rank,
                        {w: config.sparse_pattern.get(f"{layer_name}.{w}") for w in "AB"},
                    )
            normed = None if config.norm_modules is None else set(config.norm_modules)
            for norm_name, norm in self.task_norms().items():
                if normed is None or norm_name in normed:
                    norm.add_task(name)
            if head is not None:
                head.add_task(name, num_classes)
        if low_cpu_mem_usage:
            for module in self._routed():
                module.move_task(name, torch.device("meta"))

    def check_structure(self, config: HalrpConfig) -> None:
        """Raise ValueError, changing nothing, when `config` asks for other wrapped layers, norms
        or head than this model has: HALRP wraps them once, for every task."""
        layers = self.adapter_layers()
        for option in ("target_modules", "exclude_modules"):
            value = getattr(config, option)
            if value == getattr(self.config, option) or config.rank_pattern:
                continue  # a saved task names its layers in rank_pattern (checked on load)
            wanted = self._targets_for(config)
            if wanted != list(layers):
                missing = [n for n in wanted if n not in layers]
                extra = [n for n in layers if n not in wanted]
                raise ValueError(
                    f"`{option}`={value!r} selects other layers than this model's adapters "
                    f"(only in the new config: {missing[:5]}; only here: {extra[:5]}). HALRP "
                    "wraps the layers once, when the first task is added, and every task adapts "
                    f"those: give this adapter {option}={getattr(self.config, option)!r}, or "
                    "attach the other layers to a fresh copy of the model."
                )
        for option in ("head_module", "task_heads", "task_signature"):
            mine, theirs = getattr(self.config, option), getattr(config, option)
            if option == "head_module" and theirs in (None, self.head_name):
                continue
            if mine != theirs:
                raise ValueError(
                    f"`{option}`={theirs!r} differs from this model's {mine!r}: it is set "
                    "once, when the first task is added, for every task; give this adapter "
                    f"{option}={mine!r}."
                )

    def _targets_for(self, config: HalrpConfig) -> list[str]:
        """The layers `config`'s target/exclude options select in the model as attached."""
        return select_targets(
            cast(nn.Module, _ModuleTree(self._attached_modules)),  # all select_targets reads
            self.head_name,
            config.target_modules,
            config.exclude_modules,
        )

    def check_compatible(self, config: HalrpConfig) -> None:
        """Raise ValueError, changing nothing, when a saved task's config does not fit this
        model (other backbone weights, layers it did not adapt, a head it cannot have)."""
        if config.backbone_fingerprint is not None:
            here = backbone_fingerprint(self.model, self.head_name)
            if here != config.backbone_fingerprint:
                raise ValueError(
                    f"the task was saved on another backbone (fingerprint "
                    f"{config.backbone_fingerprint[:12]}..., this model's is {here[:12]}...): "
                    "load it into the same pretrained weights it was trained on."
                )
        layers = self.adapter_layers()
        unknown = sorted(set(config.rank_pattern) - set(layers))
        if unknown:
            raise ValueError(
                f"the task adapts layers this model does not have or does not "
                f"adapt: {unknown[:5]}; adapted here: {list(layers)[:5]}..."
            )
        for key in config.sparse_pattern:
            layer, _, which = key.rpartition(".")
            if which not in ("A", "B") or layer not in config.rank_pattern:
                raise ValueError(f"`sparse_pattern` key {key!r} names no factor of the task.")
        unknown_norms = sorted(set(config.norm_modules or ()) - set(self.task_norms()))
        if unknown_norms:
            raise ValueError(
                "the task was saved with its own norms in layers this model does not route: "
                f"{unknown_norms[:5]}; routed norms here: {sorted(self.task_norms())[:5]}."
            )
        unknown_biases = sorted(set(config.bias_modules or ()) - set(layers))
        if unknown_biases:
            raise ValueError(
                f"the task has its own bias in layers this model does not adapt: "
                f"{unknown_biases[:5]}."
            )
        if config.num_classes is not None and self.task_head() is None:
            raise ValueError(
                "the task has its own head of "
                f"{config.num_classes} classes but this model has no per-task head."
            )

    def task_config(self, name: str) -> HalrpConfig:
        """Task `name`'s config, brought up to date with its current shapes."""
        self._info(name)
        return self._refresh_task_config(name)

    def _refresh_task_config(self, name: str) -> HalrpConfig:
        config = self._tasks[name].config
        layers = self.adapter_layers()
        config.rank_pattern = {n: ly.rank(name) for n, ly in layers.items() if ly.rank(name)}
        config.sparse_pattern = {
            f"{n}.{which}": getattr(ly, f"halrp_{which}_values")[name].numel()
            for n, ly in layers.items()
            for which in "AB"
            if name in getattr(ly, f"halrp_{which}_values")
        }
        config.target_modules = "|".join(re.escape(n) for n in layers)
        config.exclude_modules = None
        norms = self.task_norms()
        normed = [n for n, norm in norms.items() if name in norm.halrp_norm]
        config.norm_modules = None if len(normed) == len(norms) else normed
        with_bias = [
            n for n, ly in layers.items() if getattr(ly.base_layer, "bias", None) is not None
        ]
        biased = [n for n in with_bias if name in layers[n].halrp_bias]
        config.bias_modules = None if len(biased) == len(with_bias) else biased
        scaled = [n for n, ly in layers.items() if name in ly.halrp_r]
        config.scale_modules = None if len(scaled) == len(layers) else scaled
        config.head_module = self.head_name
        config.inference_mode = self._tasks[name].finished
        head = self.task_head()
        if head is not None and name in head.halrp_head:
            config.num_classes = head.num_classes(name)
        return config

    def delete_task(self, name: str) -> None:
        """Remove task `name` and all its tensors."""
        self._info(name)
        for module in self._routed():
            module.remove_task(name)
        del self._tasks[name]
        if self._open == name:
            self._open = None
            self._trainable = []

    def estimate_ranks(
        self,
        data: Iterable[Any],
        *,
        loss_fn: LossFn | None = None,
        fisher_data: Iterable[Any] | None = None,
        epochs: int | None = None,
        steps: int | None = None,
        lr: float | None = None,
    ) -> dict[str, int]:
        """Choose the open task's ranks and initialise its scales and factors (the paper's way).

        A copy of the model is fine-tuned freely on `data` (`epochs`/`steps`, default from the
        config); the empirical Fisher of each layer comes from the trial's last steps
        (`fisher="trial"`, the default) or a pass over `fisher_data` (default `data`) at the
        trial's final weights (`fisher="pass"`); scales are fitted by least squares, the
        residual is decomposed by SVD, and ranks are chosen globally by Fisher-weighted energy
        within the budget. The trial's biases, norms and head become the task's. Build the
        optimiser after this call.

        `loss_fn(model, batch) -> loss` defaults to cross-entropy on `(x, y)` or dict batches.
        Returns {layer name: rank}.
        """
        _check_positive_or_none("epochs", epochs, int)
        _check_positive_or_none("steps", steps, int)
        _check_positive_or_none("lr", lr, float)
        info = self._require_open("estimate_ranks()")
        if info.trains_base:
            raise RuntimeError(
                f"task {info.name!r} trains the backbone itself "
                "(train_base=True): there is nothing to estimate; train it, "
                "then end_task()."
            )
        if fisher_data is not None and info.config.fisher != "pass":
            warnings.warn(
                "`fisher_data` is read only with fisher='pass'; with "
                f"fisher={info.config.fisher!r} the Fisher comes from the trial's own steps.",
                UserWarning,
                stacklevel=2,
            )
        result = estimate_task(
            self,
            info.name,
            data,
            loss_fn=loss_fn,
            fisher_data=fisher_data,
            epochs=epochs,
            steps=steps,
            lr=lr,
        )
        info.estimate = result
        self._make_trainable(info.name)
        self._refresh_task_config(info.name)
        return dict(result.ranks)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters to give the optimiser: the open task's (and the backbone's when the
        task trains it)."""
        return [p for p in self.parameters() if p.requires_grad]

    def regularization_loss(self) -> Tensor:
        """`l1 * sum(|A| + |B|) + wd * sum(r^2 + s^2 + A^2 + B^2) / 2` for the open task.

        A task that trains the backbone gets `wd * sum(W^2) / 2` over the adapted weights.
        """
        info = self._require_open("regularization_loss()")
        task, cfg = info.name, info.config
        squared: list[Tensor] = []  # the L2 terms
        absolute: list[Tensor] = []  # the L1 terms
        for layer in self.adapter_layers().values():
            if info.trains_base:
                squared.append(layer.weight)
                continue
            for d in (layer.halrp_r, layer.halrp_s, layer.halrp_A, layer.halrp_B):
                if task in d:
                    squared.append(d[task])
            for d in (layer.halrp_A, layer.halrp_B):
                if task in d:
                    absolute.append(d[task])
        zero = torch.zeros((), device=next(self.parameters()).device)
        wd = _total(squared, lambda t: t.pow(2).sum(), zero)
        l1 = _total(absolute, lambda t: t.abs().sum(), zero)
        return cfg.l1 * l1 + cfg.wd * wd / 2

    def end_task(
        self,
        calibration_data: Iterable[Any] | None = None,
        max_calibration_batches: int | None = None,
        held_out_data: Iterable[Any] | None = None,
    ) -> TaskStats:
        """Prune the open task's factors to the budget, recompute its norm statistics, make its
        task signature, freeze it, and return its stats.

        `calibration_data` (the task's training batches, e.g. its DataLoader) gives the task's
        BatchNorm copies running statistics measured with the weights it keeps, after pruning:
        statistics gathered while the weights moved lag behind them. A task with running
        statistics ended without it keeps those lagging statistics, with a warning. The same
        batches, with their labels, make the task's signature (`task_signature` option), which
        `predict_tasks` and `forward(..., task_ids="auto")` use to find an input's task; a task
        ended without them has none (`add_signature` adds one later). Batches whose labels are
        not one per sample (a language model's token labels) give the task one prototype; a
        signature that cannot be made is a warning, never the loss of the trained task.

        With 'backbone' signatures and `retrieval_candidates` > 1 (the default), the same
        batches also make the task's evidence (`TaskEvidence`: statistics of its own adapted
        features), standardised on `held_out_data` (the task's validation batches; default:
        the calibration batches, which read a little more confident than unseen inputs).

        Example::

            cl.end_task(calibration_data=train_loader, held_out_data=val_loader)
        """
        info = self._require_open("end_task()")
        task = info.name
        _check_positive_or_none("max_calibration_batches", max_calibration_batches, int)
        if not info.trains_base and info.config.placement == "budget":
            fit_parts_to_budget(self, task, info.config.budget)  # ended without estimate_ranks
        has_statistics = bool(task_batch_norms(self, task))
        wants_signature = self._signature_kind() is not None
        wants_evidence = self._wants_evidence(info.config)
        passes = int(has_statistics) + int(wants_signature) + 2 * int(wants_evidence)
        data = None
        if calibration_data is not None and passes:
            data = calibration_data
            if passes > 1 and iter(data) is data:  # a one-shot iterator: keep it for two passes
                data = list(itertools.islice(data, max_calibration_batches))
            # Empty data or batches of the wrong kind are refused before anything changes.
            first = next(iter(data), None)
            if first is None:
                raise ValueError("`calibration_data` yielded no batch.")
            batch_inputs(first)
            if iter(data) is data:
                data = itertools.chain([first], data)
        layers = self.adapter_layers()
        if not info.trains_base:
            self._prune(task, layers)
        if data is not None and has_statistics:
            recalibrate_norm_statistics(self, task, data, max_calibration_batches)
        elif calibration_data is None and has_statistics and not self._warned_uncalibrated:
            self._warned_uncalibrated = True
            warnings.warn(
                "end_task() without `calibration_data`: the task's BatchNorm running statistics "
                "were gathered while its weights moved and do not match the weights it keeps; "
                "pass its training data, e.g. end_task(calibration_data=train_loader).",
                UserWarning,
                stacklevel=2,
            )
        if info.trains_base:
            self._adopt_as_base(task)  # before the signature: later tasks see this backbone
        if data is not None and wants_signature:
            kind = self._signature_kind()
            assert kind is not None
            try:
                info.signature = compute_signature(
                    self, task, data, kind, max_calibration_batches, info.config.signature_rank
                )
            except Exception as err:  # the trained task is kept, whatever went wrong here
                warnings.warn(
                    f"task {task!r} ended without a task signature ({err}); it is finished and "
                    "kept, and add_signature(name, data) can give it one later.",
                    UserWarning,
                    stacklevel=2,
                )
        if data is not None and wants_evidence and info.signature is not None:
            try:
                info.evidence = compute_evidence(
                    self,
                    task,
                    data,
                    held_out_data,
                    max_calibration_batches,
                    info.config.signature_rank,
                )
            except Exception as err:  # the trained task is kept, whatever went wrong here
                warnings.warn(
                    f"task {task!r} ended without task evidence ({err}); it is finished and "
                    "kept, and add_evidence(name, data) can give it some later.",
                    UserWarning,
                    stacklevel=2,
                )
        for module in self._routed():
            if task in module.task_names():
                module.freeze_task(task)
        for p in self._trainable:
            p.requires_grad_(False)
            p.grad = None  # a finished task keeps no gradient memory
        self._trainable = []
        self._open = None
        info.finished = True
        self._refresh_task_config(task)
        return self.task_stats(task)

    def add_signature(
        self, name: str, data: Iterable[Any], max_batches: int | None = None
    ) -> TaskSignature:
        """Make the task signature of finished task `name`, which has none (ended without
        `calibration_data`, or saved by an older version), from its labelled batches `data`.
        Its weights and outputs do not change; a task that has a signature keeps it.

        Example::

            cl.add_signature("task0", task0_train_loader)
            cl.save_pretrained("shelf/", tasks=["task0"])   # the signature is saved with it
        """
        info = self._info(name)
        _check_positive_or_none("max_batches", max_batches, int)
        if not info.finished:
            raise RuntimeError(
                f"task {name!r} is still in training: end_task() makes its signature."
            )
        if info.signature is not None:
            raise ValueError(f"task {name!r} already has a signature; finished tasks never change.")
        kind = self._signature_kind()
        if kind is None:
            raise ValueError(
                "`task_signature` is None for this model (or it has no classifier head): "
                "attach with task_signature='backbone' or 'task'."
            )
        info.signature = compute_signature(
            self, name, data, kind, max_batches, info.config.signature_rank
        )
        return info.signature

    def add_evidence(
        self,
        name: str,
        data: Iterable[Any],
        held_out_data: Iterable[Any] | None = None,
        max_batches: int | None = None,
    ) -> TaskEvidence:
        """Make the evidence of finished task `name`, which has none (saved by an older
        version, or ended without data), from its labelled batches `data`, standardised on
        `held_out_data` (default: `data`). Its weights and outputs do not change. Without
        evidence for every loaded task, `task_ids="auto"` checks no candidates.

        Example::

            cl.add_evidence("task0", task0_train_loader, task0_val_loader)
            cl.save_pretrained("shelf/", tasks=["task0"])   # the evidence is saved with it
        """
        info = self._info(name)
        _check_positive_or_none("max_batches", max_batches, int)
        if not info.finished:
            raise RuntimeError(
                f"task {name!r} is still in training: end_task() makes its evidence."
            )
        if info.evidence is not None:
            raise ValueError(f"task {name!r} already has evidence; finished tasks never change.")
        if self._signature_kind() != "backbone":
            raise ValueError(
                "task evidence re-checks candidates ranked by 'backbone' signatures: attach "
                "with task_signature='backbone' (and a classifier head)."
            )
        if held_out_data is None and iter(data) is data:  # a one-shot iterator, read twice
            data = list(itertools.islice(data, max_batches))
        evidence = compute_evidence(
            self, name, data, held_out_data, max_batches, info.config.signature_rank
        )
        if evidence is None:
            raise ValueError(
                "task evidence needs a model whose output is (batch, classes) logits, as "
                'task_ids="auto" does; this model gives other outputs.'
            )
        info.evidence = evidence
        return evidence

    def task_evidence(self, name: str) -> TaskEvidence | None:
        """Task `name`'s evidence for checking candidate tasks (None if it has none)."""
        return self._info(name).evidence

    def _wants_evidence(self, config: HalrpConfig) -> bool:
        return self._signature_kind() == "backbone" and config.candidates > 1

    def task_signature(self, name: str) -> TaskSignature | None:
        """Task `name`'s signature (None if it has none)."""
        return self._info(name).signature

    def predict_tasks(self, *args: Any, **kwargs: Any) -> Tensor:
        """Each sample's task, found from the task signatures: a LongTensor of indices into
        `tasks`, ready for `forward_tasks`. Only the tasks loaded here compete.

        Example::

            ids = cl.eval().predict_tasks(images)       # e.g. tensor([0, 2, 2, 1])
            names = [cl.tasks[i] for i in ids]
        """
        return predict_tasks(self, *args, **kwargs)

    def class_offsets(self) -> dict[str, tuple[int, int]]:
        """{task: (offset, classes)}: each task's place in the global class space that
        `forward(..., task_ids="auto")` returns, in the order the tasks were learned."""
        return class_offsets(self)

    def _signature_kind(self) -> str | None:
        return self.config.task_signature if self.head_name is not None else None

    def set_task(self, name: str | None) -> None:
        """Route every forward through task `name` (None: the frozen backbone)."""
        if name is not None:
            self._info(name)
        for module in self._routed():
            module.set_active_task(name)

    @contextlib.contextmanager
    def task(self, name: str | None) -> Iterator[HalrpModel]:
        """`with handle.task(name):` runs the block with `name` active, then restores."""
        previous = self.active_task
        self.set_task(name)
        try:
            yield self
        finally:
            self.set_task(previous)

    def merge(self, name: str, inplace: bool = False) -> nn.Module:
        """A plain model for task `name`: merged weights, no HALRP modules.

        Its outputs equal the adapted model's for that task (up to float rounding), with no
        inference overhead. By default a copy; `inplace=True` turns the attached model itself
        into the plain model (every other task is dropped) and detaches this handle.
        """
        self._info(name)
        plain_parts: dict[int, nn.Module] = {}
        for module in self._routed():
            if isinstance(module, HalrpLayer):
                plain_parts[id(module)] = module.merged_layer(name)
            elif isinstance(module, TaskNorm):
                own = module.halrp_norm[name] if name in module.halrp_norm else module.base_layer
                plain_parts[id(module)] = _in_dtype_of(own, module.base_layer)
            elif isinstance(module, TaskHead):
                plain_parts[id(module)] = _in_dtype_of(module.halrp_head[name], module.base_layer)
        if inplace:
            return self._swap_out(lambda m: plain_parts[id(m)])
        structure = remembered_structure(self)
        if structure is None:
            plain = copy.deepcopy(self.model, dict(plain_parts))
        else:  # a sharded model: a copy of its structure, filled from its (whole) weights
            names = {id(m): n for n, m in self.model.named_modules()}
            parts = {names[i]: part for i, part in plain_parts.items()}
            plain = plain_from_structure(structure, self.model, parts)
        for p in plain.parameters():
            p.requires_grad_(True)
        return plain.train(self.model.training)

    def unload(self) -> nn.Module:
        """Remove every HALRP module, giving back the backbone as it was attached."""
        return self._swap_out(lambda m: m.base_layer)

    def _swap_out(self, replacement: Any) -> nn.Module:
        model = self.model
        for name, module in list(model.named_modules()):
            if isinstance(module, TaskRouted) and name:
                _replace(model, name, replacement(module))
        for p in model.parameters():
            p.requires_grad_(True)
        model.__dict__.pop("_halrp_handle_ref", None)
        self._tasks.clear()
        self._routed_by_name = {}
        return model

    def task_stats(self, name: str) -> TaskStats:
        """Ranks, parameter counts by kind and growth of task `name` alone (`report()` gives
        every task's)."""
        info = self._info(name)
        return task_stats(
            name,
            self.adapter_layers(),
            list(self.task_norms().values()),
            self.task_head(),
            self.backbone_params,
            info.finished,
        )

    def report(self) -> HalrpReport:
        """Per-task ranks, parameter counts by kind, and growth over the backbone."""
        layers, norms, head = (
            self.adapter_layers(),
            list(self.task_norms().values()),
            self.task_head(),
        )
        stats = {
            name: task_stats(name, layers, norms, head, self.backbone_params, info.finished)
            for name, info in self._tasks.items()
        }
        return HalrpReport(self.backbone_params, self.config.budget, stats)

    def record_metrics(self, name: str, **figures: float) -> None:
        """Keep figures measured on task `name` (e.g. accuracy=91.2); saved with the task and
        shown on the Hub model card."""
        self._info(name).config.metrics.update({k: float(v) for k, v in figures.items()})

    # ---- files, Hub, export ------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike[str],
        tasks: list[str] | None = None,
        dtype: str = "float32",
    ) -> list[str]:
        """Save each task (default: every finished one) as its own PEFT adapter folder.

        `save_directory/<task>/adapter_model.safetensors` + `adapter_config.json`, and the
        index `halrp_index.json`. Saving one task never rewrites another; writes are atomic.
        `dtype`: "float32" (default), "bfloat16" or "float16". Returns the tasks written.

        Example::

            cl.save_pretrained("shelf/")                      # every finished task
            cl.save_pretrained("shelf/", tasks=["task3"])     # just one, the others untouched
        """
        return save_pretrained(self, save_directory, tasks=tasks, dtype=dtype)

    def push_to_hub(
        self,
        repo_id: str,
        tasks: list[str] | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
        token: str | None = None,
        dtype: str = "float32",
    ) -> Any:
        """Upload tasks (default: every finished one) to the Hub in one commit, keeping the
        tasks already there, with a model card. Returns the commit info.

        Example::

            cl.push_to_hub("my-org/vit-s-split-imagenet", private=True)
        """
        return push_to_hub(
            self,
            repo_id,
            tasks=tasks,
            private=private,
            commit_message=commit_message,
            token=token,
            dtype=dtype,
        )

    def save_merged(self, name: str, save_directory: str) -> Any:
        """Save task `name` merged into a plain model that loads without halrp_adapt
        (transformers `save_pretrained`, timm `save_for_hf`, else a safetensors state dict)."""
        self._info(name)
        return save_merged(self, name, save_directory)

    def forward(self, *args: Any, task_ids: Any = None, **kwargs: Any) -> Any:
        """The model's forward through the active task, or, with `task_ids` (one task index
        or name per sample), each sample through its own task (`forward_tasks`).

        `task_ids="auto"` finds each sample's task from the task signatures
        (`predict_tasks`) and returns logits over every task's classes, each task's at its
        offset (`class_offsets`) and -inf elsewhere: argmax gives a global class.
        """
        if isinstance(task_ids, str) and task_ids == "auto":
            return forward_auto(self, *args, **kwargs)
        if task_ids is not None:
            return self.forward_tasks(task_ids, *args, **kwargs)
        return self.model(*args, **kwargs)

    def forward_tasks(
        self,
        task_ids: Any,
        *args: Any,
        fill_value: float = float("-inf"),
        strategy: str = "auto",
        **kwargs: Any,
    ) -> Tensor:
        """Each sample through its own task: in one pass of the whole batch (eval mode), or one
        forward per task present; see `halrp_adapt.handle.mixed.forward_tasks`."""
        return forward_tasks(
            self, task_ids, *args, fill_value=fill_value, strategy=strategy, **kwargs
        )

    # ---- internals ---------------------------------------------------------------------------
    def _make_trainable(self, task: str) -> None:
        # Only the previous open task's parameters can be trainable (every other task is
        # frozen when it ends), so the cost stays flat as tasks pile up.
        for p in self._trainable:
            p.requires_grad_(False)
        trainable = [p for module in self._routed() for p in module.task_parameters(task)]
        if self._tasks[task].trains_base:
            trainable += self._backbone_parameters()
        for p in trainable:
            p.requires_grad_(True)
        self._trainable = trainable

    def _open_task(self, task: str) -> None:
        """Make `task` the one being trained (any other unfinished task waits, frozen)."""
        self._make_trainable(task)
        self._open = task

    def _task_parameters(self, task: str) -> list[nn.Parameter]:
        return [p for module in self._routed() for p in module.task_parameters(task)]

    def cast_task_tensors(self, task: str) -> None:
        """Make task `task`'s float16 / bfloat16 tensors float32 (PEFT's autocast of adapter
        dtypes); the layers then run only W0's product in the backbone's dtype."""
        self._info(task)
        for module in self._routed():
            module.cast_task(task, (torch.float16, torch.bfloat16), torch.float32)
        if task == self._open:
            self._make_trainable(task)  # the cast made new Parameter objects

    def activate(self, name: str, train: bool = True) -> None:
        """Route through task `name` and, when it is unfinished and `train`, make it the task
        being trained (any other unfinished task waits, frozen). PEFT's `set_adapter`."""
        info = self._info(name)
        if train and not info.finished:
            self._open_task(name)
        elif self._open is not None and self._open != name or not train:
            for p in self._trainable:
                p.requires_grad_(False)
            self._trainable = []
            self._open = None
        self.set_task(name)

    @torch.no_grad()
    def _perturb(self, task: str, config: HalrpConfig) -> None:
        """`init_weights=False`: start the task away from the backbone (tests see every path)."""
        for layer in self.adapter_layers().values():
            for d in (layer.halrp_r, layer.halrp_s):
                if task in d:
                    d[task].add_(torch.empty_like(d[task]).uniform_(-0.5, 0.5))
            if task in layer.halrp_bias:
                layer.halrp_bias[task].add_(0.1 * torch.randn_like(layer.halrp_bias[task]))
            rank = min(2, config.upper_rank, layer.in_features, layer.out_features)
            if layer.supports_low_rank:
                w = layer.weight
                A = torch.randn(rank, layer.in_features, device=w.device, dtype=w.dtype)
                B = torch.randn(layer.out_features, rank, device=w.device, dtype=w.dtype)
                layer.set_low_rank(task, 0.3 * A, 0.3 * B)

    def _backbone_parameters(self) -> list[nn.Parameter]:
        """The shared weights a base-training task trains: everything outside the per-task
        containers, except the base copies of biases, norms and head that tasks replace."""
        skip: set[int] = set()
        keep: list[nn.Parameter] = []
        for module in self._routed():
            skip.update(id(p) for p in module.parameters())
            if isinstance(module, HalrpLayer):
                keep.append(cast(nn.Parameter, module.weight))
        return keep + [p for p in self.model.parameters() if id(p) not in skip]

    def _prune(self, task: str, layers: dict[str, HalrpLayer]) -> None:
        """Zero the smallest factor entries so the task stays within its budget, in parameters
        and in bytes: when the dense factors alone exceed what the budget leaves, the kept
        entries also pay for the 1-bit-per-entry mask of their compact form (`method/sparse.py`)."""
        factors = [
            d[task]
            for layer in layers.values()
            for d in (layer.halrp_A, layer.halrp_B)
            if task in d
        ]
        stats = task_stats(
            task, layers, list(self.task_norms().values()), None, self.backbone_params, False
        )
        cfg = self._tasks[task].config
        room = math.floor(cfg.budget * self.backbone_params) - (
            stats.stored_params - stats.low_rank_params
        )
        dense = sum(f.numel() for f in factors)
        keep = room if dense <= room else room - math.ceil(dense / 32)
        prune_(factors, prune_threshold(factors, keep, cfg.prune_floor))
        for layer in layers.values():
            layer.compact_factors(task)

    def _adopt_as_base(self, task: str) -> None:
        """After a base-training task, its biases and norms become the base that later tasks
        start from (its own copies stay its own)."""
        with torch.no_grad():
            for layer in self.adapter_layers().values():
                bias = getattr(layer.base_layer, "bias", None)
                if bias is not None and task in layer.halrp_bias:
                    bias.copy_(layer.halrp_bias[task])
            for norm in self.task_norms().values():
                norm.base_layer.load_state_dict(norm.halrp_norm[task].state_dict())

    def _check_budget_covers_fixed_cost(
        self,
        budget: float | None = None,
        scaled: set[str] | None = None,
        placement: str | None = None,
    ) -> None:
        """Refuse a budget no task can keep: below the cheapest part (`placement="budget"`),
        or below every scale, bias and norm copy together (`placement="paper"`)."""
        budget = self.config.budget if budget is None else budget
        scaled = self._scaled_layers if scaled is None else scaled
        placement = self.config.placement if placement is None else placement
        allowed = budget * self.backbone_params
        if placement == "budget":
            smallest = smallest_part_cost(self, scaled)
            if smallest > allowed:
                raise ValueError(
                    f"`budget`={budget} allows {allowed:,.2f} parameters per task, less than "
                    f"the cheapest part a task can keep ({smallest:,} parameters: one bias, "
                    "scale pair, norm copy or rank); the smallest budget that works here is "
                    f"{_round_up(smallest / self.backbone_params)}."
                )
            return
        fixed = fixed_task_cost(self.adapter_layers(), list(self.task_norms().values()), scaled)
        if fixed > allowed:
            raise ValueError(
                f"`budget`={budget} allows {allowed:,.0f} parameters per task, "
                f"less than the {fixed:,} every task stores before any low-rank factor (scales, "
                f"biases and norms of {len(self.adapter_layers())} layers) with "
                f"placement='paper'; use budget >= {_round_up(fixed / self.backbone_params)}, "
                "placement='budget' (parts compete for the budget), or adapt fewer layers "
                "(`target_modules`, `scale_modules`)."
            )


def _round_up(share: float) -> float:
    """`share` rounded up to 3 significant digits: a budget that holds it."""
    digits = 2 - math.floor(math.log10(share)) if share > 0 else 0
    return math.ceil(share * 10**digits) / 10**digits


def _total(tensors: list[Tensor], term: Callable[[Tensor], Tensor], zero: Tensor) -> Tensor:
    """`sum(term(t) for t in tensors)`, with the plain tensors in one flat vector: a few large
    ops instead of several per parameter, which on a network of a hundred adapted layers would
    cost more than the sums themselves. A parameter FSDP2 shards (a DTensor outside forward)
    is reduced on its own to a plain scalar (differentiably) so that it adds to the loss."""
    plain = [t for t in tensors if not isinstance(t, DTensor)]
    total = term(torch.cat([t.reshape(-1) for t in plain])) if plain else zero
    for t in tensors:
        if isinstance(t, DTensor):
            sharded = term(t)
            assert isinstance(sharded, DTensor)  # a reduction of a DTensor stays one
            total = total + sharded.full_tensor()
    return total


def _in_dtype_of(part: nn.Module, base: nn.Module) -> nn.Module:
    """A copy of a task's norm or head in the dtype of the base module it replaces (a
    half-precision backbone's tasks keep float32 copies)."""
    copied = copy.deepcopy(part)
    dtype = next((p.dtype for p in base.parameters() if p.is_floating_point()), None)
    return copied.to(dtype) if dtype is not None else copied


class _ModuleTree:
    """`named_modules()` and `get_submodule()` of a model as it was before wrapping."""

    def __init__(self, named: list[tuple[str, nn.Module]]) -> None:
        self._named = named

    def named_modules(self) -> Iterator[tuple[str, nn.Module]]:
        return iter(self._named)

    def get_submodule(self, name: str) -> nn.Module:
        return dict(self._named)[name]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _inside(name: str, parent: str) -> bool:
    return name == parent or name.startswith(parent + ".")


def _count_outside(model: nn.Module, head: str | None) -> int:
    """Unique parameters outside `head` (a head weight tied to an embedding still counts)."""
    counted: dict[int, int] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if head is None or not _inside(name, head):
            counted[id(p)] = p.numel()
    return sum(counted.values())


def _is_tied(model: nn.Module, head: str) -> bool:
    head_ids = {id(p) for p in model.get_submodule(head).parameters()}
    return any(
        id(p) in head_ids
        for n, p in model.named_parameters(remove_duplicate=False)
        if not _inside(n, head)
    )


def _check_positive_or_none(argument: str, value: Any, kind: type) -> None:
    """Raise ValueError unless `value` is None or a finite number > 0 (an int when `kind` is)."""
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if (
        not number
        or (kind is int and not isinstance(value, int))
        or not math.isfinite(value)
        or value <= 0
    ):
        what = "an int >= 1" if kind is int else "a finite number > 0"
        raise ValueError(f"`{argument}` must be None or {what}, got {value!r}.")
