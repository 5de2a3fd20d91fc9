"""The paper's Permuted-MNIST protocol: LeNet, 10 permuted tasks, the first trains the base.

    accelerate launch recipes/pmnist_lenet.py                      # the reference's defaults
    accelerate launch recipes/pmnist_lenet.py --epochs 4           # the anchor's protocol

Defaults are the reference's `scripts/pmnist_LeNet_HALRP.sh`: 12 epochs (tasks after the first
train `epochs - trial_epochs`), batch 128, Adam 1e-3 decayed by 0.95 every 4,000 samples,
wd 1e-3, l1 1e-6, explained 0.9, upper rank 100, one trial epoch, 20% of each training set
held out for validation (the Fisher). The reference bounds all tasks together to 60% growth by
re-pruning; here each task gets a budget (default 0.06, so nine adapted tasks stay under 0.6).
Data: MNIST when `ylecun/mnist` is in the Hugging Face cache, else the full Fashion-MNIST
(Debian's `dataset-fashion-mnist`), else the embedded Fashion-MNIST subset.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from halrp_adapt.data.fashion_mnist import DEBIAN_DIR, load_fashion_mnist
from halrp_adapt.data.permuted_tasks import permuted_tasks
from halrp_adapt.training.recipes import (
    add_training_args,
    check_training_args,
    recipe_parser,
    run_tasks,
    seed_run,
)
from halrp_adapt.data.zoo import lenet

MNIST = "ylecun/mnist"


def mnist_cached() -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"datasets--{MNIST.replace('/', '--')}").is_dir()


def load_arrays(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if name == "mnist":
        import datasets

        loaded = datasets.load_dataset(MNIST)
        return {s: (np.stack([np.asarray(im) for im in loaded[s]["image"]]),
                    np.asarray(loaded[s]["label"])) for s in ("train", "test")}
    data = load_fashion_mnist("full" if name == "fashion-mnist-full" else "embedded")
    return {s: (data[s].images, data[s].labels) for s in ("train", "test")}


def main(argv: list[str] | None = None) -> dict:
    parser = recipe_parser(__doc__)
    parser.add_argument("--dataset", default="auto",
                        choices=["auto", "mnist", "fashion-mnist-full", "fashion-mnist"])
    parser.add_argument("--num-tasks", type=int, default=10)
    parser.add_argument("--train-size", type=float, default=1.0,
                        help="share of the training set to use (the reference's train_size)")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    add_training_args(parser, epochs=12, batch_size=128, lr=1e-3, budget=0.06,
                      output_dir="runs/pmnist_lenet")
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    if not 1 <= args.num_tasks <= 10:
        parser.error(f"--num-tasks must be in 1..10, got {args.num_tasks}")
    if args.dataset == "auto":
        args.dataset = "mnist" if mnist_cached() else (
            "fashion-mnist-full" if (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists()
            else "fashion-mnist")
    seed_run(args)  # the model's initial weights and the data order follow --seed
    arrays = load_arrays(args.dataset)
    tasks = permuted_tasks(*arrays["train"], *arrays["test"], num_tasks=args.num_tasks,
                           seed=args.seed, val_fraction=args.val_fraction,
                           train_size=args.train_size)
    if args.lr_decay is None:  # the reference: x0.95 every 50,000 / 10 * 0.8 = 4,000 samples
        per_task = 50000 / 10 * args.train_size * (1 - args.val_fraction)
        args.lr_decay = 0.95 ** (args.batch_size / per_task)
    print(f"PMNIST on {args.dataset}: {len(tasks)} tasks of {len(tasks[0].train)} training "
          f"images, {args.epochs} epochs")
    options = {"train_base": True, "wd": 1e-3, "l1": 1e-6, "explained": 0.9, "upper_rank": 100}
    return run_tasks(args, lenet(), tasks, halrp_options=options,
                     epochs_after_trial=True)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
