"""Fashion-MNIST offline: the full set from Debian's `dataset-fashion-mnist` when installed,
else the subset embedded in this package (300 training and 100 test images per class, MIT
licence, Zalando Research). Used by the demo, the tests and the recipes' default data.
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCES = ("auto", "full", "embedded")
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class Split(NamedTuple):
    images: np.ndarray  # (N, 28, 28) uint8
    labels: np.ndarray  # (N,) int64


def _idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset)


def load_fashion_mnist(source: str = "auto") -> dict[str, Split]:
    """{"train": Split, "test": Split}. `source`: "auto", "full" (Debian) or "embedded".

    Example:
        >>> data = load_fashion_mnist("embedded")
        >>> data["train"].images.shape, int(data["test"].labels.max())
        ((3000, 28, 28), 9)
    """
    if source not in SOURCES:
        raise ValueError(f"`source` must be one of {SOURCES}, got {source!r}.")
    full = (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists()
    if source == "full" and not full:
        raise FileNotFoundError(
            f"the full Fashion-MNIST is not in {DEBIAN_DIR}: "
            "apt-get install dataset-fashion-mnist, or use source='embedded'."
        )
    if source == "full" or (source == "auto" and full):
        out = {}
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = _idx(DEBIAN_DIR / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
            labels = _idx(DEBIAN_DIR / f"{prefix}-labels-idx1-ubyte.gz", 8).astype(np.int64)
            out[split] = Split(images, labels)
        return out
    with resources.files("halrp_adapt").joinpath("data/fashion_mnist_small.npz").open("rb") as f:
        arrays = np.load(f)
        return {
            split: Split(arrays[f"{split}_images"], arrays[f"{split}_labels"].astype(np.int64))
            for split in ("train", "test")
        }


def class_subset(split: Split, classes: list[int], size: int = 28) -> TensorDataset:
    """Images of `classes` as float tensors (1 x size x size, mean 0.5 std 0.5), labels
    renumbered 0..len(classes)-1 in the order given."""
    keep = np.isin(split.labels, classes)
    images = torch.from_numpy(split.images[keep].copy()).float().div_(255).unsqueeze(1)
    if size != 28:
        images = torch.nn.functional.interpolate(
            images, size=(size, size), mode="bilinear", align_corners=False
        )
    lookup = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([lookup[int(c)] for c in split.labels[keep]], dtype=torch.long)
    return TensorDataset(images.sub_(0.5).div_(0.5), labels)
