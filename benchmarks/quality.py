"""Study 8: learning quality across backbones, task sequences, seeds and task orders.

Five methods get the same data, passes over it, batches and learning-rate sweep on every
sequence (equal compute: HALRP's trial fine-tune is one of the `--epochs` passes, so it trains
`epochs - 1` after it, the reference's way; wall seconds per task are reported):

- halrp:    this project, every option at its default (budget 0.05)
- lora:     PEFT LoRA, one adapter + norms + head per task, uniform rank sized to the same
            budget, counted the same way (norm running statistics included, heads apart)
- adalora:  PEFT AdaLoRA at the same budget (target rank sized like LoRA's, initial 1.5x)
- full_ft:  a full copy of the backbone per task (upper bound)
- seq_ft:   one backbone fine-tuned task after task, a head per task (forgetting bound)

Sequences (`--sequences`):

- lite0-split-fmnist     EfficientNet-Lite0 (ImageNet), Fashion-MNIST 5 tasks x 2 classes
- lite1-permuted-fmnist  EfficientNet-Lite1 (ImageNet), Fashion-MNIST 4 pixel permutations x 10
- lite0-split-digits     EfficientNet-Lite0, scikit-learn digits 5 x 2
- minilm-topics          all-MiniLM-L6-v2, the text topics, 4 tasks x 2 topics
- vit-split-fmnist       a small ViT (6 blocks, patch 4; the quickstart demo's until 2026-12),
                         its first task trains the backbone, 5 x 2

The protocol: each task's training data loses 15% to a validation split. Each method trains with
each learning rate of `--lrs` at seed 0 and the rate with the best validation ACC is kept (never
the test set); seeds 1 and 2 then run at that rate; ACC is the mean over the 3 seeds. With
`--orders K`, the first sequences of `--order-sequences` are also learned in K - 1 more task
orders (seed 0, chosen rates) for OPD / MOPD / AOPD. `--ablations` runs HALRP variants (trial
learning rate and length, learning rates per kind of parameter, the factors' start, which
layers get scales) on every sequence and seed at HALRP's chosen rate; `--ablation-labels` picks
some of them.

Every method's BatchNorm statistics are recomputed with its final weights when a task ends.

    python benchmarks/quality.py                                  # everything (hours on CPU)
    python benchmarks/quality.py --sequences minilm-topics --orders 5 --ablations
    python benchmarks/quality.py --device cuda --sequences lite0-split-fmnist --out part.json
    python benchmarks/quality.py --merge results/quality_*.json   # one table from parts
    python benchmarks/quality.py --quick                          # CI: tiny, every code path

Writes benchmarks/results/quality.json (or `--out`) and, when merging or running everything,
quality.png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol.fitting import add_protocol_args  # noqa: E402
from protocol.halrp import ABLATIONS, QUICK_ABLATIONS, run_halrp  # noqa: E402
from protocol.peers import plan_peer, run_full_ft, run_peer, run_seq_ft  # noqa: E402
from protocol.sequences import SEQUENCES, make_sequence  # noqa: E402

from halrp_adapt.training.metrics import (  # noqa: E402
    average_accuracy,
    backward_transfer,
    order_robustness,
)

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("halrp", "lora", "adalora", "full_ft", "seq_ft")
ORDER_SEQUENCES = ("lite0-split-fmnist", "minilm-topics")


def run_methods(seq, tasks, lrs: dict[str, float], seed: int, args, methods: list[str]) -> dict:
    """Every method on `tasks` at its rate in `lrs`, each peer sized to `--budget`
    (`protocol.peers.plan_peer`), all at `--epochs` passes per task."""
    out: dict[str, Any] = {}
    for method in methods:
        start = time.perf_counter()
        if method == "halrp":
            result = run_halrp(seq, tasks, lrs[method], seed, args)
        elif method == "full_ft":
            result = run_full_ft(seq, tasks, lrs[method], seed, args)
        elif method == "seq_ft":
            result = run_seq_ft(seq, tasks, lrs[method], seed, args)
        else:
            plan = plan_peer(seq, method, args.budget)
            if plan is None:
                print(f"    {method:<8} PEFT supports none of this backbone's layers: skipped")
                continue
            result = run_peer(plan, seq, tasks, lrs[method], seed, args)
        result.update(acc=average_accuracy(result["test"]), bwt=backward_transfer(result["test"]),
                      val_acc=average_accuracy(result["val"]), lr=lrs[method],
                      wall_s=time.perf_counter() - start)
        out[method] = result
        print(f"    {method:<8} lr {lrs[method]:g}  val {result['val_acc']:6.2f}  test ACC "
              f"{result['acc']:6.2f}  BWT {result['bwt']:+6.2f}  params/task "
              f"{sum(result['params_per_task']) / len(result['params_per_task']):>11,.0f}  "
              f"{result['wall_s']:5.0f} s", flush=True)
    return out


def chosen_rates(sweep: dict[str, dict], methods: list[str]) -> dict[str, float]:
    """Each method's rate with the best validation ACC at seed 0 (never the test set)."""
    return {m: float(max(sweep, key=lambda lr: sweep[lr][m]["val_acc"])) for m in methods}


