"""Soak: many tasks on one backbone. Per task: time to learn it, process memory (RSS) and tensor
bytes; at the end: every old task bit-identical, total growth, shelf load times, and which files
loading one task reads. Prints the slopes of time and memory per task (least squares over the
tasks after a warm-up of five) and writes benchmarks/results/soak.json.

    python benchmarks/soak.py             # 50 tasks on a small CNN and a small ViT
    python benchmarks/soak.py --quick     # 6 tasks each (CI)
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import psutil  # accelerate requires it: RSS on every OS
import timm
import torch
from torch import nn

import halrp_adapt
from halrp_adapt.files import storage
from halrp_adapt.files.serialization import task_state_dict

RESULTS = Path(__file__).resolve().parent / "results"
WARM_UP = 5


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def small_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16,
                             patch_size=8, depth=2, num_classes=10)


MODELS: dict[str, Callable[[], nn.Module]] = {"small_cnn": small_cnn, "small_vit": small_vit}


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _digest(handle: halrp_adapt.HalrpModel, task: str) -> str:
    digest = hashlib.sha256()
    for key, tensor in sorted(task_state_dict(handle, task).items()):
        digest.update(key.encode() + tensor.detach().reshape(-1).contiguous().view(torch.uint8)
                      .numpy().tobytes())
    return digest.hexdigest()


def _output(handle: halrp_adapt.HalrpModel, task: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), handle.task(task):
        return handle(x)


def _slope(values: list[float]) -> float:
    """Least-squares slope of `values` against their index."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


class FileReads:
    """Records the files opened under `root`: Python-level opens (audit hook) and the
    safetensors reader's (which opens files from Rust)."""

    def __init__(self, root: Path) -> None:
        self.root, self.paths, self.on = str(root.resolve()), set(), False
        sys.addaudithook(self._hook)
        self._safe_open = storage.safe_open

    def _hook(self, event: str, args: tuple) -> None:
        if self.on and event == "open" and isinstance(args[0], (str, Path)):
            self._note(args[0])

    def _note(self, path: Any) -> None:
        resolved = str(Path(path).resolve())
        if resolved.startswith(self.root):
            self.paths.add(str(Path(resolved).relative_to(self.root)))

    def __enter__(self) -> "FileReads":
        self.paths, self.on = set(), True

        def recording_safe_open(path, *args, **kwargs):
            self._note(path)
            return self._safe_open(path, *args, **kwargs)
        storage.safe_open = recording_safe_open
        return self

    def __exit__(self, *exc: object) -> None:
        self.on = False
        storage.safe_open = self._safe_open


def soak(model_name: str, tasks: int, budget: float = 0.1, steps: int = 2,
         batch: int = 8) -> dict[str, Any]:
    torch.manual_seed(0)
    make = MODELS[model_name]
    size = 16
    cl = halrp_adapt.attach(make(), budget=budget)
    probe = torch.randn(4, 3, size, size)
    seconds, rss, task_bytes, outputs, digests = [], [], [], {}, {}
    for t in range(tasks):
        g = torch.Generator().manual_seed(t)
        data = [(torch.randn(batch, 3, size, size, generator=g),
                 torch.randint(0, 2, (batch,), generator=g)) for _ in range(steps)]
        start = time.perf_counter()
        name = f"task{t:03d}"
        cl.add_task(name, num_classes=2)
        cl.estimate_ranks(data, steps=1)
        optimizer = torch.optim.Adam(cl.trainable_parameters(), lr=1e-3)
        cl.train()
        for x, y in data:
            loss = nn.functional.cross_entropy(cl(x), y) + cl.regularization_loss()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        cl.end_task()
        seconds.append(time.perf_counter() - start)
        cl.eval()
        outputs[name] = _output(cl, name, probe)
        digests[name] = _digest(cl, name)
        task_bytes.append(sum(v.numel() * v.element_size()
                              for v in task_state_dict(cl, name).values()))
        gc.collect()
        rss.append(_rss_mb())
    still_equal = all(torch.equal(_output(cl, n, probe), outputs[n]) for n in outputs)
    untouched = all(_digest(cl, n) == d for n, d in digests.items())
    report = cl.report()
    with tempfile.TemporaryDirectory() as tmp:
        shelf = Path(tmp) / "shelf"
        start = time.perf_counter()
        cl.save_pretrained(shelf)
        save_s = time.perf_counter() - start
        torch.manual_seed(0)
        fresh = make()
        start = time.perf_counter()
        loaded = halrp_adapt.load(fresh, shelf)
        load_all_s = time.perf_counter() - start
        loaded.eval()
        loaded_equal = all(torch.equal(_output(loaded, n, probe), outputs[n]) for n in outputs)
        middle = f"task{tasks // 2:03d}"
        torch.manual_seed(0)
        reads = FileReads(shelf)
        with reads:
            start = time.perf_counter()
            halrp_adapt.load(make(), shelf, tasks=[middle])
            load_one_s = time.perf_counter() - start
    steady = slice(min(WARM_UP, tasks - 2), None)
    return {
        "model": model_name, "tasks": tasks, "budget": budget,
        "backbone_params": cl.backbone_params,
        "seconds_per_task": seconds, "rss_mb_after_task": rss, "task_bytes": task_bytes,
        "time_slope_s_per_task": _slope(seconds[steady]),
        "time_mean_s": sum(seconds[steady]) / len(seconds[steady]),
        "rss_slope_mb_per_task": _slope(rss[steady]),
        "total_growth": report.total_growth, "growth_limit": tasks * budget,
        "old_tasks_bit_identical": bool(still_equal and untouched),
        "save_all_s": save_s, "load_all_s": load_all_s, "loaded_outputs_equal": loaded_equal,
        "load_one_s": load_one_s, "files_read_loading_one": sorted(reads.paths),
        "loaded_task": middle,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 tasks per model (CI)")
    parser.add_argument("--tasks", type=int, default=50)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    tasks = 6 if args.quick else args.tasks
    runs = [soak(name, tasks) for name in MODELS]
    print(f"{'model':<10} {'tasks':>5} {'s/task':>8} {'slope s/task':>13} "
          f"{'RSS slope MB/task':>18} {'growth':>7} {'<= limit':>9} {'identical':>9} "
          f"{'load all s':>10} {'load one s':>10}")
    for r in runs:
        print(f"{r['model']:<10} {r['tasks']:>5} {r['time_mean_s']:>8.3f} "
              f"{r['time_slope_s_per_task']:>+13.5f} {r['rss_slope_mb_per_task']:>+18.3f} "
              f"{r['total_growth']:>7.3f} {str(r['total_growth'] <= r['growth_limit']):>9} "
              f"{str(r['old_tasks_bit_identical']):>9} {r['load_all_s']:>10.2f} "
              f"{r['load_one_s']:>10.3f}")
        print(f"  loading {r['loaded_task']} alone read: {r['files_read_loading_one']}")
    out = {"command": "python benchmarks/soak.py" + (" --quick" if args.quick else ""),
           "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.platform()}, 1 thread",
           "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"soak{'_quick' if args.quick else ''}.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
