"""Studies 2 and 3: continual learning on a real pretrained backbone, five methods side by side.

EfficientNet-Lite0 with its ImageNet weights, Split Fashion-MNIST (5 tasks x 2 classes, study
8's `lite0-split-fmnist` sequence and training loop from `protocol/`), the same data, passes
over it, batches and seed for every method, budget 0.05 per task. Equal compute: HALRP's trial
fine-tune is one of the `--epochs` passes (it trains `epochs - 1` after it, the reference's
way); wall seconds per task are reported beside ACC.

- halrp:      this project (trial pass + training, pruned to the budget)
- lora:       PEFT LoRA, one adapter per task, uniform rank sized to the same budget, counted
              as HALRP counts its own (norm copies with running statistics, heads apart); the
              BatchNorm layers and the head are per-task `modules_to_save`
- adalora:    PEFT AdaLoRA at the same budget (target rank sized like LoRA's, initial 1.5x)
- full_ft:    a full copy of the backbone fine-tuned per task (upper bound)
- seq_ft:     one backbone fine-tuned task after task, one head per task (forgetting bound)

Prints ACC, BWT, parameters per task and wall time per method, with the targets; with
`--orders K`, learns the same tasks in K task orders and reports OPD / MOPD / AOPD per method
(study 3). Every method's BatchNorm running statistics are recomputed with its final weights
when a task ends. Writes benchmarks/results/pretrained_methods.json and .png.

    python benchmarks/pretrained_methods.py                 # 5 tasks, 2 passes, 1 order
    python benchmarks/pretrained_methods.py --orders 5      # study 3: the same 5 tasks in 5 orders
    python benchmarks/pretrained_methods.py --quick         # CI: 2 tasks, few steps
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import (  # noqa: E402
    add_protocol_args,
    make_sequence,
    plan_peer,
    run_full_ft,
    run_halrp,
    run_peer,
    run_seq_ft,
)

from halrp_adapt.training.metrics import (  # noqa: E402
    average_accuracy,
    backward_transfer,
    order_robustness,
)

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("halrp", "lora", "adalora", "full_ft", "seq_ft")
SEQUENCE = "lite0-split-fmnist"


def one_order(args, seed: int, order: list[int] | None) -> dict:
    """Every method over the seeded tasks, learned in `order` (positions; None: as split)."""
    seq = make_sequence(SEQUENCE, seed, args)
    tasks = [seq.tasks[i] for i in order] if order is not None else seq.tasks
    out: dict = {"classes": {t.name: t.name.split("-")[1:] for t in tasks}}
    for method in args.methods:
        start = time.perf_counter()
        if method == "halrp":
            result = run_halrp(seq, tasks, args.lr, seed, args)
        elif method == "full_ft":
            result = run_full_ft(seq, tasks, args.lr, seed, args)
        elif method == "seq_ft":
            result = run_seq_ft(seq, tasks, args.lr, seed, args)
        else:
            plan = plan_peer(seq, method, args.budget)
            assert plan is not None, f"PEFT's {method} takes none of {SEQUENCE}'s layers"
            result = run_peer(plan, seq, tasks, args.lr, seed, args)
        result["matrix"] = result.pop("test")
        result.update(acc=average_accuracy(result["matrix"]),
                      bwt=backward_transfer(result["matrix"]),
                      wall_s=time.perf_counter() - start)
        out[method] = result
        print(f"  {method:<8} ACC {result['acc']:6.2f}  BWT {result['bwt']:+6.2f}  params/task "
              f"{sum(result['params_per_task']) / len(result['params_per_task']):>12,.0f}  "
              f"{result['wall_s']:6.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--orders", type=int, default=1, help="task orders (study 3 if > 1)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--methods", default=",".join(METHODS))
    add_protocol_args(parser)
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    args.device = torch.device(args.device)
    args.tasks = 2 if args.quick else 5
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    runs = []
    for k in range(args.orders):
        order = None if k == 0 else torch.randperm(
            args.tasks, generator=torch.Generator().manual_seed(100 + k)).tolist()
        print(f"order {k}: {order or 'seeded (seed 0)'}", flush=True)
        runs.append(one_order(args, seed=0, order=order))
    summary = {}
    for method in args.methods:
        summary[method] = {
            "acc": [r[method]["acc"] for r in runs], "bwt": [r[method]["bwt"] for r in runs],
            "params_per_task": sum(runs[0][method]["params_per_task"])
            / len(runs[0][method]["params_per_task"]),
            "wall_s": [r[method]["wall_s"] for r in runs],
            "task_s": sum(runs[0][method]["task_s"]) / len(runs[0][method]["task_s"])}
        if args.orders > 1:
            finals = [{"-".join(sorted(r["classes"][n])): r[method]["matrix"][-1][i]
                       for i, n in enumerate(r["classes"])} for r in runs]
            summary[method]["order_robustness"] = order_robustness(finals)
    targets = {}
    if {"halrp", "lora", "adalora", "full_ft"} <= set(args.methods):
        h = summary["halrp"]["acc"][0]
        targets = {"halrp_acc_above_lora": h > summary["lora"]["acc"][0],
                   "halrp_acc_above_adalora": h > summary["adalora"]["acc"][0],
                   "halrp_within_1_point_of_full_ft": h >= summary["full_ft"]["acc"][0] - 1,
                   "halrp_bwt_exactly_0": all(b == 0 for b in summary["halrp"]["bwt"])}
        if args.orders > 1:
            mopd = {m: summary[m]["order_robustness"]["MOPD"] for m in args.methods}
            targets["halrp_mopd_lowest"] = mopd["halrp"] <= min(mopd.values())
    print(f"\n{'method':<9}{'ACC':>8}{'BWT':>8}{'params/task':>14}{'wall s':>8}{'s/task':>8}"
          + ("  MOPD   AOPD" if args.orders > 1 else ""))
    for method, s in summary.items():
        line = (f"{method:<9}{s['acc'][0]:>8.2f}{s['bwt'][0]:>+8.2f}"
                f"{s['params_per_task']:>14,.0f}{s['wall_s'][0]:>8.0f}{s['task_s']:>8.1f}")
        if args.orders > 1:
            o = s["order_robustness"]
            line += f"  {o['MOPD']:5.2f}  {o['AOPD']:5.2f}"
        print(line)
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    given = sys.argv[1:] if argv is None else argv
    out = {"command": " ".join(["python benchmarks/pretrained_methods.py", *given]),
           "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
           "settings": {k: v for k, v in vars(args).items()}, "summary": summary,
           "targets": targets, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    name = "pretrained_methods_quick" if args.quick else (
        "pretrained_methods" if args.orders == 1 else "order_robustness")
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    plot(RESULTS / f"{name}.png", summary)
    return out


def plot(path: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.bar(methods, [summary[m]["acc"][0] for m in methods], color="C0")
    left.set_ylabel("ACC (%)")
    left.set_ylim(min(summary[m]["acc"][0] for m in methods) - 5, 100)
    right.bar(methods, [summary[m]["params_per_task"] for m in methods], color="C1")
    right.set_yscale("log")
    right.set_ylabel("parameters per task")
    fig.suptitle("EfficientNet-Lite0 (ImageNet), Split Fashion-MNIST 5 x 2")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
