"""HALRP with timm's own data and optimiser tools: `timm.data.create_dataset` / `create_loader`
over image folders, `timm.optim` through `create_halrp_optimizer`, the regularised loss through
`RegularizedLoss` (the two lines a timm `train.py` changes), on a timm ResNet.

    python examples/timm_train.py             # 2 tasks of Fashion-MNIST classes, about a minute
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_loader
from torch import nn

import halrp_adapt
from halrp_adapt.data.fashion_mnist import load_fashion_mnist
from halrp_adapt.integrations.timm import RegularizedLoss, create_halrp_optimizer


def image_folder(root: Path, split, classes: list[int], limit: int) -> Path:
    """An ImageFolder tree (one subfolder per class) of PNGs, as timm's datasets read them."""
    for label in classes:
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(split.images[split.labels == label][:limit]):
            Image.fromarray(image).convert("RGB").save(folder / f"{i}.png")
    return root


def main(argv: list[str] | None = None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--per-class", type=int, default=150)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = load_fashion_mnist("embedded")
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    cl = halrp_adapt.attach(model, budget=0.05, train_base=True)
    accuracies = []
    with tempfile.TemporaryDirectory() as tmp:
        for t, classes in enumerate([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]):
            roots = {s: image_folder(Path(tmp) / f"task{t}" / s, data[s], classes, args.per_class)
                     for s in ("train", "test")}
            loaders = {s: create_loader(create_dataset("", root=str(roots[s])),
                                        input_size=(3, 32, 32), batch_size=64,
                                        is_training=s == "train", use_prefetcher=False,
                                        num_workers=0, mean=(0.5,) * 3, std=(0.5,) * 3)
                       for s in roots}
            cl.add_task(f"task{t}", num_classes=len(classes))
            if t > 0:
                cl.estimate_ranks(loaders["train"])
            optimizer = create_halrp_optimizer(cl, opt="adamw", lr=1e-3)
            loss_fn = RegularizedLoss(nn.CrossEntropyLoss(), cl)
            cl.train()
            for _ in range(args.epochs):
                for x, y in loaders["train"]:
                    loss = loss_fn(cl(x), y)
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
            cl.end_task(calibration_data=loaders["train"])
            cl.eval()
            with torch.no_grad(), cl.task(f"task{t}"):
                hits = [(cl(x).argmax(1) == y).float() for x, y in loaders["test"]]
            accuracies.append(100 * float(torch.cat(hits).mean()))
            print(f"task{t} (classes {classes}): accuracy {accuracies[-1]:.1f}%")
    return accuracies


if __name__ == "__main__":
    main()
