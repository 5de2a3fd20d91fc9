"""Five tasks of Split Fashion-MNIST on a small CNN, learned one after another with HALRP.

The first task trains the CNN itself (the paper's protocol for a backbone without pretrained
weights); each later task gets HALRP adapters within `--budget` of the CNN's parameters.
Prints the accuracy matrix (row i: after task i) and the report of stored parameters.

    python examples/quickstart.py            # embedded data, about a minute on 2 CPU cores
    python examples/quickstart.py --data full --epochs 3
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

import halrp_adapt
from halrp_adapt.data.fashion_mnist import class_subset, load_fashion_mnist


def small_cnn(num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes))


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    return 100.0 * correct / len(loader.dataset)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=["embedded", "full", "auto"], default="embedded")
    parser.add_argument("--tasks", type=int, default=5, help="tasks of 10 // tasks classes")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.tasks <= 5:
        parser.error(f"--tasks must be in 1..5 (two classes or more per task), got {args.tasks}")

    torch.manual_seed(args.seed)
    data = load_fashion_mnist(args.data)
    per_task = 10 // args.tasks
    splits = [list(range(i * per_task, (i + 1) * per_task)) for i in range(args.tasks)]
    cl = halrp_adapt.attach(small_cnn(), budget=args.budget, train_base=True)

    matrix: list[list[float]] = []
    tests: list[DataLoader] = []
    start = time.time()
    for t, classes in enumerate(splits):
        name = f"task{t}"
        train = DataLoader(class_subset(data["train"], classes), batch_size=64, shuffle=True)
        tests.append(DataLoader(class_subset(data["test"], classes), batch_size=256))
        cl.add_task(name, num_classes=len(classes))
        if t > 0:
            cl.estimate_ranks(train)
        optimizer = torch.optim.Adam(cl.trainable_parameters(), lr=1e-3)
        cl.train()
        for _ in range(args.epochs):
            for x, y in train:
                loss = nn.functional.cross_entropy(cl(x), y) + cl.regularization_loss()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        cl.end_task(calibration_data=train)  # prune, recompute norm statistics, freeze
        row = []
        for j, loader in enumerate(tests):
            with cl.task(f"task{j}"):
                row.append(accuracy(cl, loader))
        matrix.append(row)
        print(f"after {name} (classes {classes}): " + " ".join(f"{a:5.1f}" for a in row))

    final = matrix[-1]
    acc = sum(final) / len(final)
    bwt = sum(final[j] - matrix[j][j] for j in range(len(final) - 1)) / max(len(final) - 1, 1)
    print(f"\nACC {acc:.2f}  BWT {bwt:+.2f}  ({time.time() - start:.0f} s)\n")
    print(cl.report())
    return {"matrix": matrix, "acc": acc, "bwt": bwt}


if __name__ == "__main__":
    main()
