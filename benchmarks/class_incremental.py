"""Study 10: task-agnostic inference. How well does HALRP serve inputs that arrive without
their task's name (class-incremental), and what does finding the task cost?

On study 8's sequences (its data, epochs, batches, and HALRP's learning rate chosen there on
validation), HALRP learns the tasks as usual; after each task every seen task's test data is
scored over all classes seen so far, without task names, by:

- halrp+retrieval (backbone)  each sample's task found from the frozen backbone's features
                              (the default `task_signature="backbone"`), then its task's logits
- halrp+retrieval (task)      the task found from each task's own adapted features
                              (`task_signature="task"`: one forward per task)
- oracle                      HALRP told the task (task-incremental): the ceiling of the above
- prototype                   no adaptation: the frozen backbone's features, nearest class
                              prototype under the pooled shrunk covariance (the same statistics
                              as the signatures; the ViT's backbone is the one its first task
                              trained, as HALRP's)
- seq_ft                      one model fine-tuned task after task, its head growing by each
                              task's classes, cross-entropy over every class seen so far; its
                              learning rate swept over `--lrs` on validation at seed 0
- lifted-feature ridge        no adaptation, RanPAC-style: the frozen features through a fixed
                              seeded random projection to 2048 and ReLU, ridge regression over
                              per-task additive statistics (class sums, Gram matrix), its weight
                              chosen on the seen tasks' validation data
- halrp auto (default)        the library's `task_ids="auto"` as attached by default: the 2
                              best tasks by the frozen features' posterior; inputs whose best
                              posterior is below 0.999 also run through the second, and the
                              candidate with the best log posterior + 3 x its evidence answers
                              (its head's confidence and its own-feature prototype score, each
                              standardised on the task's validation data: `TaskEvidence`)
- top-k x evidence variants   the same with all inputs checked, top 3, evidence weight 1 or 10,
                              and the earlier rule (uncalibrated head confidence), all computed
                              from one top-3 pass per batch

The top-k coverage table gives how often the right task is among those k.

CI accuracy: correct predictions over all seen test samples after each task; "average" is its
mean over the steps, "last" its value after the last task. Retrieval: the share of samples
whose task was found. Cost: the median time of one batch of `--cost-batch` test samples
through task retrieval, against one task's forward of the same batch (seed 0, after the last
task, measured side by side in one process).

    python benchmarks/class_incremental.py                  # 4 sequences x 3 seeds (CPU: ~1 h)
    python benchmarks/class_incremental.py --sequences minilm-topics --seeds 1
    python benchmarks/class_incremental.py --quick          # CI: tiny, every code path

Writes benchmarks/results/class_incremental.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import protocol as Q  # noqa: E402  (the sequences and training loop study 8 uses)

import halrp_adapt  # noqa: E402
from halrp_adapt.handle.task_retrieval import (  # noqa: E402
    candidate_logits,
    compute_signature,
    head_features,
)
from halrp_adapt.method.task_signature import PrototypeScorer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SEQUENCES = ("vit-split-fmnist", "lite0-split-digits", "lite0-split-fmnist", "minilm-topics")
METHODS = ("halrp+retrieval (backbone)", "halrp+retrieval (task)", "oracle", "prototype",
           "seq_ft")
# Measured beside the methods, not a default: within the found task, the head's log-posterior
# plus the prototypes' (a product of the two classifiers' probabilities, nothing tuned).
FUSED = "halrp+retrieval, head x prototypes"
COST_RATIO_TARGET = 1.3
AUTO_COST_TARGET = 3.0  # issue 25: task_ids="auto" at the default candidates
# Issue 25. A RanPAC-style classifier on the frozen backbone: a fixed seeded random projection
# to LIFT_WIDTH, ReLU, ridge over per-task additive statistics (class sums, Gram matrix), the
# ridge weight chosen on the seen tasks' validation data.
LIFTED = "lifted-feature ridge, frozen backbone"
LIFT_WIDTH = 2048
RIDGE_GRID = tuple(10.0 ** e for e in range(-4, 3))  # x trace(G) / width
# Candidates, then a check in the tasks' own features (issue 25). The default runs through the
# library's path; the variants are computed from one top-3 pass per batch:
# name -> (k, check inputs whose best posterior is below, evidence weight); weight None is the
# earlier rule: log posterior + the head's (uncalibrated) largest log-softmax.
DEFAULT_AUTO = "halrp auto (default: top 2 x evidence)"
TOP_K = 3
CANDIDATES = {"halrp, top-2 x evidence, all checked": (2, 2.0, 3.0),
              "halrp, top-3 x evidence": (3, 0.999, 3.0),
              "halrp, top-2 x evidence, weight 1": (2, 0.999, 1.0),
              "halrp, top-2 x evidence, weight 10": (2, 0.999, 10.0),
              "halrp, top-2 x head confidence (uncalibrated)": (2, 2.0, None)}


def _inputs(batch: Any, device: torch.device) -> tuple[tuple, dict, torch.Tensor]:
    batch = Q.on(batch, device)
    if isinstance(batch, dict):
        return (), {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
    return (batch[0],), {}, batch[1]


def _shifted(data: list, offset: int) -> list:
    """The task's batches with labels moved to its place in the global class space."""
    if isinstance(data[0], dict):
        return [{**b, "labels": b["labels"] + offset} for b in data]
    return [(x, y + offset) for x, y in data]


