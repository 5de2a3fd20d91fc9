"""Compact storage of pruned factors: a bit mask of the nonzero positions plus their values.

A dense fp32 entry costs 32 bits; the mask costs 1 bit per entry and each kept value 32, so a
factor is stored compactly once at least 1/32 of its entries are zero (`worth_compacting`).
"""

from __future__ import annotations

import torch
from torch import Tensor

_BITS = torch.arange(8, dtype=torch.uint8)


def pack_mask(mask: Tensor) -> Tensor:
    """Bool tensor -> uint8 tensor of ceil(numel / 8) bytes, least significant bit first.

    Example:
        >>> pack_mask(torch.tensor([True, False, True, True, False, False, False, False, True]))
        tensor([13,  1], dtype=torch.uint8)
    """
    flat = mask.flatten().to(torch.uint8)
    padded = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8)
    return (padded << _BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: Tensor, numel: int) -> Tensor:
    """Inverse of `pack_mask`: a flat bool tensor of `numel` entries."""
    bits = (packed[:, None] >> _BITS.to(packed.device)) & 1
    return bits.flatten()[:numel].bool()


def worth_compacting(dense: Tensor) -> bool:
    return int(torch.count_nonzero(dense)) * 32 < 31 * dense.numel()


def compact(dense: Tensor) -> tuple[Tensor, Tensor]:
    """(values, packed mask) of a dense tensor."""
    nonzero = dense != 0
    return dense[nonzero].detach().clone(), pack_mask(nonzero)


def expand(values: Tensor, packed: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The dense tensor of `shape` that `compact` encoded (differentiable in `values`)."""
    numel = 1
    for size in shape:
        numel *= size
    mask = unpack_mask(packed, numel)
    if int(mask.sum()) != values.numel():
        raise ValueError(
            f"a compact factor's mask marks {int(mask.sum())} entries but it holds "
            f"{values.numel()} values."
        )
    dense = values.new_zeros(numel).masked_scatter(mask, values)
    return dense.view(shape)
