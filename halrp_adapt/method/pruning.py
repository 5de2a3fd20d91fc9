"""Magnitude pruning of a task's factors at `end_task` (HALRP.md section 5, per task).

The reference's mixAR rule: the threshold is `max(floor, percentile(|A|, |B|; 100 * rate))`,
entries at or below it become zero. Here the percentile is the one that leaves at most `keep`
nonzero entries, `keep` being what the task's budget has left after its dense parts (scales,
biases, norms). Only the task being ended is pruned: finished tasks are never touched again.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prune_threshold(factors: list[Tensor], keep: int, floor: float) -> float:
    """The smallest threshold >= `floor` that leaves at most `keep` entries above it.

    Example:
        >>> prune_threshold([torch.tensor([0.1, -0.5, 0.3, 2.0])], keep=2, floor=1e-5)
        0.30000001192092896
    """
    if not factors:
        return floor
    magnitudes = torch.cat([f.detach().abs().flatten().float() for f in factors])
    if int((magnitudes > floor).sum()) <= keep:
        return floor
    if keep <= 0:
        return max(floor, float(magnitudes.max()))
    kth = magnitudes.numel() - keep
    return max(floor, float(torch.kthvalue(magnitudes, kth).values))


@torch.no_grad()
def prune_(factors: list[Tensor], threshold: float) -> int:
    """Zero every entry with magnitude <= `threshold`, in place; return the nonzeros left."""
    left = 0
    for f in factors:
        f.mul_(f.abs() > threshold)
        left += int(torch.count_nonzero(f))
    return left
