"""Study 1: the paper's protocol on Permuted Fashion-MNIST (LeNet, 10 tasks) against the anchor.

The anchor is the reference code (lijiaqi/HALRP @ f639da9) run on this machine with the same
data and 4 epochs per task; its figures are in benchmarks/anchors.json (from the project's
shared/notes/ANCHORS.md). This script runs `recipes/pmnist_lenet.py` with the same protocol in a
child process, measures its wall time and peak memory (RSS), and prints our figures beside the
anchor's with ratios. Writes benchmarks/results/pmnist_lenet.json and .png.

    python benchmarks/pmnist_lenet.py            # full: 10 tasks x 4 epochs, full Fashion-MNIST
    python benchmarks/pmnist_lenet.py --quick    # 2 tasks, 1 epoch, 5% of the data (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"


def reference_style_growth(result: dict) -> list[float]:
    """Cumulative growth counted as the reference counts it, after tasks 1..T-1: dense scales,
    nonzero factors, biases, norm affine parameters (BatchNorm: half of what we store, the
    other half being running statistics) and heads, over the base model with its head."""
    names = result["tasks"]
    head = result["params"][names[0]]["head_params"]
    base = result["backbone_params"] + head
    total, out = 0, []
    for name in names[1:]:
        p = result["params"][name]
        total += (p["scale_params"] + p["low_rank_params"] + p["bias_params"]
                  + p["norm_params"] // 2 + p["head_params"])
        out.append(total / base)
    return out


def targets_of(ours: dict, anchor: dict) -> dict[str, bool]:
    """Issue 12's targets for the paper protocol: a point more ACC than the reference, at no
    more than half its growth after the same tasks and 0.3x its wall time."""
    growth = ours["growth_after_tasks"]
    reference_growth = anchor["growth_after_tasks"][len(growth) - 1] if growth else 0.0
    return {"acc_at_least_reference_plus_1": ours["acc"] >= anchor["acc"] + 1.0,
            "growth_at_most_half_reference": (growth[-1] if growth else 0.0)
            <= 0.5 * reference_growth,
            "wall_time_at_most_0.3x": ours["wall_s"] <= 0.3 * anchor["wall_s"]}


def _children_peak_rss_gb() -> float:
    """Peak RSS of the finished child processes; NaN on Windows, which has no `resource`."""
    try:
        import resource
    except ImportError:
        return float("nan")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2  # bytes there, KiB here


def run(argv: list[str], out: Path) -> tuple[dict, float, float]:
    """Run the recipe in a child process; return (metrics, wall seconds, peak RSS in GB)."""
    command = [sys.executable, str(ROOT / "recipes" / "pmnist_lenet.py"), "--no-progress",
               "--output-dir", str(out), *argv]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, text=True, capture_output=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    peak_gb = _children_peak_rss_gb()
    return json.loads((out / "metrics.json").read_text()), wall, peak_gb


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    anchor = json.loads((HERE / "anchors.json").read_text())["pmnist_lenet"]
    if args.quick:
        recipe_args = ["--dataset", "fashion-mnist", "--num-tasks", "2", "--epochs", "1",
                       "--train-size", "0.05"]
    else:
        recipe_args = ["--dataset", "fashion-mnist-full", "--epochs", str(anchor["epochs"])]
    with tempfile.TemporaryDirectory() as tmp:
        result, wall, peak = run(recipe_args, Path(tmp) / "run")
    growth = reference_style_growth(result)
    ours = {"acc": result["acc"], "bwt": result["bwt"], "wall_s": wall, "peak_rss_gb": peak,
            "growth_after_tasks": growth,
            "final_accuracy": result["matrix"][-1],
            "accuracy_when_learned": [result["matrix"][i][i] for i in range(len(growth) + 1)],
            "ranks_per_layer": result["ranks"], "own_growth_per_task": result["growth"]}
    targets = targets_of(ours, anchor)
    rows = [("ACC (%)", anchor["acc"], ours["acc"]), ("BWT (points)", anchor["bwt"], ours["bwt"]),
            ("growth after last task", anchor["growth_after_tasks"][len(growth) - 1]
             if growth else 0.0, growth[-1] if growth else 0.0),
            ("wall time (s)", anchor["wall_s"], wall),
            ("peak RSS (GB)", anchor["peak_rss_gb"], peak)]
    print(f"{'figure':<26}{'reference':>12}{'halrp_adapt':>14}{'ratio':>9}")
    for label, ref, mine in rows:
        ratio = f"{mine / ref:.3f}" if ref else "-"
        print(f"{label:<26}{ref:>12.3f}{mine:>14.3f}{ratio:>9}")
    if args.quick:
        print("(--quick: 2 tasks on 5% of the embedded data; not comparable to the anchor)")
    print("targets:", ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets.items()))
    out = {"command": "python benchmarks/pmnist_lenet.py" + (" --quick" if args.quick else ""),
           "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.platform()}, "
           f"{os.cpu_count()} CPUs", "recipe_args": recipe_args, "anchor": anchor,
           "ours": ours, "targets": targets}
    RESULTS.mkdir(exist_ok=True)
    name = "pmnist_lenet_quick" if args.quick else "pmnist_lenet"
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(RESULTS / f"{name}.png", anchor, ours)
    return out


def plot(path: Path, anchor: dict, ours: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    n = len(ours["final_accuracy"])
    left.plot(range(n), anchor["final_accuracy"][:n], "o-", label="reference")
    left.plot(range(n), ours["final_accuracy"], "s-", label="halrp_adapt")
    left.set_xlabel("task")
    left.set_ylabel("final accuracy (%)")
    left.legend()
    g = ours["growth_after_tasks"]
    right.plot(range(1, len(g) + 1), anchor["growth_after_tasks"][:len(g)], "o-",
               label="reference")
    right.plot(range(1, len(g) + 1), g, "s-", label="halrp_adapt")
    right.set_xlabel("after task")
    right.set_ylabel("growth over the base (reference's count)")
    right.legend()
    fig.suptitle("Permuted Fashion-MNIST, LeNet")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
