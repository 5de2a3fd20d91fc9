"""Mixed-task inference: `handle(x, task_ids=ids)` against looping over the tasks.

A batch whose samples belong to T tasks, in eval mode, four ways, timed side by side with one
single-task forward of the whole batch (target: one pass at most 1.5x that):
- one pass: `forward_tasks(strategy="one-pass")` (the eval-mode default), the whole batch
  through the model once, each row with its own task's scales, bias, factors, norms and head;
- grouped: `forward_tasks(strategy="grouped")`, one forward per task present, on its samples;
- loop over tasks: the whole batch through each task, keeping that task's rows (T full forwards);
- loop over samples: each sample alone through its task.
All three give the same outputs (checked). Medians of repeats after warm-up; writes
benchmarks/results/mixed_batches.json.

    python benchmarks/mixed_batches.py            # ViT-S/16 at 64 px, 8 tasks, batch 64
    python benchmarks/mixed_batches.py --quick    # a tiny ViT (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import timm
import torch

import halrp_adapt

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))
from speed import median_seconds  # noqa: E402  (the speed study's timing, one warm-up)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.manual_seed(0)
    if args.quick:
        name, kwargs, size, args.tasks, args.batch, args.repeats = (
            "vit_tiny_patch16_224", dict(img_size=16, patch_size=8, depth=2), 16, 3, 8, 2)
    else:
        name, kwargs, size = "vit_small_patch16_224", dict(img_size=64), 64
    cl = halrp_adapt.attach(timm.create_model(name, pretrained=False, num_classes=10, **kwargs),
                            budget=0.05)
    for t in range(args.tasks):
        cl.add_task(f"task{t}", num_classes=10)
        cl.estimate_ranks([(torch.randn(4, 3, size, size), torch.randint(0, 10, (4,)))],
                          steps=1)
        cl.end_task()
    cl.eval()
    x = torch.randn(args.batch, 3, size, size)
    ids = torch.randint(0, args.tasks, (args.batch,), generator=torch.Generator().manual_seed(1))

    def one_pass():
        return cl(x, task_ids=ids, strategy="one-pass")

    def grouped():
        return cl(x, task_ids=ids, strategy="grouped")

    def single_task():
        with cl.task(cl.tasks[0]):
            return cl(x)

    def loop_over_tasks():
        out = torch.empty(args.batch, 10)
        for t, task in enumerate(cl.tasks):
            with cl.task(task):
                whole = cl(x)
            out[ids == t] = whole[ids == t]
        return out

    def loop_over_samples():
        rows = []
        for i in range(args.batch):
            with cl.task(cl.tasks[int(ids[i])]):
                rows.append(cl(x[i:i + 1]))
        return torch.cat(rows)

    with torch.no_grad():
        reference = grouped()
        one = one_pass()
        gap = float((one - reference).abs().max())
        torch.testing.assert_close(one, reference, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loop_over_tasks(), reference, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(loop_over_samples(), reference, atol=1e-4, rtol=1e-4)
        seconds = {f.__name__: median_seconds(f, 1, args.repeats)
                   for f in (single_task, one_pass, grouped, loop_over_tasks, loop_over_samples)}
    out = {"command": "python benchmarks/mixed_batches.py" + (" --quick" if args.quick else ""),
           "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.platform()}, {torch.get_num_threads()} threads",
           "model": name, "image_size": size, "tasks": args.tasks, "batch": args.batch,
           "seconds": seconds, "one_pass_max_abs_difference": gap,
           "one_pass_over_single_task": seconds["one_pass"] / seconds["single_task"],
           "grouped_over_single_task": seconds["grouped"] / seconds["single_task"],
           "target_one_pass_over_single_task": 1.5,
           "loop_over_tasks_over_grouped": seconds["loop_over_tasks"] / seconds["grouped"],
           "loop_over_samples_over_grouped": seconds["loop_over_samples"] / seconds["grouped"]}
    print(f"{name} {size} px, {args.tasks} tasks, batch {args.batch}: one pass "
          f"{out['one_pass_over_single_task']:.2f}x one task's forward, grouped "
          f"{out['grouped_over_single_task']:.2f}x; loop over tasks "
          f"{out['loop_over_tasks_over_grouped']:.2f}x; loop over samples "
          f"{out['loop_over_samples_over_grouped']:.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"mixed_batches{'_quick' if args.quick else ''}.json").write_text(
        json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