def jobs_of(name: str, args) -> list[str]:
    """One sequence's work as independent jobs (`--job`): 'sweep:LR' first, then 'seed:N',
    'order:K' and 'ablation:N', which need the chosen rates."""
    jobs = [f"sweep:{lr:g}" for lr in args.lrs]
    jobs += [f"seed:{s}" for s in range(1, args.seeds)]
    if args.orders > 1 and name in args.order_sequences:
        jobs += [f"order:{k}" for k in range(1, args.orders)]
    if args.ablations:
        jobs += [f"ablation:{s}" for s in range(1 if args.quick else args.seeds)]
    return jobs


def run_job(name: str, job: str, args, chosen: dict[str, float] | None) -> dict:
    """One job's part of a sequence's results (merged by `merge_parts`)."""
    kind, value = job.split(":")
    print(f"== {name} {job}", flush=True)
    if kind == "sweep":
        lr = float(value)
        seq = make_sequence(name, 0, args)
        return {"sweep": {str(lr): run_methods(seq, seq.tasks, dict.fromkeys(args.methods, lr), 0,
                                               args, args.methods)}}
    assert chosen is not None, "seed, order and ablation jobs need the sweep's chosen rates"
    if kind == "seed":
        seq = make_sequence(name, int(value), args)
        return {"seeds": {value: run_methods(seq, seq.tasks, chosen, int(value), args,
                                             args.methods)}}
    if kind == "order":
        seq = make_sequence(name, 0, args)
        order = torch.randperm(len(seq.tasks),
                               generator=torch.Generator().manual_seed(100 + int(value))).tolist()
        if seq.first_trains_backbone:  # the backbone's task stays first
            order = [0] + [i for i in order if i != 0]
        print(f"  order {order}", flush=True)
        result = run_methods(seq, [seq.tasks[i] for i in order], chosen, 0, args, args.methods)
        return {"orders": {value: {"order": order, "result": result}}}
    if kind == "ablation":
        seed = int(value)
        seq = make_sequence(name, seed, args)
        out = {}
        for label, variant in ABLATIONS.items():
            if label not in args.ablation_labels:
                continue
            start = time.perf_counter()
            result = run_halrp(seq, seq.tasks, chosen["halrp"], seed, args, variant)
            out[label] = {value: {"acc": average_accuracy(result["test"]),
                                  "params_per_task": sum(result["params_per_task"])
                                  / len(result["params_per_task"]),
                                  "wall_s": time.perf_counter() - start,
                                  "explained_ranks": result["explained_ranks"],
                                  "estimate_s_without_trial":
                                      result["estimate_s_without_trial"]}}
            print(f"  ablation {label:<26} seed {seed} ACC {out[label][value]['acc']:6.2f}",
                  flush=True)
        return {"ablations": out}
    raise SystemExit(f"--job: unknown {job!r}; allowed: sweep:LR, seed:N, order:K, ablation:N")


def merge_parts(parts: list[dict], methods: list[str]) -> dict:
    """Deep-merge job parts into one sequence's runs; seed 0 is the sweep at the chosen rates."""
    runs: dict[str, Any] = {"sweep": {}, "seeds": {}, "orders": {}, "ablations": {}}
    for part in parts:
        for key, value in part.items():
            if key == "ablations":
                for label, by_seed in value.items():
                    runs["ablations"].setdefault(label, {}).update(by_seed)
            else:
                runs[key].update(value)
    runs["chosen_lr"] = chosen_rates(runs["sweep"], methods)
    runs["seeds"]["0"] = {m: runs["sweep"][str(runs["chosen_lr"][m])][m] for m in methods}
    return runs