def _ci(correct: list[int], totals: list[int]) -> float:
    return 100.0 * sum(correct) / max(sum(totals), 1)


# ---- a lifted-feature classifier on the frozen backbone (RanPAC-style) -------------------------
class LiftedRidge:
    """Frozen features lifted by a fixed random projection and ReLU, classified by ridge
    regression onto one-hot labels. What it keeps adds up task by task (per-class sums of the
    lifted features and their Gram matrix), so any set of tasks can be scored; a task's share
    is `stored_bytes_per_task` (float32)."""

    def __init__(self, dim: int, seed: int, width: int = LIFT_WIDTH) -> None:
        generator = torch.Generator().manual_seed(10_000 + seed)
        self.projection = torch.randn(dim, width, generator=generator, dtype=torch.float64)
        self.gram = torch.zeros(width, width, dtype=torch.float64)
        self.sums = torch.zeros(0, width, dtype=torch.float64)  # (global classes, width)
        self.weights: torch.Tensor | None = None
        self.task_bytes: list[int] = []

    def lift(self, features: torch.Tensor) -> torch.Tensor:
        return torch.relu(features.detach().cpu().double() @ self.projection)

    def add_task(self, features: torch.Tensor, labels: torch.Tensor, classes: int) -> None:
        """One task's training features and global labels (its classes follow the others')."""
        h = self.lift(features)
        sums = torch.zeros(classes, h.shape[1], dtype=torch.float64)
        sums.index_add_(0, labels.cpu() - self.sums.shape[0], h)
        self.gram += h.T @ h
        self.sums = torch.cat([self.sums, sums])
        self.task_bytes.append(4 * (self.gram.numel() + sums.numel()))

    def fit(self, val_features: torch.Tensor, val_labels: torch.Tensor) -> float:
        """The ridge weight with the best accuracy on `val` (of the seen tasks); returns it."""
        values, vectors = torch.linalg.eigh(self.gram)
        projected = vectors.T @ self.sums.T  # (width, classes)
        h = self.lift(val_features)
        scale = float(values.sum()) / len(values)
        best = (-1.0, RIDGE_GRID[0])
        for rel in RIDGE_GRID:
            weights = vectors @ (projected / (values + rel * scale).unsqueeze(1))
            acc = float(((h @ weights).argmax(1) == val_labels.cpu()).double().mean())
            if acc > best[0]:
                best = (acc, rel)
        self.weights = vectors @ (projected / (values + best[1] * scale).unsqueeze(1))
        return best[1]

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        assert self.weights is not None, "fit first"
        return (self.lift(features) @ self.weights).argmax(1).to(features.device)


