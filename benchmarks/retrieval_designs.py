"""Study 10b: which evidence finds an input's task? Designs for `task_ids="auto"` replayed on
the features of study 10's runs (issue 25).

Study 10 runs each design through the model, which costs forwards per batch and per design.
Every design here only reads, per test sample: the frozen backbone's features, each task's
head logits and adapted features (the head's input) with that task active, and whether
HALRP told the task is right. Those are collected once per sequence and seed, with study 10's
training exactly (same protocol, seeds and learning rates), so a new design costs seconds.
Old tasks are bit-identical after they end, so one collection after the last task serves
every step. The replayed default and k=1 rows match study 10's, run through the model, within
0.3 points (float rounding of the one-pass forward near decisions).

A sample counts as right when its task is picked and its task's head is right (classes of
different tasks are disjoint), as in study 10. Designs:

- frozen features alone         the library with retrieval_candidates=1: the task of the best
                                prototype under the shrunk LDA on the frozen features (scatter
                                as 64 eigenpairs)
- top 2 x evidence (default)    the library's default: inputs below 0.999 posterior also run
                                through their second task; log posterior + 3 x evidence
- evidence parts                the head's confidence alone or the own-feature prototype score
                                alone, each standardised on validation data (a calibrated
                                head is the issue's item 3)
- evidence on training data     both readings standardised on the training batches (what
                                end_task does without held_out_data)
- lifted posterior              the same LDA on lifted features (seeded projection to 2048 of
                                the L2-normalised features, ReLU; issue item 2), alone and
                                with the evidence; "raw + lifted" averages both log posteriors
- baselines                     prototype (frozen features, nearest class mean under the shrunk
                                pooled covariance) and the lifted-feature ridge (RanPAC-style)
                                of study 10

    python benchmarks/retrieval_designs.py --max-train-batches 6     # ~25 min on 2 CPU cores
    python benchmarks/retrieval_designs.py --replay-only             # designs on saved features
    python benchmarks/retrieval_designs.py --quick                   # CI: tiny, every code path

Writes benchmarks/results/retrieval_designs.json; the features go to --features (gitignored).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import class_incremental as CI  # noqa: E402  (study 10: its sequences, training and baselines)
import protocol as Q  # noqa: E402

import halrp_adapt  # noqa: E402
from halrp_adapt.handle.task_retrieval import head_features  # noqa: E402
from halrp_adapt.method.task_evidence import TaskEvidence, readings  # noqa: E402
from halrp_adapt.method.task_signature import (  # noqa: E402
    PrototypeScorer,
    SignatureAccumulator,
    TaskSignature,
)

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHT, CHECK_BELOW, RANK = 3.0, 0.999, 64  # the library's defaults


# ---- collection: study 10's training, then what every design reads -----------------------------
@torch.no_grad()
def _through(cl: halrp_adapt.HalrpModel, task: int | None, data: list,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(head inputs, logits) of every batch run through task index `task` (None: frozen)."""
    features, logits = [], []
    name = None if task is None else cl.tasks[task]
    for batch in data:
        args, kwargs, _ = CI._inputs(batch, device)
        features.append(head_features(cl, name, *args, **kwargs))
        if task is not None:
            with cl.task(name):
                logits.append(Q.logits_of(cl(*args, **kwargs)))
    return torch.cat(features).cpu(), (torch.cat(logits).cpu() if logits else torch.empty(0))


def collect(name: str, seed: int, args) -> dict:
    torch.manual_seed(seed)
    device = args.device
    seq = Q.make_sequence(name, seed, args)
    lr = CI._halrp_rate(name, args)
    cl = halrp_adapt.attach(seq.backbone(seq.tasks[0].num_classes).to(device), budget=args.budget,
                            train_base=seq.first_trains_backbone, retrieval_candidates=1)
    tasks = []
    for t, task in enumerate(seq.tasks):
        cl.add_task(task.name, num_classes=task.num_classes)
        trial_epochs, epochs = Q.halrp_epochs(args, seq.first_trains_backbone and t == 0)
        if trial_epochs:
            cl.estimate_ranks([Q.on(b, device) for b in task.train], epochs=trial_epochs)
        Q.fit(cl, Q.groups(cl, lr, Q.Variant()), task.train, epochs, device,
              extra_loss=cl.regularization_loss)
        cl.end_task(calibration_data=[Q.on(b, device) for b in task.train])
        cl.eval()
        labels = {s: torch.cat([CI._inputs(b, device)[2] for b in getattr(task, s)]).cpu()
                  for s in ("train", "val", "test")}
        record: dict[str, Any] = {"classes": task.num_classes, "labels": labels}
        for split in ("train", "val", "test"):  # the frozen features (the base never changes
            record[f"{split}_frozen"] = _through(cl, None, getattr(task, split), device)[0]
        record["own"] = {}  # filled after the last task: (task j) -> split -> (features, logits)
        tasks.append(record)
    for i, task in enumerate(seq.tasks):
        tasks[i]["own"] = {j: {s: _through(cl, j, getattr(task, s), device)
                               for s in ("train", "val", "test") if j == i or s == "test"}
                           for j in range(len(seq.tasks))}
    return {"sequence": name, "seed": seed, "tasks": tasks}