def study_sequence(name: str, args) -> dict:
    """Every job of one sequence in this process: the sweep, then the rest at chosen rates."""
    parts = [run_job(name, job, args, None) for job in jobs_of(name, args)
             if job.startswith("sweep")]
    chosen = chosen_rates({k: v for p in parts for k, v in p["sweep"].items()}, args.methods)
    print(f"  chosen on validation: {chosen}", flush=True)
    parts += [run_job(name, job, args, chosen) for job in jobs_of(name, args)
              if not job.startswith("sweep")]
    return merge_parts(parts, args.methods)


# ---- summary ---------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(sequences: dict[str, dict], methods: list[str]) -> dict:
    table: dict[str, Any] = {}
    for name, runs in sequences.items():
        row = {}
        for m in methods:
            accs = [runs["seeds"][s][m]["acc"] for s in runs["seeds"]]
            params = [sum(runs["seeds"][s][m]["params_per_task"])
                      / len(runs["seeds"][s][m]["params_per_task"]) for s in runs["seeds"]]
            mean, sd = _mean_sd(accs)
            row[m] = {"acc_mean": mean, "acc_sd": sd, "seeds": len(accs),
                      "params_per_task": statistics.mean(params), "lr": runs["chosen_lr"][m],
                      "wall_s": statistics.mean(runs["seeds"][s][m]["wall_s"]
                                                for s in runs["seeds"]),
                      "task_s": statistics.mean(statistics.mean(runs["seeds"][s][m]["task_s"])
                                                for s in runs["seeds"]
                                                if runs["seeds"][s][m].get("task_s"))
                      if any(runs["seeds"][s][m].get("task_s") for s in runs["seeds"]) else None}
            if runs["orders"]:
                finals = []
                for result, order in [(runs["seeds"]["0"][m], None)] + [
                        (o["result"][m], o["order"]) for o in runs["orders"].values()]:
                    names = [f"t{i}" for i in (order or range(len(result["test"])))]
                    finals.append(dict(zip(names, result["test"][-1], strict=True)))
                row[m]["order_robustness"] = order_robustness(finals)
        table[name] = row
    if not table:
        raise SystemExit("no sequence finished its sweep: nothing to summarize")
    overall = {m: statistics.mean(table[s][m]["acc_mean"] for s in table) for m in methods}
    targets: dict[str, bool] = {}
    if {"halrp", "lora"} <= set(methods):
        targets["halrp_acc_at_least_lora_on_every_sequence"] = all(
            table[s]["halrp"]["acc_mean"] >= table[s]["lora"]["acc_mean"] for s in table)
    if {"halrp", "full_ft"} <= set(methods):
        targets["halrp_within_2_points_of_full_ft_on_average"] = \
            overall["halrp"] >= overall["full_ft"] - 2
    isolation = [m for m in ("halrp", "lora", "adalora", "full_ft") if m in methods]
    with_orders = [s for s in table if "order_robustness" in table[s][methods[0]]]
    if "halrp" in methods and with_orders:
        targets["halrp_mopd_lowest_of_isolation_methods"] = all(
            table[s]["halrp"]["order_robustness"]["MOPD"]
            <= min(table[s][m]["order_robustness"]["MOPD"] for m in isolation)
            for s in with_orders)
    ablations = {}
    for name, runs in sequences.items():
        for label, by_seed in runs.get("ablations", {}).items():
            ablations.setdefault(label, {})[name] = statistics.mean(
                a["acc"] for a in by_seed.values())
    return {"table": table, "overall_acc": overall, "targets": targets, "ablations": ablations}


def print_summary(summary: dict, methods: list[str]) -> None:
    print(f"\n{'sequence':<24}" + "".join(f"{m:>16}" for m in methods))
    for name, row in summary["table"].items():
        print(f"{name:<24}" + "".join(
            f"{row[m]['acc_mean']:>9.2f} ±{row[m]['acc_sd']:4.1f}" for m in methods))
    print(f"{'mean':<24}" + "".join(f"{summary['overall_acc'][m]:>16.2f}" for m in methods))
    if summary["ablations"]:
        print("\nablations (HALRP ACC, mean over seeds):")
        for label, per in summary["ablations"].items():
            print(f"  {label:<26}" + "".join(f"{v:8.2f}" for v in per.values())
                  + f"   mean {statistics.mean(per.values()):6.2f}")
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}"
                                for k, v in summary["targets"].items()))


