"""The frontier: ACC against stored parameters per task, every method at every budget.

A user's question is "for the bytes I can afford per task, which method gives the most
accuracy?". Every method learns the same sequences (`protocol/sequences.py`) with the same
data, the same passes over it (`--epochs`; HALRP's trial pass counts), batches and
learning-rate sweep, and stores at most the same parameters per task, counted the same way
(adapter + norm copies with their running statistics; heads apart):

- halrp               this project at `budget=B` (its parts compete for B: `attach`'s `placement`)
- lora, dora, ia3,    PEFT's methods, each sized to B by `protocol.peers.plan_peer` (rank, or
  adalora, pissa,     IA3's layer set; the base's frozen norms where its own do not fit; PiSSA
  eva                 and EVA on Linear layers only, as PEFT supports them)
- full_ft             a full copy per task: the ceiling, at every budget

The learning rate of each method and sequence is chosen on validation (seed 0, `--lrs`) at
`--sweep-budget` and reused at every budget and seed. `--repeat` runs HALRP and LoRA at the
sweep budget a second time with seed 0 to measure the noise between identical runs.
`--variants` adds HALRP variants from `protocol.halrp.ABLATIONS` over the whole grid (the
ablation table, paired by sequence, budget and seed).

    python benchmarks/frontier.py --parallel 2                   # the whole grid (CPU: ~3 h)
    python benchmarks/frontier.py --methods lora,ia3 --parallel 2 --parts DIR
    python benchmarks/frontier.py --merge DIR/*.json             # table + plot from parts
    python benchmarks/frontier.py --quick                        # CI: tiny, every code path

Writes benchmarks/results/frontier.json and frontier.png (`--out`) when it merges or runs the
whole grid; a run over some sequences or methods only writes its parts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import (  # noqa: E402
    ABLATIONS,
    BACKBONES,
    PEERS,
    SEQUENCES,
    add_protocol_args,
    make_sequence,
    plan_peer,
    run_full_ft,
    run_halrp,
    run_peer,
)

from halrp_adapt.training.metrics import average_accuracy, backward_transfer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (0.005, 0.01, 0.02, 0.05, 0.1)
METHODS = ("halrp", *PEERS, "full_ft")
FRONTIER_SEQUENCES = ("lite0-split-digits", "lite0-split-fmnist", "lite1-permuted-fmnist",
                      "minilm-topics")
BYTES_PER_PARAM = 4  # float32, as every method saves here


# ---- one run -------------------------------------------------------------------------------
def run_one(method: str, seq, budget: float, lr: float, seed: int, args) -> dict | None:
    """`method` over `seq` at `budget` (None where PEFT takes none of its layers)."""
    args.budget = budget
    start = time.perf_counter()
    if method.startswith("halrp"):
        variant = ABLATIONS[method[6:-1]] if method != "halrp" else None
        try:
            result = run_halrp(seq, seq.tasks, lr, seed, args, variant)
        except ValueError as err:  # a budget the variant cannot keep (placement="paper")
            if "`budget`=" not in str(err):
                raise
            print(f"    {method} budget {budget:g}: refused ({str(err)[:120]}...)", flush=True)
            return None
    elif method == "full_ft":
        result = run_full_ft(seq, seq.tasks, lr, seed, args)
    else:
        plan = plan_peer(seq, method, budget)
        if plan is None:
            return None
        result = run_peer(plan, seq, seq.tasks, lr, seed, args)
    stored = [p for p in result["params_per_task"]]
    row = {"acc": average_accuracy(result["test"]), "bwt": backward_transfer(result["test"]),
           "val_acc": average_accuracy(result["val"]),
           "stored_params": sum(stored) / len(stored),
           "task_s": statistics.mean(s for s in result["task_s"] if s > 0),
           "wall_s": time.perf_counter() - start}
    row.update({k: result[k] for k in ("rank", "own_norms", "targets") if k in result})
    print(f"    {method:<10} budget {budget:<6g} lr {lr:g} seed {seed}  val {row['val_acc']:6.2f}"
          f"  ACC {row['acc']:6.2f}  stored {row['stored_params']:>10,.0f}"
          f"  {row['task_s']:5.1f} s/task", flush=True)
    return row


def budget_of(method: str, budget: float) -> float:
    return budget if method != "full_ft" else 1.0


def run_job(name: str, job: str, args, chosen: dict[str, float] | None) -> dict:
    """'sweep:METHOD:LR' (seed 0 at --sweep-budget), 'seed:METHOD:N' (every budget at the
    chosen rate; seed 0 reuses the sweep's run at the sweep budget) or 'repeat:METHOD'."""
    kind, method, value = (job.split(":") + [""])[:3]
    print(f"== {name} {job}", flush=True)
    if kind == "sweep":
        seq = make_sequence(name, 0, args)
        return {"sweep_budget": args.sweep_budget,
                "sweep": {method: {value: run_one(method, seq, args.sweep_budget, float(value),
                                                  0, args)}}}
    assert chosen is not None, "seed and repeat jobs need the sweep's chosen rates"
    lr = chosen[method]
    if kind == "repeat":
        seq = make_sequence(name, 0, args)
        return {"repeat": {method: run_one(method, seq, args.sweep_budget, lr, 0, args)}}
    if kind != "seed":
        raise SystemExit(f"--job: unknown {job!r}; allowed: sweep:M:LR, seed:M:N, repeat:M")
    seed = int(value)
    seq = make_sequence(name, seed, args)
    budgets = [1.0] if method == "full_ft" else args.budgets
    runs = {}
    for budget in budgets:
        if seed == 0 and budget == budget_of(method, args.sweep_budget):
            continue  # the sweep's run at the chosen rate
        runs[str(budget)] = run_one(method, seq, budget, lr, seed, args)
    return {"runs": {method: {str(seed): runs}}}


def jobs_of(args) -> list[tuple[str, str]]:
    sweeps = [(n, f"sweep:{m}:{lr:g}") for n in args.sequences for m in args.methods
              for lr in args.lrs]
    rest = [(n, f"seed:{m}:{s}") for n in args.sequences for m in args.methods
            for s in range(args.seeds)]
    if args.repeat:
        rest += [(n, f"repeat:{m}") for n in args.sequences for m in ("halrp", "lora")
                 if m in args.methods]
    return sweeps + rest


# ---- merging and the table -------------------------------------------------------------------
def merge(parts: list[dict]) -> dict[str, dict]:
    """{sequence: {"sweep", "chosen_lr", "runs": {method: {budget: {seed: row}}}, "repeat"}}."""
    out: dict[str, dict] = {}
    for part in parts:
        name, data = part["sequence"], part["data"]
        seq = out.setdefault(name, {"sweep": {}, "runs": {}, "repeat": {}})
        if "sweep_budget" in data:
            seq["sweep_budget"] = data["sweep_budget"]
        for method, by_lr in data.get("sweep", {}).items():
            seq["sweep"].setdefault(method, {}).update(by_lr)
        for method, by_seed in data.get("runs", {}).items():
            for seed, by_budget in by_seed.items():
                for budget, row in by_budget.items():
                    seq["runs"].setdefault(method, {}).setdefault(budget, {})[seed] = row
        seq["repeat"].update(data.get("repeat", {}))
    for seq in out.values():
        seq["chosen_lr"] = chosen_rates(seq["sweep"])
        for method, lr in seq["chosen_lr"].items():
            row = seq["sweep"][method][f"{lr:g}"]
            budget = budget_of(method, seq["sweep_budget"])
            seq["runs"].setdefault(method, {}).setdefault(str(budget), {})["0"] = row
    return out


def chosen_rates(sweep: dict[str, dict]) -> dict[str, float]:
    """Each method's rate with the best validation ACC at seed 0 (never the test set)."""
    return {m: float(max((lr for lr in by_lr if by_lr[lr] is not None),
                         key=lambda lr: by_lr[lr]["val_acc"]))
            for m, by_lr in sweep.items() if any(v is not None for v in by_lr.values())}


def summarize(sequences: dict[str, dict], budgets: list[float]) -> dict:
    """Per budget and method: ACC per sequence (mean over seeds), the mean over sequences, and
    HALRP's paired lead over each peer on the sequences both ran."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for b in budgets:
        per: dict[str, dict[str, Any]] = {}
        for name, seq in sequences.items():
            for method, by_budget in seq["runs"].items():
                rows = [r for r in by_budget.get(str(budget_of(method, b)), {}).values()
                        if r is not None]
                if rows:
                    per.setdefault(method, {})[name] = {
                        "acc": statistics.mean(r["acc"] for r in rows), "seeds": len(rows),
                        "stored_params": statistics.mean(r["stored_params"] for r in rows),
                        "task_s": statistics.mean(r["task_s"] for r in rows),
                        "bwt": max(abs(r["bwt"]) for r in rows),
                        **{k: rows[0][k] for k in ("rank", "own_norms") if k in rows[0]}}
        table[str(b)] = per
    lead: dict[str, dict[str, float]] = {}
    for b, per in table.items():
        halrp = per.get("halrp", {})
        for method, by_seq in per.items():
            if method.startswith("halrp") or method == "full_ft":
                continue
            both = [n for n in by_seq if n in halrp]
            if both:
                lead.setdefault(b, {})[method] = statistics.mean(
                    halrp[n]["acc"] - by_seq[n]["acc"] for n in both)
    means = {b: {m: statistics.mean(v["acc"] for v in by_seq.values())
                 for m, by_seq in per.items()} for b, per in table.items()}
    noise = [abs(seq["repeat"][m]["acc"] - seq["runs"][m][str(seq["sweep_budget"])]["0"]["acc"])
             for seq in sequences.values() for m in seq["repeat"] if seq["repeat"][m] is not None]
    every = all(per.get("halrp", {}).get(n) for per in table.values() for n in sequences)
    leads = [v for by in lead.values() for v in by.values()]
    low = [min(by.values()) for b, by in lead.items() if float(b) <= 0.01 and by]
    halrp_rows = [v for per in table.values() for v in per.get("halrp", {}).values()]
    # None: not measured (no HALRP run, or no peer beside it)
    targets = {
        "halrp_runs_at_every_budget_on_every_sequence": every,
        "halrp_at_least_every_peer_at_every_budget": all(v >= 0 for v in leads)
        if leads else None,
        "halrp_best_peer_plus_1_at_0.01_and_below": all(v >= 1.0 for v in low) if low else None,
        "halrp_bwt_exactly_0": all(v["bwt"] == 0 for v in halrp_rows) if halrp_rows else None,
    }
    return {"table": table, "mean_acc": means, "halrp_lead": lead,
            "noise": {"pairs": len(noise), "max": max(noise) if noise else None,
                      "mean": statistics.mean(noise) if noise else None},
            "targets": targets}


def print_summary(summary: dict) -> None:
    methods = sorted({m for per in summary["mean_acc"].values() for m in per},
                     key=lambda m: (list(METHODS).index(m) if m in METHODS else 99, m))
    print(f"\n{'budget':<8}" + "".join(f"{m:>10}" for m in methods))
    for b, per in summary["mean_acc"].items():
        print(f"{b:<8}" + "".join(f"{per[m]:>10.2f}" if m in per else f"{'-':>10}"
                                   for m in methods))
    print("HALRP's lead (paired by sequence):")
    for b, by in summary["halrp_lead"].items():
        print(f"  {b:<6} " + "  ".join(f"{m} {v:+.2f}" for m, v in by.items()))
    print("noise between identical runs:", summary["noise"])
    said = {True: "met", False: "MISSED", None: "not measured"}
    print("targets:", ", ".join(f"{k} {said[v]}" for k, v in summary["targets"].items()))


def plot(path: Path, sequences: dict[str, dict], budgets: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(sequences)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        runs = sequences[name]["runs"]
        for i, method in enumerate(sorted(runs, key=lambda m: (m != "halrp", m))):
            points = []
            for b in [1.0] if method == "full_ft" else budgets:
                rows = [r for r in runs[method].get(str(b), {}).values() if r is not None]
                if rows:
                    points.append((statistics.mean(r["stored_params"] for r in rows)
                                   * BYTES_PER_PARAM, statistics.mean(r["acc"] for r in rows)))
            if method == "full_ft" and points:
                ax.axhline(points[0][1], color="gray", ls=":", label="full_ft (ceiling)")
            elif points:
                ax.plot(*zip(*sorted(points), strict=True), marker="o", ms=3, label=method,
                        lw=2.2 if method == "halrp" else 1.0, color=f"C{i % 10}")
        ax.set_xscale("log")
        ax.set_xlabel("stored bytes per task (float32)")
        ax.set_title(f"{name} ({BACKBONES[name]})", fontsize=8)
    axes[0][0].set_ylabel("ACC (%), mean over seeds")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- driver --------------------------------------------------------------------------------
def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _chosen_from(parts: Path, name: str) -> dict[str, float]:
    sweep: dict[str, dict] = {}
    for f in sorted(parts.glob("*.json")):
        part = json.loads(f.read_text()).get("part", {})
        if part.get("sequence") == name:
            for method, by_lr in part["data"].get("sweep", {}).items():
                sweep.setdefault(method, {}).update(by_lr)
    return chosen_rates(sweep)


def run_parallel(args, given: list[str]) -> list[Path]:
    """Every job in `--parallel` single-thread subprocesses: the sweeps, then the rest."""
    args.parts.mkdir(parents=True, exist_ok=True)
    passthrough, skip = [], False
    for arg in given:
        if skip:
            skip = False
        elif arg.split("=")[0] in ("--parallel", "--parts", "--out", "--sequences"):
            skip = "=" not in arg
        else:
            passthrough.append(arg)

    def launch(job: tuple[str, str]) -> Path | None:
        name, what = job
        out = args.parts / f"{name}_{what.replace(':', '_')}.json"
        if out.exists():  # a finished part is kept (a stopped study resumes)
            return out
        command = [sys.executable, __file__, *passthrough, "--sequences", name, "--job", what,
                   "--parts", str(args.parts)]
        with out.with_suffix(".log").open("w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"  {name} {what}: {'done' if done.returncode == 0 else 'FAILED'}", flush=True)
        return out if done.returncode == 0 else None

    jobs = jobs_of(args)
    finished: list[Path] = []
    for phase in (True, False):
        todo = [j for j in jobs if j[1].startswith("sweep") == phase]
        with ThreadPoolExecutor(args.parallel) as pool:
            finished += [p for p in pool.map(launch, todo) if p is not None]
    return finished


def writes_table(args) -> bool:
    """Whether a run writes the table (frontier.json): a merge, `--out`, `--quick` or the whole
    grid; a run over some sequences or methods only writes its parts."""
    whole = set(args.sequences) >= set(FRONTIER_SEQUENCES) and set(args.methods) >= set(METHODS)
    return bool(args.merge or args.out or args.quick or whole)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI: tiny, every code path")
    parser.add_argument("--sequences", default=",".join(FRONTIER_SEQUENCES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--variants", default="",
                        help="HALRP ablation labels (protocol.halrp.ABLATIONS) run over the grid")
    parser.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    parser.add_argument("--sweep-budget", type=float, default=0.02)
    parser.add_argument("--lrs", default="1e-4,1e-3,1e-2")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--repeat", action="store_true",
                        help="rerun HALRP and LoRA at the sweep budget, seed 0: the noise band")
    add_protocol_args(parser)
    parser.set_defaults(max_tasks=3, max_train_batches=6)
    parser.add_argument("--parallel", type=int, default=0)
    parser.add_argument("--parts", type=Path, default=None)
    parser.add_argument("--job", default=None)
    parser.add_argument("--merge", nargs="+", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    given = list(sys.argv[1:] if argv is None else argv)
    if "--merge" in given:  # the command names the parts' folders, not every file
        at = given.index("--merge")
        rest = [g for g in given[at + 1:] if not g.startswith("--")]
        folders = sorted({str(Path(f).parent) for f in rest})
        given = [*given[:at], "--merge", *(f"{d}/*.json" for d in folders),
                 *given[at + 1 + len(rest):]]
    args.sequences = args.sequences.split(",")
    args.methods = [m for m in args.methods.split(",") if m] + [
        f"halrp[{v}]" for v in args.variants.split(",") if v]
    for name in args.sequences:
        if name not in SEQUENCES:
            parser.error(f"--sequences: unknown {name!r}; allowed: {', '.join(SEQUENCES)}")
    for method in args.methods:
        if method not in METHODS and not (method.startswith("halrp[")
                                          and method[6:-1] in ABLATIONS):
            parser.error(f"--methods/--variants: unknown {method!r}; allowed: "
                         f"{', '.join(METHODS)}; variants: {', '.join(ABLATIONS)}")
    try:
        args.budgets = [float(b) for b in args.budgets.split(",")]
        args.lrs = [float(v) for v in args.lrs.split(",")]
    except ValueError:
        parser.error("--budgets and --lrs take comma-separated numbers")
    if args.sweep_budget not in args.budgets:
        parser.error(f"--sweep-budget {args.sweep_budget} must be one of --budgets")
    if args.quick:
        args.seeds, args.lrs = 2, args.lrs[:1]
    args.device = torch.device(args.device)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.merge and args.parts is None:
        args.parts = args.merge[0].parent
    args.parts = args.parts or RESULTS / "frontier_parts" / time.strftime("%Y%m%d-%H%M%S")
    machine = f"{platform.platform()}, {os.cpu_count()} CPUs, {args.device}"
    command = " ".join(["python benchmarks/frontier.py", *given])
    if args.job is not None:
        name = args.sequences[0]
        chosen = None if args.job.startswith("sweep") else _chosen_from(args.parts, name)
        data = run_job(name, args.job, args, chosen)
        _write(args.parts / f"{name}_{args.job.replace(':', '_')}.json",
               {"command": command, "machine": machine,
                "part": {"sequence": name, "job": args.job, "data": data}})
        return data
    if args.merge:
        files = args.merge
    elif args.parallel:
        files = run_parallel(args, given)
    else:
        files = []
        for name in args.sequences:
            jobs = [j for n, j in jobs_of(args) if n == name]
            parts = [{"sequence": name, "data": run_job(name, j, args, None)}
                     for j in jobs if j.startswith("sweep")]
            chosen = chosen_rates(merge(parts)[name]["sweep"])
            parts += [{"sequence": name, "data": run_job(name, j, args, chosen)}
                      for j in jobs if not j.startswith("sweep")]
            for i, part in enumerate(parts):
                path = args.parts / f"{name}_{i}.json"
                _write(path, {"command": command, "machine": machine, "part": part})
                files.append(path)
    loaded = [json.loads(f.read_text()) for f in files]
    sequences = merge([d["part"] for d in loaded])
    for name, seq in sequences.items():
        seq["backbone"] = BACKBONES.get(name, "")
    summary = summarize(sequences, args.budgets)
    print_summary(summary)
    out = {"command": command, "date": time.strftime("%Y-%m-%d"),
           "machines": sorted({d["machine"] for d in loaded}),
           "settings": {k: (str(v) if isinstance(v, (torch.device, Path)) else v)
                        for k, v in vars(args).items() if k not in ("merge", "job")},
           "parts": str(args.parts), "sequences": sequences, "summary": summary}
    if not writes_table(args):
        # A run over part of the grid leaves the published table alone; its parts merge in.
        print(f"parts in {args.parts}; the table: python benchmarks/frontier.py --merge "
              f"{args.parts}/*.json (with the other parts' folders)")
        return out
    path = args.out or RESULTS / ("frontier_quick.json" if args.quick else "frontier.json")
    _write(path, out)
    plot(path.with_suffix(".png"), sequences, args.budgets)
    return out


if __name__ == "__main__":
    main()
