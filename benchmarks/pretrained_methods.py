"""Studies 2 and 3: continual learning on a real pretrained backbone, five methods side by side.

EfficientNet-Lite0 with its ImageNet weights, Split Fashion-MNIST (5 tasks x 2 classes), the
same data, epochs, batches and seeds for every method, budget 0.05 per task:

- halrp:      this project (trial epoch + training, pruned to the budget)
- lora:       PEFT LoRA, one adapter per task, uniform rank chosen so that its parameters per
              task match HALRP's, same target layers, BatchNorm layers and the head as
              per-task `modules_to_save` (what a PEFT user does for a task-isolated CNN)
- adalora:    PEFT AdaLoRA with the same per-task budget (target rank = LoRA's, initial 1.5x)
- full_ft:    a full copy of the backbone fine-tuned per task (upper bound, 100% growth/task)
- seq_ft:     one backbone fine-tuned task after task, one head per task (forgetting bound)

Prints ACC, BWT, parameters per task and wall time per method, with the targets; with
`--orders K`, learns the same tasks in K task orders and reports OPD / MOPD / AOPD per method (study 3).
Every method's BatchNorm running statistics are recomputed with its final weights when a task
ends (HALRP: `end_task(calibration_data=...)`; the others: `update_bn`); `--no-calibration`
keeps the statistics gathered during training, as before.
Writes benchmarks/results/pretrained_methods.json and .png.

    python benchmarks/pretrained_methods.py                 # 5 tasks, 2 epochs, 1 order
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
from typing import Callable

import torch
from timm.data import create_transform
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader

import halrp_adapt
from halrp_adapt.training.metrics import average_accuracy, backward_transfer, order_robustness
from halrp_adapt.data.task_splits import embedded_fashion_mnist, split_into_tasks
from halrp_adapt.data.zoo import efficientnet_lite0_imagenet

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("halrp", "lora", "adalora", "full_ft", "seq_ft")


def batches(dataset, batch_size: int, seed: int, train: bool, limit: int | None):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=train,
                        generator=torch.Generator().manual_seed(seed))
    return [b for i, b in zip(range(limit or 10 ** 9), loader)]


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    correct = total = 0
    for x, y in data:
        out = model(x)
        out = out.logits if hasattr(out, "logits") else out
        correct += int((out.argmax(-1) == y).sum())
        total += len(y)
    return 100.0 * correct / total


def fit(model: nn.Module, params, data, epochs: int, lr: float,
        extra_loss: Callable[[], torch.Tensor] | None = None,
        after_step: Callable[[int], None] | None = None) -> None:
    optimizer = torch.optim.Adam(params, lr=lr)
    model.train()
    step = 0
    for _ in range(epochs):
        for x, y in data:
            out = model(x)
            out = out.logits if hasattr(out, "logits") else out
            loss = nn.functional.cross_entropy(out, y)
            if extra_loss is not None:
                loss = loss + extra_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            step += 1


def recalibrate(model: nn.Module, data, args) -> None:
    """What HALRP's end_task(calibration_data=...) does, given to every peer: BatchNorm running
    statistics recomputed with the final weights on the task's training batches."""
    if args.calibrate:
        update_bn(data, model)


def backbone(num_classes: int = 2) -> nn.Module:
    model = efficientnet_lite0_imagenet()
    model.reset_classifier(num_classes)
    return model


def bn_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]


def run_halrp(tasks, args, seed) -> dict:
    torch.manual_seed(seed)
    cl = halrp_adapt.attach(efficientnet_lite0_imagenet(), budget=args.budget)
    matrix, params = [], []
    for t, task in enumerate(tasks):
        cl.add_task(task.name, num_classes=task.num_classes)
        cl.estimate_ranks(task.train_batches, epochs=1)
        fit(cl, cl.trainable_parameters(), task.train_batches, args.epochs, args.lr,
            extra_loss=cl.regularization_loss)
        stats = cl.end_task(calibration_data=task.train_batches if args.calibrate else None)
        params.append(stats.stored_params + stats.head_params)
        row = []
        for seen in tasks[:t + 1]:
            with cl.task(seen.name):
                row.append(accuracy(cl, seen.test_batches))
        matrix.append(row)
    return {"matrix": matrix, "params_per_task": params,
            "targets": list(cl.adapter_layers())}


def lora_rank_for(params_per_task: float, targets: list[str], model: nn.Module) -> int:
    """The uniform LoRA rank whose adapter + per-task BatchNorm + head parameters match."""
    modules = dict(model.named_modules())
    per_rank = 0
    for name in targets:
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            per_rank += m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1] + \
                m.out_channels
        else:
            per_rank += m.in_features + m.out_features
    fixed = sum(p.numel() for n in bn_names(model) for p in modules[n].parameters())
    fixed += sum(p.numel() for p in model.get_classifier().parameters())
    return max(1, int((params_per_task - fixed) / per_rank))


def lora_targets(targets: list[str], model: nn.Module) -> list[str]:
    """HALRP's targets that PEFT LoRA can take at any rank (not grouped convs)."""
    modules = dict(model.named_modules())
    return [n for n in targets if getattr(modules[n], "groups", 1) == 1]


