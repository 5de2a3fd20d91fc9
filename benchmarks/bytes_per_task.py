"""Bytes on disk per task against the budget: safetensors bytes / backbone fp32 bytes.

Each task is made to use its whole budget (explained share 1.0, so the ranks fill the budget up
front, then factors of twice that size are pruned back to it): the worst case for file size.
The task's signature (for finding an input's task without its name, `task_signature.safetensors`,
default `signature_rank`) is a file of its own beside the weights, counted separately.
Prints a table, writes benchmarks/results/bytes_per_task.json.

    python benchmarks/bytes_per_task.py            # ResNet-18 and ViT-S/16, budgets .01/.05/.2
    python benchmarks/bytes_per_task.py --quick    # a small ViT, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import timm
import torch

import halrp_adapt
from halrp_adapt.files.storage import SIGNATURE_NAME, WEIGHTS_NAME

RESULTS = Path(__file__).resolve().parent / "results"


def task_bytes(model_name: str, kwargs: dict, budget: float, dtype: str) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, **kwargs)
    cl = halrp_adapt.attach(model, budget=budget, explained=1.0)
    size = kwargs.get("img_size", 64)
    data = [(torch.randn(4, 3, size, size), torch.randint(0, 10, (4,)))]
    cl.add_task("t", num_classes=10)
    cl.estimate_ranks(data, steps=1)
    for layer in cl.adapter_layers().values():  # twice the rank: pruning has to cut
        if layer.rank("t"):
            k = min(2 * layer.rank("t"), layer.out_features, layer.in_features)
            layer.set_low_rank("t", 0.02 * torch.randn(k, layer.in_features),
                               0.02 * torch.randn(layer.out_features, k))
    stats = cl.end_task(calibration_data=data)  # also makes the task signature
    with tempfile.TemporaryDirectory() as tmp:
        cl.save_pretrained(tmp, dtype=dtype)
        nbytes = (Path(tmp) / "t" / WEIGHTS_NAME).stat().st_size
        signature_bytes = (Path(tmp) / "t" / SIGNATURE_NAME).stat().st_size
    backbone_bytes = 4 * cl.backbone_params
    return {"model": model_name, "budget": budget, "dtype": dtype,
            "backbone_params": cl.backbone_params, "file_bytes": nbytes,
            "signature_bytes": signature_bytes,
            "signature_over_backbone": signature_bytes / backbone_bytes,
            "bytes_over_backbone": nbytes / backbone_bytes, "growth": stats.growth,
            "head_params": stats.head_params,
            "within_budget_plus_64KiB": nbytes <= budget * backbone_bytes + 65536}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small ViT, for CI")
    args = parser.parse_args(argv)
    if args.quick:
        models = [("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2})]
        budgets, dtypes = [0.05], ["float32"]
    else:
        models = [("resnet18", {}), ("vit_small_patch16_224", {"img_size": 64})]
        budgets, dtypes = [0.01, 0.05, 0.2], ["float32", "bfloat16"]
    rows = [task_bytes(m, kw, b, d) for m, kw in models for b in budgets for d in dtypes]
    print(f"{'model':<24}{'budget':>7}{'dtype':>10}{'file bytes':>13}{'/ backbone':>12}"
          f"{'growth':>9}  ok")
    for r in rows:
        print(f"{r['model']:<24}{r['budget']:>7}{r['dtype']:>10}{r['file_bytes']:>13,}"
              f"{r['bytes_over_backbone']:>12.4f}{r['growth']:>9.4f}  "
              f"{'yes' if r['within_budget_plus_64KiB'] else 'NO'}")
    RESULTS.mkdir(exist_ok=True)
    out = {"command": "python benchmarks/bytes_per_task.py" + (" --quick" if args.quick else ""),
           "date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
           "torch": torch.__version__, "rows": rows}
    name = "bytes_per_task_quick.json" if args.quick else "bytes_per_task.json"
    (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
