"""Study 4: speed and memory of HALRP next to PEFT LoRA, measured side by side in one run.

- training step (forward, backward, Adam step) of the active task vs LoRA at the same
  per-layer ranks, on a timm ViT-S/16 and EfficientNet-Lite0 (target <= 1.15x);
- inference: the merged task model vs the plain backbone (target 1.00x) and unmerged HALRP vs
  unmerged LoRA (target <= 1.10x);
- rank estimation without the trial (Fisher pass on a 20% validation split, scale fits, SVDs,
  allocation) over one trial epoch of 40 batches (target <= 0.25x), its growth over
  ViT-Ti / S / B, and one 4096 x 4096 layer's SVD, full vs randomized;
- peak memory (RSS) of training steps vs LoRA, each in its own process, the peak reset after
  a warm-up step so that it covers training, not model loading (target <= 1.10x).

Times are medians over repeats after warm-up, threads pinned; ratios are what to compare (the
machine is shared and slow). Writes benchmarks/results/speed.json.

    python benchmarks/speed.py            # full (several minutes on 2 CPU cores)
    python benchmarks/speed.py --quick    # CI: tiny sizes, one repeat
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn

import halrp_adapt
from halrp_adapt.method.decompose import decompose

RESULTS = Path(__file__).resolve().parent / "results"


def median_seconds(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_medians(fns: dict, warmup: int, repeats: int, rounds: int = 4) -> dict:
    """Median seconds of each function, timed in alternating blocks (A B B A ...) of `repeats`
    calls, each block after `warmup` untimed calls: slow drifts of a shared machine then
    weigh on every function alike."""
    times: dict = {key: [] for key in fns}
    keys = list(fns)
    for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
            for _ in range(warmup):
                fns[key]()
            for _ in range(repeats):
                start = time.perf_counter()
                fns[key]()
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def make_model(name: str, size: int) -> nn.Module:
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        from halrp_adapt.data.zoo import efficientnet_lite0_imagenet

        model = efficientnet_lite0_imagenet()
        model.reset_classifier(10)
        return model
    return timm.create_model(name, pretrained=False, img_size=size, num_classes=10)


def halrp_task(model: nn.Module, rank: int) -> halrp_adapt.HalrpModel:
    """An open task with rank `rank` in every layer that has a low-rank path."""
    cl = halrp_adapt.attach(model, budget=1.0)
    cl.add_task("t", num_classes=10)
    for layer in cl.adapter_layers().values():
        if layer.supports_low_rank:
            k = min(rank, layer.out_features, layer.in_features)
            layer.set_low_rank("t", 0.01 * torch.randn(k, layer.in_features),
                               0.01 * torch.randn(layer.out_features, k))
    cl._make_trainable("t")
    return cl


def lora_model(model: nn.Module, rank: int, targets: list[str]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    modules = dict(model.named_modules())
    targets = [t for t in targets if getattr(modules[t], "groups", 1) == 1]
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                                            modules_to_save=["classifier" if hasattr(
                                                model, "classifier") else "head"]))


def train_step(model: nn.Module, params, x, y, extra=None, context=contextlib.nullcontext):
    """One Adam step of `model` on (x, y), plus `extra()` (the regularisation) in the loss,
    the forward inside `context()` (an autocast for mixed precision)."""
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step() -> None:
        with context():
            loss = nn.functional.cross_entropy(model(x), y)
            if extra is not None:
                loss = loss + extra()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def study_steps(name: str, size: int, batch: int, rank: int, warmup: int, repeats: int) -> dict:
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    cl = halrp_task(make_model(name, size), rank)
    targets = list(cl.adapter_layers())
    lora = lora_model(make_model(name, size), rank, targets)
    steps = paired_medians({
        "halrp": train_step(cl, cl.trainable_parameters(), x, y, cl.regularization_loss),
        "lora": train_step(lora, [p for p in lora.parameters() if p.requires_grad], x, y)},
        warmup, max(1, repeats // 2), rounds=1 if repeats == 1 else 4)
    halrp_train, lora_train = steps["halrp"], steps["lora"]
    cl.eval()
    lora.eval()
    plain = make_model(name, size).eval()
    merged = cl.merge("t").eval()
    with torch.no_grad():
        timings = paired_medians({key: (lambda m=m: m(x)) for key, m in
                                  (("plain", plain), ("merged", merged), ("halrp", cl),
                                   ("lora", lora))},
                                 warmup, max(1, repeats // 2), rounds=1 if repeats == 1 else 4)
    return {"model": name, "image_size": size, "batch": batch, "rank": rank,
            "train_step_s": {"halrp": halrp_train, "lora": lora_train},
            "train_ratio": halrp_train / lora_train,
            "inference_s": timings,
            "merged_vs_plain": timings["merged"] / timings["plain"],
            "unmerged_halrp_vs_lora": timings["halrp"] / timings["lora"]}


def study_step_breakdown(name: str, size: int, batch: int, rank: int, warmup: int,
                         repeats: int) -> dict:
    """Where HALRP's extra step time goes: the same step with fewer of the task's kinds of
    parameter trainable (scales still applied, just not trained), against LoRA's step."""
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    cl = halrp_task(make_model(name, size), rank)
    lora = lora_model(make_model(name, size), rank, list(cl.adapter_layers()))
    names = {id(p): n for n, p in cl.named_parameters()}
    everything = cl.trainable_parameters()
    frozen_by = {"all trained": [], "scales frozen": ["halrp_r", "halrp_s"],
                 "+ biases frozen": ["halrp_r", "halrp_s", "halrp_bias"],
                 "+ norms frozen (factors and head only, as LoRA)":
                     ["halrp_r", "halrp_s", "halrp_bias", "halrp_norm"]}
    fns = {}
    for label, frozen in frozen_by.items():
        params = [p for p in everything if not any(f in names[id(p)] for f in frozen)]

        def step(params=params, inner=train_step(cl, params, x, y, cl.regularization_loss)):
            keep = {id(p) for p in params}
            for p in everything:
                p.requires_grad_(id(p) in keep)
            inner()
        fns[label] = step
    fns["lora"] = train_step(lora, [p for p in lora.parameters() if p.requires_grad], x, y)
    seconds = paired_medians(fns, warmup, max(1, repeats // 2), rounds=1 if repeats == 1 else 4)
    return {"model": name, "seconds": seconds,
            "over_lora": {k: v / seconds["lora"] for k, v in seconds.items() if k != "lora"}}


def study_estimation(name: str, size: int, batch: int, batches: int) -> dict:
    """Rank estimation three ways on the same data and weights: the reference's (the full
    trial, a separate Fisher pass on a validation split of 20% of the trial's size, full SVDs),
    the full trial with the Fisher read off its last 20% of steps and SVDs truncated to the
    rank cap where that cannot change the choice (the default up to issue 23), and the default
    low-rank trial (on the model itself, scales and rank-32 factors, the Fisher from each
    layer's dense gradient over its last 20% of steps, exact SVDs of the factors' product).
    The cost of each is everything but the trial, plus any time its trial takes beyond the
    reference's, over the reference's trial."""
    torch.manual_seed(0)
    data = [(torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)))
            for _ in range(batches)]
    validation = data[:max(1, batches // 5)]
    out: dict = {"model": name, "image_size": size, "trial_batches": batches}
    ranks = {}
    ways = (("reference", dict(trial="full", fisher="pass", svd="full"), validation),
            ("full", dict(trial="full", fisher="trial", svd="auto"), None),
            ("default", {}, None))
    for way, options, fisher_data in ways:
        torch.manual_seed(0)
        cl = halrp_adapt.attach(timm.create_model(name, pretrained=False, img_size=size,
                                                  num_classes=10), budget=0.05, **options)
        cl.add_task("t", num_classes=10)
        torch.manual_seed(1)
        cl.estimate_ranks(data, fisher_data=fisher_data, epochs=1)
        estimate = cl._tasks["t"].estimate
        ranks[way] = estimate.explained_ranks
        out.update({"backbone_params": cl.backbone_params, f"seconds_{way}": estimate.seconds})
    ref = out["seconds_reference"]
    for way, _, _ in ways:
        sec = out[f"seconds_{way}"]
        extra = max(0.0, sec["trial"] - ref["trial"])  # time the trial spent beyond the reference's
        out[f"estimation_over_trial_{way}"] = (
            extra + sec["fisher"] + sec["decompose"] + sec["allocate"]) / ref["trial"]
        out[f"whole_estimation_over_trial_{way}"] = sum(sec.values()) / ref["trial"]
    out["explained_ranks"] = ranks
    for way in ("full", "default"):
        same = [ranks["reference"][n] == ranks[way][n] for n in ranks["reference"]]
        out[f"rank_agreement_{way}"] = sum(same) / len(same)
    out["rank_agreement"] = out["rank_agreement_full"]
    out["rank_total"] = {way: sum(r.values()) for way, r in ranks.items()}
    return out


def study_svd(shapes: list[tuple[int, int]], rank_cap: int, repeats: int) -> list[dict]:
    """One residual-like matrix per shape (a decaying part plus a flat tail), full SVD against
    the truncated randomized one that estimation uses for wide layers."""
    rows = []
    for m, n in shapes:
        torch.manual_seed(0)
        d = 0.01 * torch.randn(m, 64) @ torch.randn(64, n) + 0.003 * torch.randn(m, n)
        full = median_seconds(lambda: decompose(d, "full"), 0, repeats)
        fast = median_seconds(lambda: decompose(d, "randomized", rank_cap=rank_cap), 0, repeats)
        exact, approx = decompose(d, "full"), decompose(d, "randomized", rank_cap=rank_cap)
        k = min(rank_cap, len(approx.S))
        error = float((approx.S[:k] - exact.S[:k]).abs().max() / exact.S[0])
        rows.append({"shape": [m, n], "rank_cap": rank_cap, "full_s": full,
                     "randomized_s": fast, "speedup": full / fast,
                     "max_relative_sigma_error": error})
    return rows


PEAK_SCRIPT = """
import sys, torch
sys.path.insert(0, {bench!r})
import speed
torch.set_num_threads({threads})
name, size, batch, rank, kind = {args!r}
x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
if kind == "halrp":
    model = speed.halrp_task(speed.make_model(name, size), rank)
    step = speed.train_step(model, model.trainable_parameters(), x, y, model.regularization_loss)
else:
    targets = list(speed.halrp_task(speed.make_model(name, size), rank).adapter_layers())
    model = speed.lora_model(speed.make_model(name, size), rank, targets)
    step = speed.train_step(model, [p for p in model.parameters() if p.requires_grad], x, y)
step()  # warm-up: optimiser state and autograd buffers exist from here on
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
for _ in range(3):
    step()
status = open("/proc/self/status").read()
print(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM")))
"""


def study_peak_memory(name: str, size: int, batch: int, rank: int, threads: int) -> dict:
    peaks = {}
    for kind in ("halrp", "lora"):
        code = PEAK_SCRIPT.format(bench=str(Path(__file__).parent), threads=threads,
                                  args=(name, size, batch, rank, kind))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True)
        peaks[kind] = int(done.stdout.strip().splitlines()[-1]) / 1024  # MB
    return {"model": name, "peak_rss_mb": peaks, "ratio": peaks["halrp"] / peaks["lora"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    q = args.quick
    warmup, repeats = (1, 1) if q else (2, 7)
    out: dict = {"command": "python benchmarks/speed.py" + (" --quick" if q else ""),
                 "date": time.strftime("%Y-%m-%d"), "threads": args.threads,
                 "machine": f"{platform.platform()}, {os.cpu_count()} CPUs"}
    configs = [("vit_tiny_patch16_224", 32, 4, 4)] if q else \
        [("vit_small_patch16_224", 96, 16, 8), ("efficientnet_lite0", 32, 64, 8)]
    out["steps"] = [study_steps(*c, warmup, repeats) for c in configs]
    out["step_breakdown"] = [study_step_breakdown(*c, warmup, repeats) for c in configs]
    estimation = [("vit_tiny_patch16_224", 32, 4, 2)] if q else \
        [(f"vit_{s}_patch16_224", 64, 16, 40) for s in ("tiny", "small", "base")]
    out["estimation"] = [study_estimation(*e) for e in estimation]
    shapes = [(256, 256)] if q else [(384, 1152), (768, 3072), (1024, 4096), (2048, 2048),
                                      (4096, 4096)]
    out["svd"] = study_svd(shapes, 100 if not q else 20, 1 if q else 3)
    # The peak is Linux's VmHWM, reset after the warm-up through /proc: no such reset elsewhere.
    if sys.platform.startswith("linux"):
        out["peak_memory"] = [study_peak_memory(configs[-1][0], *configs[-1][1:], args.threads)]
    else:
        out["peak_memory"] = []
        print(f"peak memory: not measured on {sys.platform} (reads and resets Linux's VmHWM)")
    targets = {
        "train_step_at_most_1.10x": all(s["train_ratio"] <= 1.10 for s in out["steps"]),
        "merged_inference_about_1.00x": all(abs(s["merged_vs_plain"] - 1) <= 0.05
                                            for s in out["steps"]),
        "unmerged_inference_at_most_1.10x": all(s["unmerged_halrp_vs_lora"] <= 1.10
                                                for s in out["steps"]),
        "estimation_at_most_0.20x_trial_vit_s_b": all(
            e["estimation_over_trial_default"] <= 0.20 for e in out["estimation"]
            if "tiny" not in e["model"]),
        "peak_rss_at_most_1.10x": all(m["ratio"] <= 1.10 for m in out["peak_memory"])
        if out["peak_memory"] else None}
    out["targets"] = targets
    for s in out["steps"]:
        print(f"{s['model']:<24} train HALRP/LoRA {s['train_ratio']:.3f}   merged/plain "
              f"{s['merged_vs_plain']:.3f}   unmerged HALRP/LoRA {s['unmerged_halrp_vs_lora']:.3f}"
              f"   (HALRP step {s['train_step_s']['halrp'] * 1e3:.0f} ms)")
    for b in out["step_breakdown"]:
        print(f"{b['model']:<24} step / LoRA: " + ", ".join(
            f"{k} {v:.3f}" for k, v in b["over_lora"].items()))
    for e in out["estimation"]:
        print(f"{e['model']:<24} estimation/trial: reference "
              f"{e['estimation_over_trial_reference']:.3f}, full "
              f"{e['estimation_over_trial_full']:.3f}, default (low-rank) "
              f"{e['estimation_over_trial_default']:.3f}; whole estimation/trial "
              f"{e['whole_estimation_over_trial_full']:.2f} (full) vs "
              f"{e['whole_estimation_over_trial_default']:.2f} (low-rank); explained ranks as "
              f"the reference's in {100 * e['rank_agreement_full']:.0f}% (full), "
              f"{100 * e['rank_agreement_default']:.0f}% (low-rank) of layers "
              f"(totals {e['rank_total']})")
    for row in out["svd"]:
        print(f"{row['shape']} SVD: full {row['full_s']:.3f}s, randomized "
              f"{row['randomized_s']:.3f}s ({row['speedup']:.1f}x), max sigma error "
              f"{row['max_relative_sigma_error']:.1e}")
    for m in out["peak_memory"]:
        print(f"{m['model']:<24} peak RSS HALRP/LoRA {m['ratio']:.3f} ({m['peak_rss_mb']})")
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    RESULTS.mkdir(exist_ok=True)
    name = "speed_quick" if q else "speed"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
