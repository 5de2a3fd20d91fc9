"""The peers HALRP is measured against, each sized to a stored-parameter budget per task.

Every peer learns each task on its own copy of the backbone (nothing shared changes, so its
BWT is 0 like HALRP's) with PEFT's implementation:

- lora:    `LoraConfig`, one uniform rank on every target
- dora:    `LoraConfig(use_dora=True)`: LoRA plus a magnitude vector per layer
- ia3:     `IA3Config`: one scale vector per layer (HALRP's dense scales alone)
- adalora: `AdaLoraConfig`, init rank 1.5x the target rank, pruned to it by importance
- pissa:   `LoraConfig(init_lora_weights="pissa_niter_4")`: factors from the weight's SVD
- eva:     `LoraConfig(init_lora_weights="eva")` + `initialize_lora_eva_weights`: ranks
           redistributed across layers from the activations' SVD (one forward pass over
           the task's training batches: `_eva_init`)

Stored parameters per task are counted as HALRP counts its own (`halrp_adapt.handle.accounting`):
the adapter, the norm copies with their running statistics, heads apart. PiSSA moves the base
weight (W - B A), so what it stores against the shared base is PEFT's converted LoRA of twice
its rank: it is counted at 2r. AdaLoRA is counted at its target rank (what a pruned save holds).
Where a method's own norm copies do not fit the budget next to its smallest adapter, it uses
the base's norms frozen (BatchNorm in eval mode: the backbone's running statistics); where even
rank 1 (or one vector per layer) on every target does not fit, it keeps the deepest targets
that do. `plan_peer` says which, and the tables report it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from halrp_adapt.handle.accounting import norm_state_size

from .fitting import accuracy, fit, norm_names, recalibrate
from .sequences import Sequence, Task

PEERS = ("lora", "dora", "ia3", "adalora", "pissa", "eva")
LINEAR_ONLY = ("pissa", "eva")  # PEFT's PiSSA and EVA inits take 2-D weights / Linear inputs


@dataclass
class PeerPlan:
    """How one peer fits a budget: its targets, rank, and whether it copies the norms."""

    kind: str
    targets: list[str]
    rank: int
    own_norms: bool
    stored: int  # parameters per task, counted as HALRP counts its own
    backbone_params: int

    @property
    def growth(self) -> float:
        return self.stored / self.backbone_params


def backbone_params(model: nn.Module, head: str) -> int:
    """Every parameter outside the classifier head (HALRP's denominator)."""
    return (sum(p.numel() for p in model.parameters())
            - sum(p.numel() for p in model.get_submodule(head).parameters()))


def peer_targets(seq: Sequence, kind: str) -> list[str]:
    """The layers a peer adapts: HALRP's default targets that PEFT supports for it (dense
    Linear and Conv2d, the head apart; Linear only for PiSSA and EVA, and no pooler for EVA;
    AdaLoRA's conv layer mis-shapes strided k x k convs in PEFT, so it takes 1x1 convs and
    Linear)."""
    model = seq.backbone(2)
    out = []
    for name, m in model.named_modules():
        if name == seq.head or name.startswith(seq.head + "."):
            continue
        if isinstance(m, nn.Linear):
            # PEFT's EVA indexes per-token inputs (batch, tokens, features): a pooler sees
            # one vector per sequence.
            if not (kind == "eva" and "pooler" in name):
                out.append(name)
        elif isinstance(m, nn.Conv2d) and m.groups == 1 and kind not in LINEAR_ONLY:
            if kind != "adalora" or tuple(m.kernel_size) == (1, 1):
                out.append(name)
    return out


def _per_rank(m: nn.Module, kind: str) -> int:
    if isinstance(m, nn.Conv2d):
        cost = m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels
    else:
        cost = m.in_features + m.out_features
    return {"pissa": 2 * cost, "adalora": cost + 1}.get(kind, cost)


def _fixed(m: nn.Module, kind: str) -> int:
    out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    return out if kind in ("dora", "ia3") else 0


def plan_peer(seq: Sequence, kind: str, budget: float) -> PeerPlan | None:
    """The largest configuration of `kind` that stores at most `budget` of the backbone per
    task; None where PEFT supports none of the backbone's layers for it."""
    model = seq.backbone(2)
    modules = dict(model.named_modules())
    total = backbone_params(model, seq.head)
    room = int(budget * total)
    targets = peer_targets(seq, kind)
    if not targets:
        return None
    norms = sum(norm_state_size(modules[n]) for n in norm_names(model))

    def cost(chosen: list[str], rank: int) -> int:
        size = sum(_fixed(modules[n], kind) for n in chosen)
        if kind != "ia3":
            size += rank * sum(_per_rank(modules[n], kind) for n in chosen)
        return size

    own_norms = norms + cost(targets, 1) <= room
    left = room - (norms if own_norms else 0)
    chosen = list(targets)
    while len(chosen) > 1 and cost(chosen, 1) > left:
        chosen.pop(0)  # the deepest targets are kept
    rank = 1
    if kind != "ia3":
        per_rank = sum(_per_rank(modules[n], kind) for n in chosen)
        fixed = cost(chosen, 0)
        rank = max(1, (left - fixed) // per_rank)
    stored = cost(chosen, rank) + (norms if own_norms else 0)
    return PeerPlan(kind, chosen, int(rank), own_norms, stored, total)


def trained_first(seq: Sequence, tasks: list[Task], lr: float, seed: int, args) -> nn.Module:
    """The ViT sequence: every method's first task trains a fresh backbone fully."""
    torch.manual_seed(seed)
    model = seq.backbone(tasks[0].num_classes).to(args.device)
    fit(model, [{"params": list(model.parameters()), "lr": lr}], tasks[0].train, args.epochs,
        args.device)
    recalibrate(model, tasks[0].train, args.device)
    return model


def new_head(model: nn.Module, head: str, num_classes: int) -> nn.Module:
    old = model.get_submodule(head)
    assert isinstance(old, nn.Linear), f"{head} is {type(old).__name__}"
    return nn.Linear(old.in_features, num_classes).to(old.weight.device)


def fresh(seq: Sequence, base: nn.Module | None, num_classes: int, device) -> nn.Module:
    if base is None:
        return seq.backbone(num_classes).to(device)
    model = copy.deepcopy(base)
    model.set_submodule(seq.head, new_head(model, seq.head, num_classes))
    return model


def isolated(tasks: list[Task], finals: dict, params: list, seconds: list, **extra) -> dict:
    """Results of a method that learns every task on its own copy (old tasks never change)."""
    test = [[finals[s.name][0] for s in tasks[:t + 1]] for t in range(len(tasks))]
    val = [[finals[s.name][1] for s in tasks[:t + 1]] for t in range(len(tasks))]
    return {"test": test, "val": val, "params_per_task": params, "task_s": seconds, **extra}


def _config(plan: PeerPlan, keep: list[str], steps: int):
    from peft import AdaLoraConfig, EvaConfig, IA3Config, LoraConfig

    r = plan.rank
    if plan.kind == "ia3":
        return IA3Config(target_modules=plan.targets, feedforward_modules=[],
                         modules_to_save=keep)
    if plan.kind == "adalora":
        return AdaLoraConfig(init_r=max(2, int(1.5 * r)), target_r=r, total_step=max(steps, 3),
                             tinit=steps // 10, tfinal=steps // 5, target_modules=plan.targets,
                             modules_to_save=keep)
    init: Any = {"lora": True, "dora": True, "pissa": "pissa_niter_4", "eva": "eva"}[plan.kind]
    # Sequence labels are not per-token language-modelling labels: EVA's SVD takes every
    # token the attention mask keeps.
    extra = {"eva_config": EvaConfig(rho=2.0, use_label_mask=False)} \
        if plan.kind == "eva" else {}
    return LoraConfig(r=r, lora_alpha=r, target_modules=plan.targets, modules_to_save=keep,
                      use_dora=plan.kind == "dora", init_lora_weights=init, **extra)


def run_peer(plan: PeerPlan, seq: Sequence, tasks: list[Task], lr: float, seed: int,
             args) -> dict:
    """One PEFT peer over the sequence at `plan`'s size: a fresh adapter (+ norms + head)
    per task on the pretrained backbone, `args.epochs` passes each."""
    from peft import get_peft_model

    device = args.device
    base = trained_first(seq, tasks, lr, seed, args) if seq.first_trains_backbone else None
    finals: dict[str, tuple[float, float]] = {}
    params, seconds = [], []
    for t, task in enumerate(tasks):
        start = time.perf_counter()
        if base is not None and t == 0:
            finals[task.name] = (accuracy(base, task.test, device),
                                 accuracy(base, task.val, device))
            seconds.append(0.0)
            continue
        torch.manual_seed(seed + t)
        model = fresh(seq, base, task.num_classes, device)
        keep = (norm_names(model) if plan.own_norms else []) + [seq.head]
        steps = args.epochs * len(task.train)
        peft_model = get_peft_model(model, _config(plan, keep, steps))
        if plan.kind == "eva":
            _eva_init(peft_model, task.train)
        frozen = [] if plan.own_norms else [
            m for m in peft_model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        after = (lambda s, m=peft_model: m.base_model.update_and_allocate(s)) \
            if plan.kind == "adalora" else None
        fit(peft_model, [{"params": trainable, "lr": lr}], task.train, args.epochs, device,
            after_step=after, frozen_norms=frozen)
        if plan.own_norms:
            recalibrate(peft_model, task.train, device)
        params.append(plan.stored)
        seconds.append(time.perf_counter() - start)
        finals[task.name] = (accuracy(peft_model, task.test, device),
                             accuracy(peft_model, task.val, device))
    return isolated(tasks, finals, params, seconds, rank=plan.rank, own_norms=plan.own_norms,
                    targets=len(plan.targets))


def _eva_init(peft_model: nn.Module, batches: list) -> None:
    """PEFT's EVA init, bounded to one forward pass over the task's training batches.

    PEFT cycles the data until every needed component's cosine to its previous estimate
    reaches `tau`; on a few batches cycled that never comes (seen: over 1,100 forwards on two
    MiniLM batches). After one pass the incremental SVD's current components are taken as
    they are, by marking them converged.
    """
    from peft import initialize_lora_eva_weights
    from peft.tuners.lora.eva import SVDHook

    calls = 0

    def forward(model: nn.Module, inputs: Any) -> Any:
        nonlocal calls
        calls += 1
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs[0])
        if calls >= len(batches):
            for m in model.modules():
                for hook in m._forward_hooks.values():
                    if isinstance(hook, SVDHook) and hasattr(hook.svd, "components_"):
                        hook.converged[:] = True
        return out

    initialize_lora_eva_weights(peft_model, list(batches), forward_fn=forward,
                                show_progress_bar=False)


def run_full_ft(seq: Sequence, tasks: list[Task], lr: float, seed: int, args) -> dict:
    """A full copy of the backbone fine-tuned per task: the ceiling."""
    device = args.device
    base = trained_first(seq, tasks, lr, seed, args) if seq.first_trains_backbone else None
    finals, seconds = {}, []
    for t, task in enumerate(tasks):
        start = time.perf_counter()
        if base is not None and t == 0:
            finals[task.name] = (accuracy(base, task.test, device),
                                 accuracy(base, task.val, device))
            seconds.append(0.0)
            continue
        torch.manual_seed(seed + t)
        model = fresh(seq, base, task.num_classes, device)
        fit(model, [{"params": list(model.parameters()), "lr": lr}], task.train, args.epochs,
            device)
        recalibrate(model, task.train, device)
        seconds.append(time.perf_counter() - start)
        finals[task.name] = (accuracy(model, task.test, device),
                             accuracy(model, task.val, device))
    probe = seq.backbone(2)
    full = backbone_params(probe, seq.head) + sum(
        b.numel() for b in probe.buffers() if torch.is_floating_point(b))
    return isolated(tasks, finals, [full] * len(tasks), seconds)


def run_seq_ft(seq: Sequence, tasks: list[Task], lr: float, seed: int, args) -> dict:
    """One backbone fine-tuned task after task, a head per task: the forgetting bound."""
    device = args.device
    torch.manual_seed(seed)
    model = seq.backbone(tasks[0].num_classes).to(device)
    heads: dict[str, nn.Module] = {}
    test, val, seconds = [], [], []
    for t, task in enumerate(tasks):
        start = time.perf_counter()
        if t > 0:
            model.set_submodule(seq.head, new_head(model, seq.head, task.num_classes))
        heads[task.name] = model.get_submodule(seq.head)
        fit(model, [{"params": list(model.parameters()), "lr": lr}], task.train, args.epochs,
            device)
        recalibrate(model, task.train, device)  # the shared norms: every task's
        seconds.append(time.perf_counter() - start)
        rows = []
        for seen in tasks[:t + 1]:
            model.set_submodule(seq.head, heads[seen.name])
            rows.append((accuracy(model, seen.test, device), accuracy(model, seen.val, device)))
        model.set_submodule(seq.head, heads[task.name])
        test.append([r[0] for r in rows])
        val.append([r[1] for r in rows])
    return {"test": test, "val": val, "task_s": seconds,
            "params_per_task": [backbone_params(seq.backbone(2), seq.head)]}
