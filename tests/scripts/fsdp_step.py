"""FSDP2 (`fully_shard`) over a HALRP model on 2 CPU ranks with gloo: the task's parameters
survive the wrapping (sharded, still trainable, nothing else trainable) and train.

    torchrun --nproc_per_node 2 tests/scripts/fsdp_step.py
"""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

import halrp_adapt
from clean_exit import finish_distributed


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 32),
                        nn.ReLU(), nn.Linear(32, 4))
    cl = halrp_adapt.attach(net, budget=0.9)
    x, y = torch.randn(8, 16), torch.randint(0, 3, (8,))
    cl.add_task("a", num_classes=3)
    cl.estimate_ranks([(x, y)], steps=1)
    before = {n: p.detach().clone() for n, p in cl.named_parameters()}
    trainable = {n for n, p in cl.named_parameters() if p.requires_grad}
    for block in cl.model:
        if any(True for _ in block.parameters()):
            fully_shard(block)
    fully_shard(cl)
    sharded = {n for n, p in cl.named_parameters() if type(p).__name__ == "DTensor"}
    still_trainable = {n for n, p in cl.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in cl.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.cross_entropy(cl(x), y) + cl.regularization_loss()
    loss.backward()
    optimizer.step()
    changed = set()
    for n, p in cl.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        if not torch.equal(full.detach(), before[n]):
            changed.add(n)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({
            "trainable": sorted(trainable), "still_trainable": sorted(still_trainable),
            "sharded": sorted(sharded), "changed": sorted(changed),
            "loss": float(loss.detach())}), flush=True)
    finish_distributed()


if __name__ == "__main__":
    main()