@torch.no_grad()
def _frozen_features(cl: halrp_adapt.HalrpModel, data: list, offset: int,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    cl.eval()  # no dropout in the statistics
    features, labels = [], []
    for batch in data:
        args, kwargs, y = _inputs(batch, device)
        features.append(head_features(cl, None, *args, **kwargs))
        labels.append(y + offset)
    return torch.cat(features), torch.cat(labels)


def candidate_predict(candidates: tuple, k: int, check_below: float,
                      weight: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's (task index, local class) under one candidate rule, from
    `candidate_logits` at TOP_K with every input checked (its first k columns are the top k)."""
    ids, log_posterior, logits, evidence = (c[:, :k] for c in candidates)
    if weight is None:
        score = log_posterior.float() + torch.log_softmax(logits.float(), 2).amax(2)
    else:
        score = log_posterior.double() + weight * evidence.double()
    pick = score.argmax(1)
    sure = log_posterior[:, 0].exp() >= check_below
    pick = torch.where(sure, torch.zeros_like(pick), pick).unsqueeze(1)
    return ids.gather(1, pick).squeeze(1), logits.argmax(2).gather(1, pick).squeeze(1)


# ---- HALRP, told the task or not --------------------------------------------------------------
# Signature designs scored for retrieval: the default (backbone features, scatter kept as 64
# eigenpairs plus its diagonal), the whole scatter, 16 eigenpairs, and each task's own features.
DESIGNS = {"backbone": ("backbone", 64), "backbone, whole scatter": ("backbone", None),
           "backbone, rank 16": ("backbone", 16), "task": ("task", 64)}


@torch.no_grad()
def _score_step(cl: halrp_adapt.HalrpModel, seen: list[Q.Task], designs: dict[str, dict],
                split: str, device: torch.device,
                lifted: LiftedRidge | None = None) -> dict[str, Any]:
    """Every way of predicting a global class, on the `split` data of the seen tasks.

    The default design runs the real path (`predict_tasks`, then the mixed-batch forward).
    Classes of different tasks are disjoint, so routing a sample to another task is always a
    wrong class: every other design's hits are (task found) and (the oracle right)."""
    cl.eval()
    offsets = cl.class_offsets()
    names = [t.name for t in seen]
    scorers = {d: PrototypeScorer([designs[d][n] for n in names], shared=kind == "backbone",
                                  device=device) for d, (kind, _) in DESIGNS.items()}
    starts = torch.tensor([offsets[n][0] for n in names], device=device)
    columns = ["halrp+retrieval (backbone)", DEFAULT_AUTO, "halrp+retrieval (task)", "oracle",
               "prototype", FUSED, *CANDIDATES] + ([LIFTED] if lifted is not None else [])
    hits: dict[str, list[int]] = {m: [] for m in columns}
    covered = dict.fromkeys(range(1, TOP_K + 1), 0)
    found = dict.fromkeys(DESIGNS, 0)
    extra_hits = dict.fromkeys(DESIGNS, 0)
    totals = []
    default = scorers["backbone"]
    class_global = torch.cat([offsets[n][0] + idx.to(device)
                              for n, idx in zip(names, default.class_index, strict=True)])
    for index, task in enumerate(seen):
        right = dict.fromkeys(columns, 0)
        total = 0
        for batch in getattr(task, split):
            args, kwargs, labels = _inputs(batch, device)
            truth = labels + offsets[task.name][0]
            features = head_features(cl, None, *args, **kwargs)
            right["prototype"] += int((class_global[default.class_scores(features)
                                                    .argmax(1)] == truth).sum())
            if lifted is not None:
                right[LIFTED] += int((lifted.predict(features) == truth).sum())
            ranked = default.task_log_posterior(features).argsort(1, descending=True)
            for k in covered:
                covered[k] += int((ranked[:, :k] == index).any(1).sum())
            top = candidate_logits(cl, TOP_K, *args, check_below=2.0, **kwargs)  # once
            for name, (k, check_below, weight) in CANDIDATES.items():
                ids, local = candidate_predict(top, k, check_below, weight)
                right[name] += int(((ids == index) & (local == labels)).sum())
            auto = Q.logits_of(cl(*args, task_ids="auto", **kwargs))  # the library's default
            right[DEFAULT_AUTO] += int((auto.argmax(1) == truth).sum())
            oracle_logits = Q.logits_of(cl.forward_tasks(torch.full_like(labels, index), *args,
                                                         **kwargs))
            oracle = oracle_logits.argmax(1) == labels
            right["oracle"] += int(oracle.sum())
            # within the found task: the head's and the prototypes' log-posteriors added
            scores = default.class_scores(features)[:, default.owners == index]
            fused = (torch.log_softmax(oracle_logits.float(), 1)
                     + torch.log_softmax(0.5 * scores, 1)).argmax(1) == labels
            own = [head_features(cl, n, *args, **kwargs) for n in names]
            for design, (kind, _) in DESIGNS.items():
                ids = scorers[design].predict_tasks(features if kind == "backbone" else own)
                hit = (ids == index) & oracle
                found[design] += int((ids == index).sum())
                extra_hits[design] += int(hit.sum())
                if design == "backbone":  # the real path, end to end
                    local = Q.logits_of(cl.forward_tasks(ids, *args, **kwargs))
                    routed = starts[ids] + local.argmax(1) == truth
                    assert torch.equal(routed, hit), "routing disagrees with its definition"
                    right["halrp+retrieval (backbone)"] += int(routed.sum())
                if design == "task":
                    right["halrp+retrieval (task)"] += int(hit.sum())
                if design == "backbone":
                    right[FUSED] += int(((ids == index) & fused).sum())
            total += len(labels)
        for m in hits:
            hits[m].append(right[m])
        totals.append(total)
    return {"per_task": {m: [100.0 * h / n for h, n in zip(v, totals, strict=True)]
                         for m, v in hits.items()},
            "all_seen": {m: _ci(v, totals) for m, v in hits.items()},
            "retrieval": {d: 100.0 * v / max(sum(totals), 1) for d, v in found.items()},
            "top_k_coverage": {str(k): 100.0 * v / max(sum(totals), 1)
                               for k, v in covered.items()},
            "designs_all_seen": {d: 100.0 * v / max(sum(totals), 1)
                                 for d, v in extra_hits.items()}}


def run_halrp(seq: Q.Sequence, lr: float, seed: int, args) -> dict:
    torch.manual_seed(seed)
    device = args.device
    tasks = seq.tasks
    model = seq.backbone(tasks[0].num_classes).to(device)
    options = {"budget": args.budget, "train_base": seq.first_trains_backbone,
               "signature_rank": None}  # the whole scatter; each design cuts its own
    cl = halrp_adapt.attach(model, **options)
    designs: dict[str, dict] = {d: {} for d in DESIGNS}
    steps = []
    lifted: LiftedRidge | None = None
    ridge = []
    for t, task in enumerate(tasks):
        cl.add_task(task.name, num_classes=task.num_classes)
        trial_epochs, epochs = Q.halrp_epochs(args, seq.first_trains_backbone and t == 0)
        if trial_epochs:  # equal compute: the trial is one of the --epochs passes
            cl.estimate_ranks([Q.on(b, device) for b in task.train], epochs=trial_epochs)
        Q.fit(cl, Q.groups(cl, lr, Q.Variant()), task.train, epochs, device,
              extra_loss=cl.regularization_loss)
        train = [Q.on(b, device) for b in task.train]
        cl.end_task(calibration_data=train, held_out_data=[Q.on(b, device) for b in task.val])
        whole = cl.task_signature(task.name)
        for design, (kind, rank) in DESIGNS.items():
            designs[design][task.name] = (
                whole.compressed(rank) if kind == "backbone"
                else compute_signature(cl, task.name, train, "task", rank=rank))
        cl._tasks[task.name].signature = designs["backbone"][task.name]  # what attach stores
        offset = cl.class_offsets()[task.name][0]
        x, y = _frozen_features(cl, train, offset, device)
        lifted = lifted or LiftedRidge(x.shape[1], seed)
        lifted.add_task(x, y, task.num_classes)
        val = [_frozen_features(cl, s.val, cl.class_offsets()[s.name][0], device)
               for s in tasks[:t + 1]]
        ridge.append(lifted.fit(torch.cat([v[0] for v in val]), torch.cat([v[1] for v in val])))
        step = _score_step(cl, tasks[:t + 1], designs, "test", device, lifted)
        steps.append(step)
        print(f"    after {task.name}: " + "  ".join(
            f"{m} {a:.1f}" for m, a in step["all_seen"].items()) + "  found " + "  ".join(
            f"{k} {a:.1f}" for k, a in step["retrieval"].items()), flush=True)
    cost = measure_cost(cl, designs, tasks, args) if seed == 0 else None
    assert lifted is not None
    return {"steps": steps, "cost": cost, "ridge": ridge,
            "lifted_bytes_per_task": lifted.task_bytes,
            "signature_bytes": {d: [designs[d][t.name].nbytes for t in tasks] for d in DESIGNS},
            "stored_bytes_per_task": [4 * (cl.task_stats(t.name).stored_params
                                           + cl.task_stats(t.name).head_params)
                                      for t in tasks]}


@torch.no_grad()
def measure_cost(cl: halrp_adapt.HalrpModel, designs: dict[str, dict], tasks: list[Q.Task],
                 args) -> dict[str, float]:
    """Median seconds per batch, each kind of call interleaved with the others."""
    cl.eval()
    device = args.device
    rows = [b for t in tasks for b in t.test]
    args_, kwargs, _ = _inputs(rows[0], device)
    batch = args.cost_batch

    def cut(v):
        return v[:batch] if isinstance(v, torch.Tensor) else v

    args_ = tuple(cut(a) for a in args_)
    kwargs = {k: cut(v) for k, v in kwargs.items()}
    last = tasks[-1].name

    def use(kind: str) -> None:
        for t in tasks:
            cl._tasks[t.name].signature = designs[kind][t.name]

    def one_task():
        with cl.task(last):
            cl(*args_, **kwargs)

    def retrieve_backbone():
        use("backbone")
        cl.predict_tasks(*args_, **kwargs)

    def retrieve_task():
        use("task")
        cl.predict_tasks(*args_, **kwargs)

    def auto_with(k: int, check_below: float):
        def call():
            use("backbone")
            before = cl.config.retrieval_candidates, cl.config.retrieval_check_below
            cl.config.retrieval_candidates, cl.config.retrieval_check_below = k, check_below
            try:
                cl(*args_, task_ids="auto", **kwargs)
            finally:
                cl.config.retrieval_candidates, cl.config.retrieval_check_below = before
        return call

    calls = {"one_task_forward": one_task, "retrieval_backbone": retrieve_backbone,
             "retrieval_task": retrieve_task, "auto_forward_backbone": auto_with(1, 0.0),
             "auto_default": auto_with(cl.config.candidates, cl.config.retrieval_check_below),
             "candidates_top_2": auto_with(2, 2.0), "candidates_top_3": auto_with(3, 2.0)}
    times: dict[str, list[float]] = {k: [] for k in calls}
    for call in calls.values():  # warm up, and build each design's cached scorer
        call()
        call()
    for _ in range(args.cost_reps):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    use("backbone")
    median = {k: statistics.median(v) for k, v in times.items()}
    base = median["one_task_forward"]
    return {"batch": int(next(a for a in (*args_, *kwargs.values())
                             if isinstance(a, torch.Tensor)).shape[0]),
            "tasks": len(tasks), "seconds": median,
            "ratio": {k: v / base for k, v in median.items()}}


# ---- sequential fine-tuning, its head growing --------------------------------------------------
def _grow_head(model: nn.Module, head: str, more: int) -> None:
    old = model.get_submodule(head)
    assert isinstance(old, nn.Linear), f"{head} is {type(old).__name__}"
    new = nn.Linear(old.in_features, old.out_features + more).to(old.weight.device)
    with torch.no_grad():
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
    model.set_submodule(head, new)


@torch.no_grad()
def _seq_ft_score(model: nn.Module, seen: list[Q.Task], offsets: list[int], split: str,
                  device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for task, offset in zip(seen, offsets, strict=True):
        for batch in getattr(task, split):
            args, kwargs, labels = _inputs(batch, device)
            logits = Q.logits_of(model(*args, **kwargs))
            correct += int((logits.argmax(-1) == labels + offset).sum())
            total += len(labels)
    return 100.0 * correct / max(total, 1)


def run_seq_ft(seq: Q.Sequence, lr: float, seed: int, args) -> dict:
    torch.manual_seed(seed)
    device = args.device
    tasks = seq.tasks
    model = seq.backbone(tasks[0].num_classes).to(device)
    offsets: list[int] = []
    test, val = [], []
    for t, task in enumerate(tasks):
        offset = sum(s.num_classes for s in tasks[:t])
        offsets.append(offset)
        if t > 0:
            _grow_head(model, seq.head, task.num_classes)
        if hasattr(model, "config") and hasattr(model.config, "num_labels"):
            model.config.num_labels = offset + task.num_classes  # transformers reads it
        train = _shifted(task.train, offset)
        Q.fit(model, [{"params": list(model.parameters()), "lr": lr}], train, args.epochs,
              device)
        Q.recalibrate(model, train, device)
        test.append(_seq_ft_score(model, tasks[:t + 1], offsets, "test", device))
        val.append(_seq_ft_score(model, tasks[:t + 1], offsets, "val", device))
    return {"all_seen": test, "val_all_seen": val, "lr": lr}


# ---- the study ---------------------------------------------------------------------------------
def _halrp_rate(name: str, args) -> float:
    """HALRP's learning rate chosen in study 8 (on validation, at seed 0)."""
    table = json.loads(args.chosen_from.read_text())["summary"]["table"]
    return float(table[name]["halrp"]["lr"]) if name in table else 1e-3


def study(name: str, args) -> dict:
    lr = _halrp_rate(name, args)
    print(f"== {name}: HALRP lr {lr:g} (study 8)", flush=True)
    out: dict[str, Any] = {"halrp_lr": lr, "seeds": {}}
    sweep = {}
    for rate in args.lrs:
        seq = Q.make_sequence(name, 0, args)
        sweep[rate] = run_seq_ft(seq, rate, 0, args)
        print(f"  seq_ft lr {rate:g}: val average "
              f"{statistics.mean(sweep[rate]['val_all_seen']):.2f}", flush=True)
    chosen = max(sweep, key=lambda r: statistics.mean(sweep[r]["val_all_seen"]))
    out["seq_ft_sweep"] = {str(r): statistics.mean(v["val_all_seen"]) for r, v in sweep.items()}
    out["seq_ft_lr"] = chosen
    for seed in range(args.seeds):
        start = time.perf_counter()
        seq = Q.make_sequence(name, seed, args)
        halrp = run_halrp(seq, lr, seed, args)
        ft = sweep[chosen] if seed == 0 else run_seq_ft(Q.make_sequence(name, seed, args),
                                                          chosen, seed, args)
        curves = {m: [s["all_seen"][m] for s in halrp["steps"]]
                  for m in (*METHODS, DEFAULT_AUTO, FUSED, *CANDIDATES, LIFTED) if m != "seq_ft"}
        curves["seq_ft"] = ft["all_seen"]
        result = {
            "curves": curves,
            "average": {m: statistics.mean(c) for m, c in curves.items()},
            "last": {m: c[-1] for m, c in curves.items()},
            "retrieval_last": halrp["steps"][-1]["retrieval"],
            "top_k_coverage_last": halrp["steps"][-1]["top_k_coverage"],
            "top_k_coverage_average": {k: statistics.mean(s["top_k_coverage"][k]
                                                          for s in halrp["steps"])
                                       for k in halrp["steps"][-1]["top_k_coverage"]},
            "ridge": halrp["ridge"],
            "lifted_bytes_per_task": halrp["lifted_bytes_per_task"],
            "designs_average": {d: statistics.mean(s["designs_all_seen"][d]
                                                   for s in halrp["steps"]) for d in DESIGNS},
            "designs_last": halrp["steps"][-1]["designs_all_seen"],
            "ci_matrix": {m: [s["per_task"][m] for s in halrp["steps"]] for m in
                          ("halrp+retrieval (backbone)", DEFAULT_AUTO, "oracle")},
            "cost": halrp["cost"],
            "signature_bytes": halrp["signature_bytes"],
            "stored_bytes_per_task": halrp["stored_bytes_per_task"],
            "wall_s": time.perf_counter() - start,
        }
        out["seeds"][str(seed)] = result
        print(f"  seed {seed}: last " + "  ".join(
            f"{m} {a:.1f}" for m, a in result["last"].items()), flush=True)
    return out


def summarize(sequences: dict[str, dict]) -> dict:
    table: dict[str, Any] = {}
    for name, runs in sequences.items():
        seeds = list(runs["seeds"].values())
        row: dict[str, Any] = {}
        for metric in ("average", "last"):
            row[metric] = {m: statistics.mean(s[metric][m] for s in seeds) for m in METHODS}
            for extra in (DEFAULT_AUTO, FUSED, *CANDIDATES, LIFTED):
                if all(extra in s[metric] for s in seeds):
                    row[metric][extra] = statistics.mean(s[metric][extra] for s in seeds)
        for when in ("last", "average"):
            key = f"top_k_coverage_{when}"
            if all(key in s for s in seeds):
                row[key] = {k: statistics.mean(s[key][k] for s in seeds) for k in seeds[0][key]}
        if all("lifted_bytes_per_task" in s for s in seeds):
            row["lifted_bytes_per_task"] = statistics.mean(
                b for s in seeds for b in s["lifted_bytes_per_task"])
        row["retrieval"] = {k: statistics.mean(s["retrieval_last"][k] for s in seeds)
                            for k in DESIGNS}
        for metric in ("designs_average", "designs_last"):
            row[metric] = {d: statistics.mean(s[metric][d] for s in seeds) for d in DESIGNS}
        row["cost_ratio"] = next((s["cost"]["ratio"] for s in seeds if s["cost"]), None)
        row["signature_bytes"] = {d: statistics.mean(b for s in seeds
                                                     for b in s["signature_bytes"][d])
                                  for d in DESIGNS}
        row["stored_bytes_per_task"] = statistics.mean(
            b for s in seeds for b in s["stored_bytes_per_task"])
        row["seeds"] = len(seeds)
        table[name] = row
    best = DEFAULT_AUTO
    peers = ("prototype", LIFTED, "seq_ft")
    beats = {name: {peer: {metric: r[metric][best] > r[metric][peer]
                           for metric in ("average", "last")}
                    for peer in peers if peer in r["average"] and best in r["average"]}
             for name, r in table.items()}
    ratios = {name: r["cost_ratio"]["retrieval_backbone"] for name, r in table.items()
              if r["cost_ratio"]}
    auto = {name: r["cost_ratio"]["auto_default"] for name, r in table.items()
            if r["cost_ratio"] and "auto_default" in r["cost_ratio"]}
    targets = {
        "auto_above_prototype_lifted_ridge_and_seq_ft_on_every_sequence": {
            "met": all(len(b) == len(peers) for b in beats.values())
            and all(v for b in beats.values() for p in b.values() for v in p.values()),
            "detail": beats},
        f"auto_at_most_{AUTO_COST_TARGET}x_one_task_forward_at_the_default": {
            "met": bool(auto) and all(v <= AUTO_COST_TARGET for v in auto.values()),
            "ratios": auto},
        f"retrieval_at_most_{COST_RATIO_TARGET}x_one_task_forward": {
            "met": bool(ratios) and all(v <= COST_RATIO_TARGET for v in ratios.values()),
            "ratios": ratios},
    }
    return {"table": table, "targets": targets}


def _write(path: Path, args, argv: list[str] | None, sequences: dict, wall_s: float,
           ran: list[str] | None = None) -> dict:
    command = "python benchmarks/class_incremental.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    out = {"command": command.strip(), "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
                      f"{args.device.type}",
           "settings": {k: (str(v) if isinstance(v, (Path, torch.device)) else v)
                        for k, v in vars(args).items()},
           "wall_s": wall_s, "sequences": sequences, "summary": summarize(sequences)}
    if ran:
        out["ran"] = ran
    if getattr(args, "note", None):
        out["note"] = args.note
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1, default=str) + "\n")
    tmp.replace(path)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI: tiny, every code path")
    parser.add_argument("--sequences", default=",".join(SEQUENCES))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lrs", default="1e-4,1e-3,1e-2", help="seq_ft's sweep")
    Q.add_protocol_args(parser)  # study 8's epochs, batches, budget, image size, data, device
    parser.add_argument("--cost-batch", type=int, default=64)
    parser.add_argument("--cost-reps", type=int, default=15)
    parser.add_argument("--chosen-from", type=Path, default=RESULTS / "quality.json",
                        help="study 8's results, for HALRP's chosen learning rates")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="results files of runs over other sequences: one table, nothing run")
    parser.add_argument("--note", default=None,
                        help="with --merge: how the parts were made, kept in the results")
    args = parser.parse_args(argv)
    args.lrs = [float(v) for v in args.lrs.split(",")]
    if args.quick:
        args.seeds, args.lrs, args.epochs, args.cost_reps = 1, args.lrs[:1], 2, 2
    args.device = torch.device(args.device)
    if args.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    names = [s for s in args.sequences.split(",") if s]
    unknown = [s for s in names if s not in Q.SEQUENCES]
    if unknown:
        parser.error(f"--sequences: unknown {unknown}; allowed: {', '.join(SEQUENCES)}")
    start = time.perf_counter()
    path = args.out or RESULTS / ("class_incremental_quick.json" if args.quick
                                  else "class_incremental.json")
    sequences: dict[str, dict] = {}
    if args.merge:  # parallel runs over disjoint sequences (e.g. one process each)
        parts = [json.loads(f.read_text()) for f in args.merge]
        for part in parts:
            sequences.update(part["sequences"])
        out = _write(path, args, argv, sequences, sum(p["wall_s"] for p in parts),
                     ran=[p["command"] for p in parts])
    for name in [] if args.merge else names:  # written after each sequence: a stopped run
        sequences[name] = study(name, args)   # keeps what it measured
        out = _write(path, args, argv, sequences, time.perf_counter() - start)
    summary = out["summary"]
    for name, row in summary["table"].items():
        print(f"{name}: last " + "  ".join(f"{m} {a:.2f}" for m, a in row["last"].items()))
    for target, value in summary["targets"].items():
        print(f"target {target}: {'met' if value['met'] else 'MISSED'}")
    return out


if __name__ == "__main__":
    main()
