"""A small continual run through ContinualTrainer, for the tests that need real processes
(two ranks with gloo, a kill in the middle of a task and a resume).

    python tests/scripts/continual_run.py OUTPUT_DIR [--tasks 3] [--epochs 2]
    torchrun --nproc_per_node 2 tests/scripts/continual_run.py OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from accelerate import Accelerator
from torch import nn

import halrp_adapt
from halrp_adapt.task_splits import embedded_fashion_mnist, split_into_tasks
from halrp_adapt.trainer import ContinualTrainer, TrainConfig


def to_tensor(image) -> torch.Tensor:
    pixels = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
    return pixels.view(1, 28, 28).float().div(255).sub(0.5).div(0.5)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.LayerNorm(128), nn.ReLU(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = embedded_fashion_mnist()
    tasks = split_into_tasks(train, test, 5, to_tensor, seed=0, val_fraction=0.1)[:args.tasks]
    handle = halrp_adapt.attach(mlp(), budget=0.2, train_base=True)
    accelerator = Accelerator(cpu=True)
    trainer = ContinualTrainer(handle, tasks, TrainConfig(epochs=args.epochs,
                                                          batch_size=args.batch_size, seed=0),
                               accelerator=accelerator, output_dir=args.output_dir,
                               progress=False, log=lambda m: print(m, flush=True))
    result = trainer.run()
    if accelerator.is_main_process:
        print("RESULT " + json.dumps({"matrix": result["matrix"],
                                      "processes": accelerator.num_processes}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
