"""Permuted-MNIST-style tasks, built exactly as the reference's PMNIST loader builds them.

Each image is resized to 32x32 (bilinear), copied to 3 channels and normalised with mean
0.1307 and std 0.3081; task i then shuffles its 3x32x32 values with the permutation
`RandomState(r * 100 + i).shuffle(arange(3072))`, where r = the i-th entry of
`RandomState(seed).shuffle(arange(10))` ([2 8 4 9 1 6 7 3 0 5] for seed 0). The first
`val_fraction` of each task's training set is its validation split.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .task_splits import TaskData

SIZE = (3, 32, 32)
MEAN, STD = 0.1307, 0.3081


class _Permuted(Dataset):
    """(permuted image, label) pairs over shared, already normalised base images."""

    def __init__(
        self, flat: torch.Tensor, labels: torch.Tensor, permutation: torch.Tensor, rows: slice
    ) -> None:
        self.flat, self.labels = flat[rows], labels[rows]
        self.permutation = permutation

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.flat[i][self.permutation].view(SIZE), int(self.labels[i])


def base_images(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 3072) float32: resized, 3 channels, normalised."""
    x = torch.from_numpy(images).float().div_(255).unsqueeze(1)
    x = torch.nn.functional.interpolate(x, size=SIZE[1:], mode="bilinear", align_corners=False)
    x = x.sub_(MEAN).div_(STD)
    return x.expand(-1, 3, -1, -1).reshape(len(x), -1).contiguous()


def task_seeds(seed: int, num_tasks: int) -> list[int]:
    order = np.arange(10)
    np.random.RandomState(seed).shuffle(order)
    return [int(r) for r in order[:num_tasks]]


def permuted_tasks(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    num_tasks: int = 10,
    seed: int = 0,
    val_fraction: float = 0.2,
    train_size: float = 1.0,
) -> list[TaskData]:
    """`num_tasks` (at most 10) permuted tasks of all 10 classes each.

    Example:
        >>> from halrp_adapt.data.fashion_mnist import load_fashion_mnist
        >>> d = load_fashion_mnist("embedded")
        >>> tasks = permuted_tasks(d["train"].images, d["train"].labels, d["test"].images,
        ...                        d["test"].labels, num_tasks=2)
        >>> len(tasks[0].train), len(tasks[0].val), tasks[0].train[0][0].shape
        (2400, 600, torch.Size([3, 32, 32]))
    """
    if not 1 <= num_tasks <= 10:
        raise ValueError(f"`num_tasks` must be in 1..10, got {num_tasks}.")
    if not 0 < train_size <= 1:
        raise ValueError(f"`train_size` must be in (0, 1], got {train_size}.")
    keep = int(len(train_labels) * train_size)
    train = base_images(train_images[:keep])
    test = base_images(test_images)
    y_train = torch.from_numpy(np.asarray(train_labels[:keep], dtype=np.int64))
    y_test = torch.from_numpy(np.asarray(test_labels, dtype=np.int64))
    cut = int(len(y_train) * val_fraction)
    tasks = []
    for i, r in enumerate(task_seeds(seed, num_tasks)):
        indices = np.arange(train.shape[1])
        np.random.RandomState(r * 100 + i).shuffle(indices)
        permutation = torch.from_numpy(indices)
        tasks.append(
            TaskData(
                name=f"pmnist{i}",
                classes=list(range(10)),
                train=_Permuted(train, y_train, permutation, slice(cut, None)),
                val=_Permuted(train, y_train, permutation, slice(0, cut)) if cut else None,
                test=_Permuted(test, y_test, permutation, slice(None)),
            )
        )
    return tasks