def plot(path: Path, summary: dict, methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["table"])
    fig, ax = plt.subplots(figsize=(max(6, 2 * len(names)), 3.4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [summary["table"][s][m]["acc_mean"] for s in names], width,
               yerr=[summary["table"][s][m]["acc_sd"] for s in names], label=m, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=8)
    lows = [summary["table"][s][m]["acc_mean"] for s in names for m in methods]
    ax.set_ylim(max(0, min(lows) - 10), 100)
    ax.set_ylabel("ACC (%), mean ± sd over seeds")
    ax.legend(fontsize=7, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _settings(args) -> dict:
    skip = {"merge", "job", "chosen_from", "parallel", "parts", "deadline_s"}
    return {k: (str(v) if isinstance(v, (torch.device, Path)) else v)
            for k, v in vars(args).items() if k not in skip}


def _machine(args) -> str:
    gpu = f" ({torch.cuda.get_device_name()})" if args.device.type == "cuda" else ""
    return f"{platform.platform()}, {os.cpu_count()} CPUs, {args.device}{gpu}"


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _sweep_parts(files: list[Path], name: str) -> dict:
    sweep: dict = {}
    for f in files:
        part = json.loads(f.read_text()).get("part", {})
        if part.get("sequence") == name and "sweep" in part.get("data", {}):
            sweep.update(part["data"]["sweep"])
    return sweep


def run_parallel(args, given: list[str]) -> list[Path]:
    """Every job of every sequence in `--parallel` subprocesses: the sweeps first, then the
    jobs that need their chosen rates. Jobs still running at `--deadline-s` are stopped; the
    parts that finished are kept."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.monotonic() + args.deadline_s
    args.parts.mkdir(parents=True, exist_ok=True)
    passthrough, skip = [], False
    for arg in given:  # the children get every option but the driver's own
        if skip:
            skip = False
        elif arg.split("=")[0] in ("--parallel", "--parts", "--deadline-s", "--out"):
            skip = "=" not in arg
        else:
            passthrough.append(arg)

    def launch(name: str, job: str) -> Path | None:
        out = args.parts / f"{name}_{job.replace(':', '_')}.json"
        log = out.with_suffix(".log")
        command = [sys.executable, __file__, *passthrough, "--sequences", name, "--job", job,
                   "--out", str(out), "--chosen-from", str(args.parts)]
        left = deadline - time.monotonic()
        if left < 30:
            return None
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log.open("w") as handle:
            try:
                done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                      timeout=left)
            except subprocess.TimeoutExpired:
                print(f"  {name} {job}: stopped at the deadline", flush=True)
                return None
        if done.returncode != 0:
            print(f"  {name} {job}: failed, see {log}", flush=True)
            return None
        print(f"  {name} {job}: done", flush=True)
        return out

    names = args.sequences.split(",")
    finished: list[Path] = []
    for phase in (True, False):
        todo = [(n, j) for n in names for j in jobs_of(n, args)
                if j.startswith("sweep") == phase]
        with ThreadPoolExecutor(args.parallel) as pool:
            finished += [p for p in pool.map(lambda nj: launch(*nj), todo) if p is not None]
    return finished


def _job_free(command: str) -> str:
    """A part's command without its per-job options: the command that runs every job."""
    words, out, skip = command.split(), [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--job", "--out", "--chosen-from", "--sequences"):
            skip = True
        else:
            out.append(word)
    return " ".join(out)


def ablation_table(files: list[Path]) -> dict:
    """HALRP's ablations from `--job ablation:N` parts: ACC per sequence, variant and seed, and
    each variant's change against the default run of the same seed (paired), per sequence and
    averaged over the sequences that ran it."""
    acc: dict[str, dict[str, dict[str, float]]] = {}
    ranks: dict[str, dict[str, dict[str, list]]] = {}
    estimate_s: dict[str, dict[str, list[float]]] = {}
    machines = set()
    for f in files:
        data = json.loads(f.read_text())
        machines.add(data["machine"])
        name = data["part"]["sequence"]
        for label, by_seed in data["part"]["data"].get("ablations", {}).items():
            for seed, run in by_seed.items():
                acc.setdefault(name, {}).setdefault(label, {})[seed] = run["acc"]
                if "explained_ranks" in run:
                    ranks.setdefault(name, {}).setdefault(label, {})[seed] = run[
                        "explained_ranks"]
                    estimate_s.setdefault(label, {}).setdefault(name, []).extend(
                        run["estimate_s_without_trial"])
    delta: dict[str, dict[str, float]] = {}
    for name, by_label in acc.items():
        base = by_label.get("default", {})
        for label, by_seed in by_label.items():
            paired = [by_seed[s] - base[s] for s in by_seed if s in base]
            if label != "default" and paired:
                delta.setdefault(label, {})[name] = statistics.mean(paired)
    return {"acc": acc, "delta_vs_default": delta,
            "mean_delta": {label: statistics.mean(d.values()) for label, d in delta.items()},
            "rank_agreement": _rank_agreement(ranks),
            "estimate_s_without_trial": {label: {n: statistics.mean(v) for n, v in by.items()}
                                         for label, by in estimate_s.items()},
            "machines": sorted(machines)}


def _rank_agreement(ranks: dict) -> dict:
    """Each variant's explained-share ranks against the default run's of the same seed, layer
    by layer over every estimated task: the share of equal ranks and the mean absolute
    difference, with the default's mean rank for scale."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_label in ranks.items():
        base = by_label.get("default", {})
        for label, by_seed in by_label.items():
            if label == "default":
                continue
            pairs = [(base[seed][t][layer], task[layer])
                     for seed, tasks in by_seed.items() if seed in base
                     for t, task in enumerate(tasks) for layer in task]
            if pairs:
                out.setdefault(label, {})[name] = {
                    "equal": sum(a == b for a, b in pairs) / len(pairs),
                    "mean_abs_difference": statistics.mean(abs(a - b) for a, b in pairs),
                    "default_mean_rank": statistics.mean(a for a, _ in pairs),
                    "layers_compared": len(pairs)}
    return out


def merge_files(files: list[Path], methods: list[str]) -> dict[str, dict]:
    """Sequences from full result files and from job parts (grouped and merged)."""
    sequences: dict[str, dict] = {}
    parts: dict[str, list] = {}
    where: dict[str, set] = {}
    for f in files:
        data = json.loads(f.read_text())
        if "part" in data:
            name = data["part"]["sequence"]
            parts.setdefault(name, []).append(data["part"]["data"])
            where.setdefault(name, set()).add((data["machine"], _job_free(data["command"])))
        else:
            for name, runs in data["sequences"].items():
                sequences[name] = {**runs, "ran_on": runs.get("ran_on")
                                   or [{"machine": data["machine"], "command": data["command"]}]}
    for name, found in parts.items():
        if not any("sweep" in p for p in found):
            print(f"  {name}: no sweep finished, left out", flush=True)
            continue
        sequences[name] = merge_parts(found, methods)
        sequences[name]["ran_on"] = [{"machine": m, "command": c} for m, c in sorted(where[name])]
    return sequences


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI: tiny, every code path")
    parser.add_argument("--sequences", default=",".join(SEQUENCES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lrs", default="1e-4,1e-3,1e-2",
                        help="the learning-rate sweep every method gets")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--orders", type=int, default=5)
    parser.add_argument("--order-sequences", default=",".join(ORDER_SEQUENCES))
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--ablation-labels", default=None,
                        help="comma-separated ABLATIONS labels to run (default: all)")
    add_protocol_args(parser)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--parallel", type=int, default=0,
                        help="run the jobs in this many subprocesses (parts in --parts)")
    parser.add_argument("--parts", type=Path, default=None,
                        help="folder for the job parts (default: results/quality_parts/<time>)")
    parser.add_argument("--deadline-s", type=float, default=float("inf"))
    parser.add_argument("--job", default=None, help="one job of one sequence (see jobs_of)")
    parser.add_argument("--chosen-from", type=Path, default=None,
                        help="a folder of sweep parts, or a results file, that fixes the "
                             "chosen rates")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="summarize these result files or parts into quality.json/png")
    parser.add_argument("--ablation-parts", nargs="+", type=Path, default=None,
                        help="tabulate these ablation job parts into --out (paired deltas)")
    parser.add_argument("--note", default=None,
                        help="with --merge: how the parts were made, kept in the results")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    given = list(sys.argv[1:] if argv is None else argv)
    for name in args.sequences.split(","):
        if name not in SEQUENCES:
            parser.error(f"--sequences: unknown {name!r}; allowed: {', '.join(SEQUENCES)}")
    try:
        args.lrs = [float(v) for v in args.lrs.split(",")]
    except ValueError:
        parser.error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
    args.order_sequences = args.order_sequences.split(",")
    if args.ablation_labels is None:
        args.ablation_labels = list(QUICK_ABLATIONS if args.quick else ABLATIONS)
    else:
        args.ablation_labels = args.ablation_labels.split(",")
        unknown = [label for label in args.ablation_labels if label not in ABLATIONS]
        if unknown:
            parser.error(f"--ablation-labels: unknown {unknown}; allowed: {', '.join(ABLATIONS)}")
    if args.quick:
        args.seeds, args.orders, args.epochs, args.lrs = 2, 2, 2, args.lrs[:2]
    args.device = torch.device(args.device)
    if args.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Parallel jobs get OMP_NUM_THREADS=1 each: two threads apiece would make the processes
        # spin against each other on a 2-core machine (seen: 300 s per job instead of 16 s).
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    args.parts = args.parts or RESULTS / "quality_parts" / time.strftime("%Y%m%d-%H%M%S")
    if args.ablation_parts:  # a table of ablation parts, nothing run
        table = ablation_table(args.ablation_parts)
        parts_dirs = sorted({shlex.quote(str(f.parent)) + "/*.json" for f in args.ablation_parts})
        command = ["python benchmarks/quality.py --ablation-parts", *parts_dirs,
                   "--out", shlex.quote(str(args.out or RESULTS / "quality_ablations.json"))]
        out = {"command": " ".join(command), "date": time.strftime("%Y-%m-%d"),
               "note": args.note, **table}
        for label, mean in table["mean_delta"].items():
            print(f"{label:<40} {mean:+6.2f}  " + "  ".join(
                f"{n} {d:+.2f}" for n, d in table["delta_vs_default"][label].items()))
        _write(args.out or RESULTS / "quality_ablations.json", out)
        return out
    if args.job is not None:  # one job: write its part and stop
        name = args.sequences
        chosen = None
        if not args.job.startswith("sweep"):
            if args.chosen_from is None:
                parser.error("--job: seed, order and ablation jobs need --chosen-from")
            if args.chosen_from.is_file():  # a results file: the rates it chose
                runs = json.loads(args.chosen_from.read_text())["sequences"][name]
                chosen = {m: float(runs["chosen_lr"][m]) for m in args.methods}
            else:
                sweep = _sweep_parts(sorted(args.chosen_from.glob("*.json")), name)
                chosen = chosen_rates(sweep, args.methods)
        part = run_job(name, args.job, args, chosen)
        _write(args.out or args.parts / f"{name}_{args.job.replace(':', '_')}.json",
               {"command": " ".join(["python benchmarks/quality.py", *given]),
                "machine": _machine(args), "settings": _settings(args),
                "wall_s": time.perf_counter() - started,
                "part": {"sequence": name, "job": args.job, "data": part}})
        return part
    if args.merge or args.parallel:
        files = args.merge or run_parallel(args, given)
        sequences = merge_files(files, args.methods)
    else:
        sequences = {name: study_sequence(name, args) for name in args.sequences.split(",")}
        for runs in sequences.values():
            runs["ran_on"] = [{"machine": _machine(args),
                               "command": " ".join(["python benchmarks/quality.py", *given])}]
    out = {"command": " ".join(["python benchmarks/quality.py", *given]),
           "date": time.strftime("%Y-%m-%d"), "machine": _machine(args),
           "settings": _settings(args), "wall_s": time.perf_counter() - started,
           "sequences": sequences}
    if args.merge:  # the machine and settings of the runs, not of the merge
        first = json.loads(args.merge[0].read_text())
        out.update(machine=first["machine"], settings=first["settings"],
                   merged_from=[str(p) for p in args.merge], note=args.note)
    summary = summarize(out["sequences"], args.methods)
    out["summary"] = summary
    print_summary(summary, args.methods)
    path = args.out or RESULTS / ("quality_quick.json" if args.quick else "quality.json")
    _write(path, out)
    plot(path.with_suffix(".png"), summary, args.methods)
    return out


if __name__ == "__main__":
    main()
