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


def train_step(model: nn.Module, params, x, y, extra=None):
    optimizer = torch.optim.Adam(params, lr=1e-4)

    def step() -> None:
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
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
    halrp_train = median_seconds(train_step(cl, cl.trainable_parameters(), x, y,
                                            cl.regularization_loss), warmup, repeats)
    lora_train = median_seconds(train_step(lora, [p for p in lora.parameters()
                                                  if p.requires_grad], x, y), warmup, repeats)
    cl.eval()
    lora.eval()
    plain = make_model(name, size).eval()
    merged = cl.merge("t").eval()
    with torch.no_grad():
        timings = {key: median_seconds(lambda m=m: m(x), warmup, repeats) for key, m in
                   (("plain", plain), ("merged", merged), ("halrp", cl), ("lora", lora))}
    return {"model": name, "image_size": size, "batch": batch, "rank": rank,
            "train_step_s": {"halrp": halrp_train, "lora": lora_train},
            "train_ratio": halrp_train / lora_train,
            "inference_s": timings,
            "merged_vs_plain": timings["merged"] / timings["plain"],
            "unmerged_halrp_vs_lora": timings["halrp"] / timings["lora"]}


def study_estimation(name: str, size: int, batch: int, batches: int) -> dict:
    """The Fisher runs on a validation split of 20% of the trial's size, as in the reference's
    protocol (valid_size 0.2, importance computed on the validation loader)."""
    torch.manual_seed(0)
    data = [(torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)))
            for _ in range(batches)]
    validation = data[:max(1, batches // 5)]
    out = {"model": name, "image_size": size, "trial_batches": batches}
    for svd in ("auto", "randomized"):
        torch.manual_seed(0)
        cl = halrp_adapt.attach(timm.create_model(name, pretrained=False, img_size=size,
                                                  num_classes=10), budget=0.05, svd=svd)
        cl.add_task("t", num_classes=10)
        cl.estimate_ranks(data, fisher_data=validation, epochs=1)
        seconds = cl._tasks["t"].estimate.seconds
        without_trial = seconds["fisher"] + seconds["decompose"] + seconds["allocate"]
        key = "" if svd == "auto" else "_randomized_svd"
        out.update({"backbone_params": cl.backbone_params, f"seconds{key}": seconds,
                    f"estimation_over_trial{key}": without_trial / seconds["trial"]})
    return out


def study_svd(side: int, rank_cap: int, repeats: int) -> dict:
    torch.manual_seed(0)
    d = torch.randn(side, 64) @ torch.randn(64, side) + 0.01 * torch.randn(side, side)
    full = median_seconds(lambda: decompose(d, "full"), 0, repeats)
    fast = median_seconds(lambda: decompose(d, "randomized", rank_cap=rank_cap), 0, repeats)
    exact, approx = decompose(d, "full"), decompose(d, "randomized", rank_cap=rank_cap)
    error = float((approx.S[:rank_cap] - exact.S[:rank_cap]).abs().max() / exact.S[0])
    return {"side": side, "rank_cap": rank_cap, "full_s": full, "randomized_s": fast,
            "speedup": full / fast, "max_relative_sigma_error": error}


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
    estimation = [("vit_tiny_patch16_224", 32, 4, 2)] if q else \
        [(f"vit_{s}_patch16_224", 64, 16, 40) for s in ("tiny", "small", "base")]
    out["estimation"] = [study_estimation(*e) for e in estimation]
    out["svd"] = study_svd(256 if q else 4096, 100, 1 if q else 3)
    out["peak_memory"] = [study_peak_memory(configs[-1][0], *configs[-1][1:], args.threads)]
    targets = {
        "train_step_at_most_1.15x": all(s["train_ratio"] <= 1.15 for s in out["steps"]),
        "merged_inference_about_1.00x": all(abs(s["merged_vs_plain"] - 1) <= 0.05
                                            for s in out["steps"]),
        "unmerged_inference_at_most_1.10x": all(s["unmerged_halrp_vs_lora"] <= 1.10
                                                for s in out["steps"]),
        "estimation_at_most_0.25x_trial": all(e["estimation_over_trial"] <= 0.25
                                              for e in out["estimation"]),
        "peak_rss_at_most_1.10x": all(m["ratio"] <= 1.10 for m in out["peak_memory"])}
    out["targets"] = targets
    for s in out["steps"]:
        print(f"{s['model']:<24} train HALRP/LoRA {s['train_ratio']:.3f}   merged/plain "
              f"{s['merged_vs_plain']:.3f}   unmerged HALRP/LoRA {s['unmerged_halrp_vs_lora']:.3f}"
              f"   (HALRP step {s['train_step_s']['halrp'] * 1e3:.0f} ms)")
    for e in out["estimation"]:
        sec = e["seconds"]
        print(f"{e['model']:<24} estimation/trial {e['estimation_over_trial']:.3f} (randomized "
              f"SVD {e['estimation_over_trial_randomized_svd']:.3f})   fisher "
              f"{sec['fisher']:.2f}s decompose {sec['decompose']:.2f}s (randomized "
              f"{e['seconds_randomized_svd']['decompose']:.2f}s) trial {sec['trial']:.2f}s")
    svd = out["svd"]
    print(f"{svd['side']}x{svd['side']} SVD: full {svd['full_s']:.2f}s, randomized "
          f"{svd['randomized_s']:.2f}s ({svd['speedup']:.1f}x), max sigma error "
          f"{svd['max_relative_sigma_error']:.1e}")
    for m in out["peak_memory"]:
        print(f"{m['model']:<24} peak RSS HALRP/LoRA {m['ratio']:.3f} ({m['peak_rss_mb']})")
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    RESULTS.mkdir(exist_ok=True)
    name = "speed_quick" if q else "speed"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
