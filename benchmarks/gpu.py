"""Study 6: HALRP on a GPU, where people train ViT-B/16: absolute times and ratios in one run.

On ViT-B/16 at 224 px, batch 64, bf16 autocast (the defaults; `--quick` shrinks everything):
- training step: HALRP's open task vs PEFT LoRA at rank 8 in every adapted layer (same
  optimiser, same batch), and peak memory of each (`max_memory_allocated`);
- inference: the merged task model vs the plain backbone, unmerged HALRP vs unmerged LoRA;
- rank estimation without the trial (default and reference ways) over one trial epoch;
- `torch.compile` of the adapted model: whether a training step compiles and runs, the
  compile time, and the compiled step against compiled LoRA's.

The demo recipe under `accelerate launch --mixed_precision bf16` is a separate command (the
README's GPU section). Writes benchmarks/results/gpu.json (gpu_quick.json with --quick).

    python benchmarks/gpu.py                         # on a CUDA machine (a few minutes)
    python benchmarks/gpu.py --quick --device cpu    # CI: every code path on a tiny ViT
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
import speed  # noqa: E402  (HALRP and LoRA set up the same way as the CPU study)

import halrp_adapt  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of `fn` after `warmup` calls, the device synchronised around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def step_fn(model: nn.Module, params: list, x, y, dtype, device, extra=None):
    return speed.train_step(model, params, x, y, extra, lambda: autocast(device, dtype))


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    fn()  # optimiser state and autograd buffers exist from here on
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--trial-batches", type=int, default=20)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write (default results/gpu.json, gpu_quick.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.img_size, args.batch, args.repeats, args.trial_batches = (
            "vit_tiny_patch16_224", 32, 4, 2, 2)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    warmup = 1 if args.quick else 3

    cl = speed.halrp_task(speed.make_model(args.model, args.img_size), args.rank).to(device)
    lora = speed.lora_model(speed.make_model(args.model, args.img_size), args.rank,
                            list(cl.adapter_layers())).to(device)
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    halrp_step = step_fn(cl, cl.trainable_parameters(), x, y, dtype, device,
                         cl.regularization_loss)
    lora_step = step_fn(lora, lora_params, x, y, dtype, device)
    out: dict = {"command": "python benchmarks/gpu.py " + " ".join(argv if argv is not None
                                                                     else sys.argv[1:]),
                 "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                 "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else "cpu"),
                 "torch": torch.__version__, "model": args.model, "image_size": args.img_size,
                 "batch": args.batch, "rank": args.rank, "dtype": args.dtype}
    step = {"halrp": timed(halrp_step, device, warmup, args.repeats),
            "lora": timed(lora_step, device, warmup, args.repeats)}
    out["train_step_s"] = step
    out["train_ratio"] = step["halrp"] / step["lora"]
    peaks = {"halrp": peak_bytes(halrp_step, device), "lora": peak_bytes(lora_step, device)}
    out["peak_bytes"] = peaks
    out["peak_ratio"] = (peaks["halrp"] / peaks["lora"]) if peaks["lora"] else None

    cl.eval()
    lora.eval()
    plain = speed.make_model(args.model, args.img_size).to(device).eval()
    merged = cl.merge("t").to(device).eval()
    with torch.no_grad():
        inference = {}
        for key, model in (("plain", plain), ("merged", merged), ("halrp", cl), ("lora", lora)):
            def forward(m=model):
                with autocast(device, dtype):
                    return m(x)
            inference[key] = timed(forward, device, warmup, args.repeats)
    out["inference_s"] = inference
    out["merged_vs_plain"] = inference["merged"] / inference["plain"]
    out["unmerged_halrp_vs_lora"] = inference["halrp"] / inference["lora"]
    del plain, merged

    data = [(torch.randn(args.batch, 3, args.img_size, args.img_size, device=device),
             torch.randint(0, 10, (args.batch,), device=device))
            for _ in range(args.trial_batches)]
    estimation = {}
    for way, options in (("reference", dict(fisher="pass", svd="full")),
                         ("default", dict(fisher="trial", svd="auto"))):
        torch.manual_seed(0)
        model = timm.create_model(args.model, pretrained=False, img_size=args.img_size,
                                  num_classes=10).to(device)
        handle = halrp_adapt.attach(model, budget=0.05, **options)
        handle.add_task("t", num_classes=10)
        handle.estimate_ranks(data, epochs=1)
        estimation[way] = handle._tasks["t"].estimate.seconds
        del handle, model
    trial = estimation["reference"]["trial"]
    out["estimation_s"] = estimation
    for way, sec in estimation.items():
        extra = max(0.0, sec["trial"] - trial)
        out[f"estimation_over_trial_{way}"] = (
            extra + sec["fisher"] + sec["decompose"] + sec["allocate"]) / trial

    if not args.no_compile:
        cl.train()
        lora.train()
        compiled = {}
        try:
            start = time.perf_counter()
            halrp_compiled = torch.compile(cl.model)
            c_halrp = step_fn(halrp_compiled, cl.trainable_parameters(), x, y, dtype, device,
                              cl.regularization_loss)
            c_halrp()
            synchronize(device)
            compiled["compile_s"] = time.perf_counter() - start
            c_lora = step_fn(torch.compile(lora), lora_params, x, y, dtype, device)
            compiled["train_step_s"] = {"halrp": timed(c_halrp, device, warmup, args.repeats),
                                        "lora": timed(c_lora, device, warmup, args.repeats)}
            compiled["train_ratio"] = (compiled["train_step_s"]["halrp"]
                                       / compiled["train_step_s"]["lora"])
            compiled["works"] = True
        except Exception as error:  # noqa: BLE001 - the figure is whether it works
            compiled = {"works": False, "error": f"{type(error).__name__}: {error}"[:500]}
        out["compile"] = compiled

    out["targets"] = {"train_step_at_most_1.10x": out["train_ratio"] <= 1.10,
                      "peak_memory_at_most_1.10x": (out["peak_ratio"] or 0) <= 1.10,
                      "merged_inference_about_1.00x": abs(out["merged_vs_plain"] - 1) <= 0.05,
                      "estimation_at_most_0.20x_trial":
                          out["estimation_over_trial_default"] <= 0.20}
    print(json.dumps({k: v for k, v in out.items() if k != "estimation_s"}, indent=1))
    RESULTS.mkdir(exist_ok=True)
    path = args.out or RESULTS / ("gpu_quick.json" if args.quick else "gpu.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
