"""Study 7: do a finished task's BatchNorm running statistics match the weights it keeps?

EfficientNet-Lite0 with its ImageNet weights, Split Fashion-MNIST 5 x 2 (the data, epochs,
batches and seed of study 2), HALRP at budget 0.05, learned twice: once ending each task with
`end_task()` (statistics as gathered while the weights moved), once with
`end_task(calibration_data=...)` (recomputed with the final weights). For each finished task,
its test accuracy in eval mode (what users get) is set beside its accuracy with batch
statistics (train-mode BatchNorm on a merged copy, nothing kept): the gap is what stale
statistics cost. Writes benchmarks/results/norm_statistics.json.

    python benchmarks/norm_statistics.py            # 5 tasks, 2 epochs
    python benchmarks/norm_statistics.py --quick    # 2 tasks, a few steps (CI)
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
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from protocol import accuracy, fit  # noqa: E402  (the benchmarks' shared protocol)
from torch.utils.data import DataLoader  # noqa: E402

import halrp_adapt  # noqa: E402
from halrp_adapt.data.task_splits import embedded_fashion_mnist, split_into_tasks  # noqa: E402
from halrp_adapt.data.zoo import efficientnet_lite0_imagenet  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def batches(dataset, batch_size: int, seed: int, train: bool, limit: int | None) -> list:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=train,
                        generator=torch.Generator().manual_seed(seed))
    return [b for _, b in zip(range(limit or 10 ** 9), loader)]


def batch_statistics_accuracy(cl: halrp_adapt.HalrpModel, task: str, data) -> float:
    """Accuracy of `task` with each batch normalised by its own statistics."""
    plain = cl.merge(task).eval()
    for m in plain.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
            m.momentum = 0.0  # batch statistics in the forward, running ones left alone
    correct = total = 0
    with torch.no_grad():
        for x, y in data:
            correct += int((plain(x).argmax(-1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


def run(tasks, args, calibrate: bool) -> dict:
    torch.manual_seed(0)
    cl = halrp_adapt.attach(efficientnet_lite0_imagenet(), budget=args.budget)
    rows = []
    for task in tasks:
        cl.add_task(task.name, num_classes=task.num_classes)
        cl.estimate_ranks(task.train_batches, epochs=1)
        fit(cl, [{"params": cl.trainable_parameters(), "lr": args.lr}], task.train_batches,
            args.epochs, torch.device("cpu"),
            extra_loss=cl.regularization_loss)
        cl.end_task(calibration_data=task.train_batches if calibrate else None)
        with cl.task(task.name):
            eval_acc = accuracy(cl, task.test_batches, torch.device("cpu"))
        batch_acc = batch_statistics_accuracy(cl, task.name, task.test_batches)
        rows.append({"task": task.name, "eval_mode": eval_acc, "batch_statistics": batch_acc,
                     "gap": batch_acc - eval_acc})
        print(f"  calibrate={calibrate!s:<5} {task.name}: eval {eval_acc:6.2f}  batch "
              f"statistics {batch_acc:6.2f}", flush=True)
    return {"tasks": rows, "acc": sum(r["eval_mode"] for r in rows) / len(rows),
            "max_abs_gap": max(abs(r["gap"]) for r in rows)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budget", type=float, default=0.05)
    args = parser.parse_args(argv)
    num_tasks, limit = (2, 2) if args.quick else (5, None)
    if args.quick:
        args.epochs = 1
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    from timm.data import create_transform

    train, test = embedded_fashion_mnist("embedded")
    transform = create_transform(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5,) * 3,
                                 std=(0.5,) * 3, interpolation="bilinear")
    tasks = split_into_tasks(train, test, 5, transform, seed=0)[:num_tasks]
    for i, task in enumerate(tasks):
        task.train_batches = batches(task.train, 64, i, True, limit)
        task.test_batches = batches(task.test, 256, 0, False, None)
    results = {"stale": run(tasks, args, calibrate=False),
               "recomputed": run(tasks, args, calibrate=True)}
    targets = {"eval_within_1_point_of_batch_statistics":
               results["recomputed"]["max_abs_gap"] <= 1.0}
    for name, r in results.items():
        print(f"{name:<11} ACC {r['acc']:6.2f}  largest |batch statistics - eval| "
              f"{r['max_abs_gap']:5.2f} points")
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    given = sys.argv[1:] if argv is None else argv
    out = {"command": " ".join(["python benchmarks/norm_statistics.py", *given]),
           "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
           "settings": vars(args), "results": results, "targets": targets}
    RESULTS.mkdir(exist_ok=True)
    name = "norm_statistics_quick" if args.quick else "norm_statistics"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
