"""Task sequences from image-classification datasets that `datasets` opens.

Any dataset with an image column and a label column works: a Hub id (`uoft-cs/cifar100`,
`zh-plus/tiny-imagenet`, `timm/imagenet-1k-wds`, ...), a local `imagefolder`, or the embedded
Fashion-MNIST. Classes are put in a seeded (or given) order and cut into tasks; each task's
labels are renumbered 0..k-1; a share of each task's training set can be held out for
validation; images go through the transform the model wants (timm's, by default).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset

IMAGE_NAMES = ("image", "img", "jpg", "png", "webp", "pixel_values")
LABEL_NAMES = ("label", "labels", "fine_label", "cls", "class", "target")


@dataclass
class TaskData:
    """One task: its classes (original label ids, in order) and its splits."""

    name: str
    classes: list[int]
    train: Dataset
    test: Dataset
    val: Dataset | None = None
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class _TaskView(Dataset):
    """Rows of a `datasets.Dataset` holding a task's classes, as (image tensor, new label)."""

    def __init__(
        self,
        source: datasets.Dataset,
        rows: np.ndarray,
        image_column: str,
        label_column: str,
        lookup: dict[int, int],
        transform: Callable,
    ) -> None:
        self.source, self.rows = source, rows
        self.image_column, self.label_column = image_column, label_column
        self.lookup, self.transform = lookup, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.source[int(self.rows[i])]
        image = item[self.image_column]
        if hasattr(image, "convert"):
            image = image.convert("RGB")
        return self.transform(image), self.lookup[int(item[self.label_column])]


def detect_columns(
    ds: datasets.Dataset, image_column: str | None = None, label_column: str | None = None
) -> tuple[str, str]:
    """(image column, label column): given, else found by feature type or usual name."""
    features = ds.features
    if image_column is None:
        typed = [n for n, f in features.items() if isinstance(f, datasets.Image)]
        named = [n for n in IMAGE_NAMES if n in features]
        image_column = (typed or named or [None])[0]
    if label_column is None:
        typed = [n for n, f in features.items() if isinstance(f, datasets.ClassLabel)]
        named = [n for n in LABEL_NAMES if n in features]
        label_column = (typed or named or [None])[0]
    for option, column in (("image_column", image_column), ("label_column", label_column)):
        if column is None or column not in features:
            raise ValueError(
                f"`{option}`: the dataset has no such column "
                f"({column!r}); its columns are {list(features)}. Name it with "
                f"--{option.replace('_', '-')}."
            )
    return image_column, label_column


def class_order(num_classes: int, seed: int, order: Sequence[int] | None = None) -> list[int]:
    """A permutation of range(num_classes): `order` checked, or seeded at random."""
    if order is not None:
        order = [int(c) for c in order]
        if sorted(order) != list(range(num_classes)):
            raise ValueError(
                f"`class_order` must be a permutation of 0..{num_classes - 1}, got "
                f"{len(order)} entries."
            )
        return order
    rng = random.Random(seed)
    classes = list(range(num_classes))
    rng.shuffle(classes)
    return classes


def split_into_tasks(
    train: datasets.Dataset,
    test: datasets.Dataset,
    num_tasks: int,
    transform: Callable,
    *,
    classes_per_task: int | None = None,
    seed: int = 0,
    order: Sequence[int] | None = None,
    val_fraction: float = 0.0,
    image_column: str | None = None,
    label_column: str | None = None,
    test_transform: Callable | None = None,
) -> list[TaskData]:
    """Cut a dataset into `num_tasks` tasks of `classes_per_task` classes (default: all
    classes shared out evenly), in a seeded or given class order.

    Example:
        >>> from halrp_adapt.data.task_splits import embedded_fashion_mnist
        >>> train, test = embedded_fashion_mnist()
        >>> tasks = split_into_tasks(train, test, 5, transform=lambda im: im, seed=0)
        >>> [len(t.classes) for t in tasks], len(tasks[0].train)
        ([2, 2, 2, 2, 2], 600)
    """
    image_column, label_column = detect_columns(train, image_column, label_column)
    labels_train = np.asarray(train[label_column], dtype=np.int64)
    labels_test = np.asarray(test[label_column], dtype=np.int64)
    feature = train.features[label_column]
    total = (
        feature.num_classes
        if isinstance(feature, datasets.ClassLabel)
        else int(labels_train.max()) + 1
    )
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be an int >= 1, got {num_tasks!r}.")
    per_task = classes_per_task or total // num_tasks
    if per_task < 1 or per_task * num_tasks > total:
        raise ValueError(
            f"`num_tasks`={num_tasks} x `classes_per_task`={per_task} needs "
            f"{num_tasks * per_task} classes; the dataset has {total}."
        )
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction}.")
    names = feature.names if isinstance(feature, datasets.ClassLabel) else []
    ordered = class_order(total, seed, order)
    tasks = []
    for t in range(num_tasks):
        classes = ordered[t * per_task : (t + 1) * per_task]
        lookup = {c: i for i, c in enumerate(classes)}
        train_rows = np.flatnonzero(np.isin(labels_train, classes))
        val_rows = None
        if val_fraction > 0:
            # The first share of each task's training rows, as the reference holds out.
            cut = int(round(len(train_rows) * val_fraction))
            val_rows, train_rows = train_rows[:cut], train_rows[cut:]
        test_rows = np.flatnonzero(np.isin(labels_test, classes))
        view = _TaskView
        eval_tf = test_transform or transform
        tasks.append(
            TaskData(
                name=f"task{t}",
                classes=classes,
                train=view(train, train_rows, image_column, label_column, lookup, transform),
                test=view(test, test_rows, image_column, label_column, lookup, eval_tf),
                val=None
                if val_rows is None
                else view(train, val_rows, image_column, label_column, lookup, eval_tf),
                class_names=[names[c] for c in classes] if names else [],
            )
        )
    return tasks


def load_image_dataset(
    name_or_path: str, train_split: str = "train", test_split: str | None = None, **load_kwargs: Any
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """(train, test) of a Hub dataset id or a local `imagefolder`; `test_split` defaults to
    the first of test/validation/valid/val the dataset has."""
    if os.path.isdir(name_or_path):
        loaded = datasets.load_dataset("imagefolder", data_dir=name_or_path, **load_kwargs)
    else:
        loaded = datasets.load_dataset(name_or_path, **load_kwargs)
    if train_split not in loaded:
        raise ValueError(
            f"`train_split` {train_split!r} is not in {name_or_path}; it has {list(loaded)}."
        )
    if test_split is None:
        test_split = next((s for s in ("test", "validation", "valid", "val") if s in loaded), None)
    if test_split is None or test_split not in loaded:
        raise ValueError(
            f"`test_split` {test_split!r}: {name_or_path} has splits "
            f"{list(loaded)}; name the evaluation split."
        )
    return loaded[train_split], loaded[test_split]


def embedded_fashion_mnist(source: str = "embedded") -> tuple[datasets.Dataset, datasets.Dataset]:
    """Fashion-MNIST (embedded subset, or the Debian full set) as `datasets` image datasets."""
    from PIL import Image

    from .fashion_mnist import CLASS_NAMES, load_fashion_mnist

    arrays = load_fashion_mnist(source)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_NAMES))}
    )
    out = []
    for split in ("train", "test"):
        images = [Image.fromarray(a, mode="L") for a in arrays[split].images]
        out.append(
            datasets.Dataset.from_dict(
                {"image": images, "label": arrays[split].labels.tolist()}, features=features
            )
        )
    return out[0], out[1]
