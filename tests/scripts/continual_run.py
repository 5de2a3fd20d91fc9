"""A small continual run through ContinualTrainer, for the tests that need real processes
(two ranks with gloo, a kill in the middle of a task and a resume).

    python tests/scripts/continual_run.py OUTPUT_DIR [--tasks 3] [--epochs 2]
    torchrun --nproc_per_node 2 tests/scripts/continual_run.py OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import nn
from torch.distributed.fsdp import FSDPModule

import halrp_adapt
from halrp_adapt.files.serialization import task_state_dict
from halrp_adapt.data.task_splits import embedded_fashion_mnist, split_into_tasks
from halrp_adapt.training.trainer import ContinualTrainer, TrainConfig
from clean_exit import finish_distributed


def to_tensor(image) -> torch.Tensor:
    pixels = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
    return pixels.view(1, 28, 28).float().div(255).sub(0.5).div(0.5)


def mlp(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(64) if batch_norm else nn.Identity()
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.LayerNorm(128), nn.ReLU(),
                         nn.Linear(128, 64), norm, nn.ReLU(), nn.Linear(64, 10))


class Block(nn.Module):
    """A residual MLP block: what FSDP's wrap policy shards one by one (as timm's ViT blocks)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


class BlockNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(784, 64))
        self.blocks = nn.ModuleList([Block(64), Block(64)])
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batch-norm", action="store_true",
                        help="add a BatchNorm1d (its statistics differ per process)")
    parser.add_argument("--scenario", default="task-incremental")
    parser.add_argument("--blocks", action="store_true", help="a model with blocks (BlockNet)")
    parser.add_argument("--fsdp", action="store_true", help="shard the backbone with FSDP2")
    parser.add_argument("--trial", default="low-rank",
                        help="HalrpConfig.trial (a sharded model's estimation uses 'full')")
    args = parser.parse_args()
    torch.set_num_threads(1)
    train, test = embedded_fashion_mnist()
    tasks = split_into_tasks(train, test, 5, to_tensor, seed=0, val_fraction=0.1)[:args.tasks]
    model = BlockNet() if args.blocks else mlp(args.batch_norm)
    handle = halrp_adapt.attach(model, budget=0.2, train_base=True, trial=args.trial)
    accelerator = Accelerator(cpu=True)
    trainer = ContinualTrainer(handle, tasks, TrainConfig(epochs=args.epochs,
                                                          batch_size=args.batch_size, seed=0),
                               accelerator=accelerator, output_dir=args.output_dir,
                               progress=False, log=lambda m: print(m, flush=True),
                               scenario=args.scenario, fsdp=args.fsdp or None)
    result = trainer.run()
    digests = {name: task_digest(trainer.handle, name) for name in trainer.handle.tasks}
    saved = {name: task_digest_on_disk(args.output_dir, name) for name in trainer.handle.tasks}
    every_rank = gather_object([digests])
    if accelerator.is_main_process:
        print("RESULT " + json.dumps({"matrix": result["matrix"], "digests": every_rank,
                                      "processes": accelerator.num_processes,
                                      "saved_digests": saved,
                                      "sharded": type(trainer.handle.model).__name__,
                                      "fsdp_modules": [n for n, m in
                                                       trainer.handle.model.named_modules()
                                                       if isinstance(m, FSDPModule)],
                                      "class_incremental": result["class_incremental"]}),
              flush=True)
    finish_distributed()


def task_digest(handle, name: str) -> str:
    """sha256 of every tensor a task owns, as this process holds it."""
    digest = hashlib.sha256()
    for key, tensor in sorted(task_state_dict(handle, name).items()):
        digest.update(key.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


def task_digest_on_disk(output_dir: str, name: str) -> str:
    """The same digest of the task as saved right after it finished."""
    from safetensors.torch import load_file

    from halrp_adapt.files.storage import WEIGHTS_NAME

    tensors = load_file(f"{output_dir}/adapters/{name}/{WEIGHTS_NAME}")
    digest = hashlib.sha256()
    for key, tensor in sorted(tensors.items()):
        digest.update(key.encode() + tensor.numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