def run_peft(kind: str, tasks, args, seed, rank: int, targets: list[str]) -> dict:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    finals, matrix, params = {}, [], []
    for t, task in enumerate(tasks):
        torch.manual_seed(seed + t)
        model = backbone(task.num_classes)
        keep = bn_names(model) + ["classifier"]
        steps = args.epochs * len(task.train_batches)
        if kind == "lora":
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                modules_to_save=keep)
        else:
            # PEFT 0.21's AdaLoRA SVDConv2d mis-shapes strided k x k convs (the stem here):
            # AdaLoRA gets the 1x1 convs and Linear layers, which are all the others.
            modules = dict(model.named_modules())
            pointwise = [n for n in targets
                         if getattr(modules[n], "kernel_size", (1, 1)) == (1, 1)]
            config = AdaLoraConfig(init_r=max(2, int(1.5 * rank)), target_r=rank,
                                   total_step=max(steps, 3), tinit=steps // 10,
                                   tfinal=steps // 5, target_modules=pointwise,
                                   modules_to_save=keep)
        peft_model = get_peft_model(model, config)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        after = (lambda s, m=peft_model: m.base_model.update_and_allocate(s)) \
            if kind == "adalora" else None
        fit(peft_model, trainable, task.train_batches, args.epochs, args.lr, after_step=after)
        recalibrate(peft_model, task.train_batches, args)
        params.append(sum(p.numel() for p in trainable))
        finals[task.name] = accuracy(peft_model, task.test_batches)
        matrix.append([finals[s.name] for s in tasks[:t + 1]])  # isolated: never changes
    return {"matrix": matrix, "params_per_task": params, "rank": rank}


def run_full_ft(tasks, args, seed) -> dict:
    matrix, finals = [], {}
    for t, task in enumerate(tasks):
        torch.manual_seed(seed + t)
        model = backbone(task.num_classes)
        fit(model, model.parameters(), task.train_batches, args.epochs, args.lr)
        recalibrate(model, task.train_batches, args)
        finals[task.name] = accuracy(model, task.test_batches)
        matrix.append([finals[s.name] for s in tasks[:t + 1]])
    full = sum(p.numel() for p in backbone().parameters())
    return {"matrix": matrix, "params_per_task": [full] * len(tasks)}


def run_seq_ft(tasks, args, seed) -> dict:
    torch.manual_seed(seed)
    model = backbone(tasks[0].num_classes)
    heads = {}
    matrix = []
    for t, task in enumerate(tasks):
        model.reset_classifier(task.num_classes)
        heads[task.name] = model.classifier
        fit(model, model.parameters(), task.train_batches, args.epochs, args.lr)
        recalibrate(model, task.train_batches, args)  # the shared norms: every task's
        row = []
        for seen in tasks[:t + 1]:
            model.classifier = heads[seen.name]
            row.append(accuracy(model, seen.test_batches))
        model.classifier = heads[task.name]
        matrix.append(row)
    return {"matrix": matrix, "params_per_task": [sum(p.numel() for p in model.parameters())]}


def one_order(args, seed: int, order: list[int] | None) -> dict:
    """Every method over the seeded tasks, learned in `order` (positions; None: as split)."""
    train, test = embedded_fashion_mnist(args.data)
    transform = create_transform(input_size=(3, args.img_size, args.img_size), crop_pct=1.0,
                                 mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear")
    tasks = split_into_tasks(train, test, 5, transform, seed=seed)[:args.tasks]
    for i, task in enumerate(tasks):  # each task keeps its own batches in every order
        task.train_batches = batches(task.train, args.batch_size, seed + i, True, args.limit)
        task.test_batches = batches(task.test, 256, 0, False, None)
    tasks = [tasks[i] for i in order] if order is not None else tasks
    out = {"classes": {t.name: t.classes for t in tasks}}
    timings = {}
    for method in args.methods:
        start = time.perf_counter()
        if method == "halrp":
            result = run_halrp(tasks, args, seed)
            halrp_params = sum(result["params_per_task"]) / len(tasks)
            probe = backbone()
            targets = lora_targets(result["targets"], probe)
            rank = lora_rank_for(halrp_params, targets, probe)
        elif method in ("lora", "adalora"):
            if "halrp" not in out:
                raise SystemExit("lora/adalora match HALRP's parameters: run halrp first")
            result = run_peft(method, tasks, args, seed, rank, targets)
        elif method == "full_ft":
            result = run_full_ft(tasks, args, seed)
        else:
            result = run_seq_ft(tasks, args, seed)
        timings[method] = time.perf_counter() - start
        result.update(acc=average_accuracy(result["matrix"]),
                      bwt=backward_transfer(result["matrix"]), wall_s=timings[method])
        out[method] = result
        print(f"  {method:<8} ACC {result['acc']:6.2f}  BWT {result['bwt']:+6.2f}  params/task "
              f"{sum(result['params_per_task']) / len(result['params_per_task']):>12,.0f}  "
              f"{timings[method]:6.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--orders", type=int, default=1, help="task orders (study 3 if > 1)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--data", choices=["embedded", "full"], default="embedded")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-calibration", dest="calibrate", action="store_false",
                        help="keep the running statistics gathered during training (every "
                        "method); the default recomputes them when a task ends")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    args.tasks, args.limit = (2, 2) if args.quick else (5, None)
    if args.quick:
        args.epochs = 1
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
            "wall_s": [r[method]["wall_s"] for r in runs]}
        if args.orders > 1:
            finals = [{"-".join(map(str, sorted(r["classes"][n]))): r[method]["matrix"][-1][i]
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
    print(f"\n{'method':<9}{'ACC':>8}{'BWT':>8}{'params/task':>14}{'wall s':>8}"
          + ("  MOPD   AOPD" if args.orders > 1 else ""))
    for method, s in summary.items():
        line = (f"{method:<9}{s['acc'][0]:>8.2f}{s['bwt'][0]:>+8.2f}"
                f"{s['params_per_task']:>14,.0f}{s['wall_s'][0]:>8.0f}")
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
