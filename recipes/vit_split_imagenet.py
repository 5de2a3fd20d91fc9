"""Split ImageNet (or any image dataset) on a timm ViT, learned task after task with HALRP.

    accelerate launch recipes/vit_split_imagenet.py                 # offline default, minutes
    accelerate launch recipes/vit_split_imagenet.py --dataset timm/imagenet-1k-wds \\
        --model vit_small_patch16_224 --pretrained --num-tasks 10   # Split ImageNet, 10 x 100

With no arguments it uses Split ImageNet when `timm/imagenet-1k-wds` is already in the Hugging
Face cache; otherwise real Fashion-MNIST images embedded in halrp_adapt (5 tasks x 2 classes)
on a small ViT (4 blocks, the images' own 28 px, patch 4) whose first task trains the backbone,
as the paper does without pretrained weights: about 4 minutes on 2 CPU cores. Rerun the same
command to resume an interrupted run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import timm
from timm.data import create_transform, resolve_data_config

from halrp_adapt.training.recipes import (
    add_training_args,
    check_timm_model,
    check_training_args,
    recipe_parser,
    run_tasks,
    seed_run,
)
from halrp_adapt.data.task_splits import embedded_fashion_mnist, load_image_dataset, split_into_tasks

IMAGENET = "timm/imagenet-1k-wds"


def imagenet_cached() -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"datasets--{IMAGENET.replace('/', '--')}").is_dir()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_parser(__doc__)
    parser.add_argument("--dataset", default="auto",
                        help="a Hub dataset id, a local imagefolder, 'fashion-mnist' "
                             "(embedded; 'fashion-mnist-full' for Debian's full set), or "
                             "'auto' (ImageNet if cached, else fashion-mnist)")
    parser.add_argument("--model", default=None,
                        help="any timm vit_* (default: vit_small_patch16_224 on ImageNet, a "
                             "small vit_tiny_patch16_224 otherwise)")
    parser.add_argument("--pretrained", action="store_true",
                        help="load the model's pretrained weights (needs them reachable)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="input size (default: 28 on Fashion-MNIST, its own, 224 otherwise)")
    parser.add_argument("--depth", type=int, default=None,
                        help="transformer blocks (default: 4 for the small offline ViT, the "
                             "model's own otherwise)")
    parser.add_argument("--num-tasks", type=int, default=None)
    parser.add_argument("--classes-per-task", type=int, default=None)
    parser.add_argument("--class-order", default=None,
                        help="comma-separated class ids (default: seeded shuffle)")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--label-column", default=None)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default=None)
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each task's training set held out for the Fisher")
    add_training_args(parser, epochs=None, batch_size=64, lr=1e-3, budget=0.05,
                      output_dir="runs/vit_split")
    args = parser.parse_args(argv)
    if args.dataset == "auto":
        args.dataset = IMAGENET if imagenet_cached() else "fashion-mnist"
    small = args.dataset.startswith("fashion-mnist")
    args.epochs = args.epochs or (8 if small else 3)
    check_training_args(parser, args)
    args.model = args.model or ("vit_small_patch16_224" if not small else "vit_tiny_patch16_224")
    if not args.model.startswith("vit"):
        parser.error(f"--model must be a timm vit_* model, got {args.model!r}")
    check_timm_model(parser, args.model, prefix="vit_")
    args.small = small
    args.img_size = args.img_size or (28 if small else 224)
    if args.depth is not None and args.depth < 1:
        parser.error(f"--depth must be >= 1, got {args.depth}")
    args.num_tasks = args.num_tasks or (5 if small else 10)
    if args.class_order is not None:
        try:
            args.class_order = [int(c) for c in args.class_order.split(",")]
        except ValueError:
            parser.error(f"--class-order must be comma-separated ints, got {args.class_order!r}")
    args.parser = parser
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    parser = args.parser
    seed_run(args)  # the model's initial weights and the data order follow --seed
    if args.small:
        train, test = embedded_fashion_mnist("full" if args.dataset.endswith("full")
                                             else "embedded")
        model_kwargs = {"img_size": args.img_size, "patch_size": 4, "depth": args.depth or 4}
    else:
        try:
            train, test = load_image_dataset(args.dataset, args.train_split, args.test_split)
        except (ValueError, FileNotFoundError, ConnectionError, OSError) as err:
            parser.error(f"--dataset {args.dataset!r}: {err}")
        model_kwargs = {"img_size": args.img_size}
        if args.depth is not None:
            model_kwargs["depth"] = args.depth
    model = timm.create_model(args.model, pretrained=args.pretrained, **model_kwargs)
    data_config = resolve_data_config({"input_size": (3, args.img_size, args.img_size),
                                       "crop_pct": 1.0 if args.small else None}, model=model)
    evaluation = create_transform(**data_config, is_training=False)
    # timm's training augmentation (random resized crops) is for full-size photos; the small
    # 28-pixel default images learn better without it.
    training = evaluation if args.small else create_transform(**data_config, is_training=True)
    try:
        tasks = split_into_tasks(
            train, test, args.num_tasks, training, test_transform=evaluation,
            classes_per_task=args.classes_per_task, seed=args.seed, order=args.class_order,
            val_fraction=args.val_fraction, image_column=args.image_column,
            label_column=args.label_column)
    except ValueError as err:
        parser.error(str(err))
    options = {"train_base": not args.pretrained}
    return run_tasks(args, model, tasks, halrp_options=options)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