# ---- the designs --------------------------------------------------------------------------------
def _lift(dim: int, seed: int,
          width: int = CI.LIFT_WIDTH) -> Callable[[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 + seed)
    projection = torch.randn(dim, width, generator=generator, dtype=torch.float64)
    return lambda x: torch.relu(torch.nn.functional.normalize(x.double(), dim=1) @ projection)


def _signature(features: torch.Tensor, labels: torch.Tensor, kind: str) -> TaskSignature:
    acc = SignatureAccumulator()
    acc.update(features, labels)
    return acc.finish(kind).compressed(RANK)


def _scorer(tasks: list[dict], transform) -> PrototypeScorer:
    return PrototypeScorer([_signature(transform(t["train_frozen"]), t["labels"]["train"],
                                       "backbone") for t in tasks])


def _evidence(tasks: list[dict],
              calibrate_on: str) -> dict[tuple[int, int], dict[str, torch.Tensor]]:
    """z-scores of each task j's two readings on each task i's test samples, by the library's
    `TaskEvidence` standardised on task j's `calibrate_on` split."""
    out = {}
    for j, t in enumerate(tasks):
        own = _signature(t["own"][j]["train"][0], t["labels"]["train"], "task")
        evidence = TaskEvidence.calibrated(own, *t["own"][j][calibrate_on])
        scorer = evidence.scorer()
        for i, s in enumerate(tasks):
            confidence, distance = readings(scorer, *s["own"][j]["test"])
            (mc, sc), (md, sd) = evidence.confidence_moments, evidence.distance_moments
            out[(i, j)] = {"confidence": (confidence - mc) / sc, "distance": (distance - md) / sd}
    return out


def _halrp_hits(tasks: list[dict], log_posterior: list[torch.Tensor],
                evidence: dict | None, parts: tuple[str, ...]) -> float:
    """% of the seen tasks' test samples whose picked task is right and whose head is right."""
    hits, total = 0, 0
    for i, t in enumerate(tasks):
        lp = log_posterior[i]
        pick = lp.argmax(1)
        if evidence is not None and len(tasks) > 1:
            z = torch.stack([sum(evidence[(i, j)][p] for p in parts) for j in range(len(tasks))], 1)
            top = lp.topk(2, 1).indices
            score = (lp + WEIGHT * z).gather(1, top)
            checked = top.gather(1, score.argmax(1, keepdim=True)).squeeze(1)
            pick = torch.where(lp.max(1).values.exp() >= CHECK_BELOW, pick, checked)
        head_right = t["own"][i]["test"][1].argmax(1) == t["labels"]["test"]
        hits += int(((pick == i) & head_right).sum())
        total += len(pick)
    return 100.0 * hits / total


def replay(record: dict) -> dict[str, list[float]]:
    """Each design's class-incremental accuracy after each step."""
    tasks_all = record["tasks"]
    lift = _lift(tasks_all[0]["train_frozen"].shape[1], record["seed"])
    curves: dict[str, list[float]] = {}
    for step in range(len(tasks_all)):
        tasks = tasks_all[: step + 1]
        offsets = [sum(t["classes"] for t in tasks[:i]) for i in range(len(tasks))]
        raw, lifted = _scorer(tasks, lambda x: x), _scorer(tasks, lift)
        post = {"raw": [raw.task_log_posterior(t["test_frozen"]) for t in tasks],
                "lifted": [lifted.task_log_posterior(lift(t["test_frozen"])) for t in tasks]}
        post["raw + lifted"] = [(a + b) / 2 for a, b in zip(post["raw"], post["lifted"],
                                                                strict=True)]
        held_out, train = _evidence(tasks, "val"), _evidence(tasks, "train")
        both = ("confidence", "distance")
        # the library's k=1 rule: the task of the best prototype (not the summed posterior)
        best = [raw.task_scores(t["test_frozen"]) for t in tasks]
        designs = {
            "frozen features alone (k=1)": _halrp_hits(tasks, best, None, ()),
            "top 2 x evidence (default)": _halrp_hits(tasks, post["raw"], held_out, both),
            "top 2 x calibrated head confidence only": _halrp_hits(
                tasks, post["raw"], held_out, ("confidence",)),
            "top 2 x own-feature distance only": _halrp_hits(
                tasks, post["raw"], held_out, ("distance",)),
            "top 2 x evidence calibrated on training data": _halrp_hits(
                tasks, post["raw"], train, both),
            "lifted posterior alone": _halrp_hits(tasks, post["lifted"], None, ()),
            "lifted posterior, top 2 x evidence": _halrp_hits(
                tasks, post["lifted"], held_out, both),
            "raw + lifted posterior, top 2 x evidence": _halrp_hits(
                tasks, post["raw + lifted"], held_out, both),
        }
        truth = torch.cat([t["labels"]["test"] + o for t, o in zip(tasks, offsets, strict=True)])
        frozen = torch.cat([t["test_frozen"] for t in tasks])
        global_class = torch.cat([o + idx for o, idx in zip(offsets, raw.class_index,
                                                               strict=True)])
        designs["baseline: prototype"] = 100.0 * float(
            (global_class[raw.class_scores(frozen).argmax(1)] == truth).double().mean())
        ridge = CI.LiftedRidge(frozen.shape[1], record["seed"])
        for t, o in zip(tasks, offsets, strict=True):
            ridge.add_task(t["train_frozen"], t["labels"]["train"] + o, t["classes"])
        ridge.fit(torch.cat([t["val_frozen"] for t in tasks]),
                  torch.cat([t["labels"]["val"] + o for t, o in zip(tasks, offsets, strict=True)]))
        designs["baseline: lifted-feature ridge"] = 100.0 * float(
            (ridge.predict(frozen) == truth).double().mean())
        for name, value in designs.items():
            curves.setdefault(name, []).append(value)
    return curves


def summarize(runs: dict[str, list[dict[str, list[float]]]]) -> dict:
    table = {}
    for name, seeds in runs.items():
        designs = seeds[0].keys()
        table[name] = {d: {"average": statistics.mean(statistics.mean(s[d]) for s in seeds),
                           "last": statistics.mean(s[d][-1] for s in seeds)} for d in designs}
        table[name]["seeds"] = len(seeds)
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI: tiny, every code path")
    parser.add_argument("--sequences", default=",".join(CI.SEQUENCES))
    parser.add_argument("--seeds", type=int, default=3)
    Q.add_protocol_args(parser)
    parser.add_argument("--chosen-from", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--features", type=Path, default=RESULTS / "retrieval_designs_features")
    parser.add_argument("--replay-only", action="store_true",
                        help="replay the designs on features collected before")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.max_tasks = 1, 2, 2
        args.max_train_batches = args.max_train_batches or 2
    args.device = torch.device(args.device)
    start = time.perf_counter()
    runs: dict[str, list] = {}
    for name in [s for s in args.sequences.split(",") if s]:
        for seed in range(args.seeds):
            path = args.features / f"{name}_{seed}.pt"
            if not args.replay_only:
                record = collect(name, seed, args)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(record, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").replace(path)
            record = torch.load(path)
            runs.setdefault(name, []).append(replay(record))
            print(f"{name} seed {seed}: " + "  ".join(
                f"{d} {c[-1]:.2f}" for d, c in runs[name][-1].items()), flush=True)
    table = summarize(runs)
    out = {"command": "python benchmarks/retrieval_designs.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "date": time.strftime("%Y-%m-%d"),
           "settings": {k: str(v) for k, v in vars(args).items()},
           "wall_s": time.perf_counter() - start, "table": table}
    path = args.out or RESULTS / ("retrieval_designs_quick.json" if args.quick
                                  else "retrieval_designs.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(out, indent=1) + "\n")
    path.with_suffix(".tmp").replace(path)
    for name, rows in table.items():
        print(f"\n{name} ({rows['seeds']} seeds): average / last")
        for design, v in rows.items():
            if design != "seeds":
                print(f"  {design:48s} {v['average']:6.2f} / {v['last']:6.2f}")
    return out


if __name__ == "__main__":
    main()
