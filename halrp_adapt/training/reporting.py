"""A continual run's results: summary, table, JSON/CSV files and PNG plots."""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..files.storage import atomic_write
from .metrics import average_accuracy, backward_transfer, forgetting
from .tracking import PLOTS

if TYPE_CHECKING:
    from .trainer import ContinualTrainer


def summarize(trainer: ContinualTrainer) -> dict[str, Any]:
    """Everything a run measured, as plain JSON-able data."""
    state, handle = trainer.state, trainer.handle
    report = handle.report()
    names = state.finished
    tasks = {n: report.tasks[n].to_dict() for n in names}
    return {
        "tasks": names,
        "classes": {t.name: t.classes for t in trainer.tasks if t.name in names},
        "matrix": state.matrix,
        "acc": average_accuracy(state.matrix) if names else None,
        "bwt": backward_transfer(state.matrix) if names else None,
        "forgetting": forgetting(state.matrix) if names else None,
        "growth": {n: tasks[n]["growth"] for n in names},
        "total_growth": sum(tasks[n]["growth"] for n in names),
        "backbone_params": report.backbone_params,
        "budget": handle.config.budget,
        "ranks": {n: tasks[n]["ranks"] for n in names},
        "params": tasks,
        "times": state.times,
        "train_config": {k: v for k, v in vars(trainer.config).items()},
        "halrp_options": handle.config.options(),
        "num_processes": trainer.accelerator.num_processes,
        "scenario": trainer.scenario,
        "class_incremental": (
            _class_incremental(state) if trainer.scenario == "class-incremental" else None
        ),
    }


def _class_incremental(state: Any) -> dict[str, Any]:
    """The class-incremental figures: the matrix (row i: accuracy over every class seen after
    task i, on each seen task's data), the accuracy over all seen data after each task, its
    average and last value, and task retrieval's accuracy after each task."""
    seen = state.ci_seen
    return {
        "matrix": state.ci_matrix,
        "accuracy_seen": seen,
        "average": sum(seen) / len(seen) if seen else None,
        "last": seen[-1] if seen else None,
        "retrieval": state.retrieval,
    }


def format_table(result: dict[str, Any]) -> str:
    """The accuracy matrix with growth and time per task, and ACC / BWT / forgetting."""
    names = result["tasks"]
    width = max([8] + [len(n) + 1 for n in names])
    lines = [
        "after task".ljust(width)
        + "".join(n.rjust(width) for n in names)
        + "growth".rjust(9)
        + "time s".rjust(9)
    ]
    for i, name in enumerate(names):
        row = result["matrix"][i]
        cells = "".join(f"{a:.2f}".rjust(width) for a in row)
        cells += " " * width * (len(names) - len(row))
        seconds = sum(result["times"].get(name, {}).values())
        lines.append(
            name.ljust(width)
            + cells
            + f"{result['growth'][name]:.4f}".rjust(9)
            + f"{seconds:.0f}".rjust(9)
        )
    lines.append(
        f"ACC {result['acc']:.2f}   BWT {result['bwt']:+.2f}   forgetting "
        f"{result['forgetting']:.2f}   total growth {result['total_growth']:.4f} "
        f"(budget {result['budget']} per task)"
    )
    ci = result.get("class_incremental")
    if ci and ci["accuracy_seen"]:
        lines.append(
            "without task names (class-incremental): "
            + " ".join(f"{a:.2f}" for a in ci["accuracy_seen"])
            + f"; average {ci['average']:.2f}, last {ci['last']:.2f}; task found "
            + " ".join(f"{a:.1f}" for a in ci["retrieval"])
            + " %"
        )
    return "\n".join(lines)


def check_plotting() -> None:
    """Raise ImportError, naming what to install, when the run's plots could not be drawn.

    `ContinualTrainer.run` calls it before the first task trains, so that a broken install
    fails in seconds instead of after the run.

    Example::

        from halrp_adapt.training.reporting import check_plotting
        check_plotting()   # nothing happens when matplotlib is importable
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"The run's plots need matplotlib, a dependency of halrp-adapt that "
            f"this environment lacks ({err}). Install it with `pip install "
            f'"matplotlib>=3.7"` (or reinstall halrp-adapt).'
        ) from err


def _write_text(path: Path, text: str) -> None:
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def _csv_text(rows: Sequence[Sequence[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue()


def write_outputs(trainer: ContinualTrainer, result: dict[str, Any]) -> None:
    """Write the run's files into `trainer.output_dir`.

    The metrics and tables go first, each written atomically; the plots last. A plot that
    fails is reported (logged and warned) and leaves every other file in place: the trained
    run is never lost to a reporting error.
    """
    out = trainer.output_dir
    assert out is not None
    out.mkdir(parents=True, exist_ok=True)
    _write_text(out / "metrics.json", json.dumps(result, indent=2, default=str) + "\n")
    names = result["tasks"]
    _write_text(
        out / "accuracy_matrix.csv",
        _csv_text(
            [["after_task"] + names]
            + [
                [name] + [f"{a:.4f}" for a in row] + [""] * (len(names) - len(row))
                for name, row in zip(names, result["matrix"], strict=False)
            ]
        ),
    )
    phases = ["estimate", "train", "prune", "evaluate", "save"]
    rows: list[list[Any]] = [
        [
            "task",
            "classes",
            "final_accuracy",
            "growth",
            "stored_params",
            "low_rank_params",
            "head_params",
        ]
        + [f"{p}_s" for p in phases]
    ]
    for i, name in enumerate(names):
        p = result["params"][name]
        times = result["times"].get(name, {})
        rows.append(
            [
                name,
                " ".join(map(str, result["classes"].get(name, []))),
                f"{result['matrix'][-1][i]:.4f}",
                f"{p['growth']:.6f}",
                p["stored_params"],
                p["low_rank_params"],
                p["head_params"],
            ]
            + [f"{times.get(ph, 0.0):.3f}" for ph in phases]
        )
    _write_text(out / "tasks.csv", _csv_text(rows))
    layers = list(dict.fromkeys(layer for ranks in result["ranks"].values() for layer in ranks))
    _write_text(
        out / "ranks.csv",
        _csv_text(
            [["layer"] + names]
            + [[layer] + [result["ranks"][n].get(layer, 0) for n in names] for layer in layers]
        ),
    )
    written = ["metrics.json", "accuracy_matrix.csv", "tasks.csv", "ranks.csv"]
    ci = result.get("class_incremental")
    if ci:
        _write_text(
            out / "class_incremental.csv",
            _csv_text(
                [["after_task"] + names + ["all_seen", "retrieval"]]
                + [
                    [name]
                    + [f"{a:.4f}" for a in row]
                    + [""] * (len(names) - len(row))
                    + [f"{seen:.4f}", f"{found:.4f}"]
                    for name, row, seen, found in zip(
                        names, ci["matrix"], ci["accuracy_seen"], ci["retrieval"], strict=False
                    )
                ]
            ),
        )
        written.append("class_incremental.csv")
    trainer.log("\n" + format_table(result))
    try:
        write_plots(out, result, layers)
        written += [f"{name}.png" for name in PLOTS if (out / f"{name}.png").is_file()]
    except Exception as err:  # a plot must never cost the run its other results
        message = (
            f"could not write the plots: {type(err).__name__}: {err}. The metrics, "
            f"tables and adapters are in {out}."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        trainer.log(message)
    adapters = ", adapters/" if trainer.config.save_adapters else ""
    trainer.log(f"results in {out}: {', '.join(written)}{adapters}")


def write_plots(out: Path, result: dict[str, Any], layers: Sequence[str]) -> None:
    """accuracy_matrix.png (heatmap), ranks.png (layer x task), growth.png (per task and
    cumulative)."""
    check_plotting()
    import matplotlib.pyplot as plt
    import numpy as np

    names = result["tasks"]
    t = len(names)
    grid = np.full((t, t), np.nan)
    for i, row in enumerate(result["matrix"]):
        grid[i, : len(row)] = row
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * t, 1.0 + 0.6 * t))
    image = ax.imshow(grid, cmap="viridis", vmin=np.nanmin(grid), vmax=100)
    for i in range(t):
        for j in range(i + 1):
            ax.text(
                j,
                i,
                f"{grid[i, j]:.1f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if grid[i, j] < np.nanmean(grid) else "black",
            )
    ax.set_xticks(range(t), names, rotation=45, ha="right")
    ax.set_yticks(range(t), names)
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after learning")
    ax.set_title(f"Accuracy (%)  ACC {result['acc']:.2f}  BWT {result['bwt']:+.2f}")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "accuracy_matrix.png", dpi=120)
    plt.close(fig)

    ranks = np.array([[result["ranks"][n].get(layer, 0) for n in names] for layer in layers])
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * t, 1.5 + 0.18 * max(len(layers), 1)))
    image = ax.imshow(ranks if len(layers) else np.zeros((1, t)), aspect="auto", cmap="magma")
    ax.set_xticks(range(t), names, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_title("Rank per layer and task")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "ranks.png", dpi=120)
    plt.close(fig)

    growth = [result["growth"][n] for n in names]
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * t, 3.2))
    ax.bar(range(t), growth, label="per task")
    ax.plot(range(t), np.cumsum(growth), "o-", color="C1", label="cumulative")
    ax.axhline(result["budget"], color="C3", linestyle="--", label="budget per task")
    ax.set_xticks(range(t), names, rotation=45, ha="right")
    ax.set_ylabel("parameters / backbone")
    ax.set_title("Growth over tasks")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "growth.png", dpi=120)
    plt.close(fig)

    ci = result.get("class_incremental")
    if ci and ci["accuracy_seen"]:
        steps = range(1, len(ci["accuracy_seen"]) + 1)
        oracle = [sum(row) / len(row) for row in result["matrix"]]
        fig, ax = plt.subplots(figsize=(2.5 + 0.5 * t, 3.2))
        ax.plot(steps, ci["accuracy_seen"], "o-", label="all seen classes, no task name")
        ax.plot(steps, ci["retrieval"], "s--", label="task retrieval")
        ax.plot(steps, oracle[: len(steps)], "^:", label="task given (mean over tasks)")
        ax.set_xticks(list(steps), names[: len(steps)], rotation=45, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"Class-incremental  average {ci['average']:.2f}  last {ci['last']:.2f}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "class_incremental.png", dpi=120)
        plt.close(fig)


def order_report(run_dirs: Sequence[str | Path], out_dir: str | Path) -> dict[str, Any]:
    """OPD / MOPD / AOPD over runs of the same tasks in different orders.

    A task's identity is its set of classes, so the same task is matched across orders
    whatever its position. Reads each run's metrics.json; writes order_robustness.json and
    order_robustness.csv into `out_dir`.
    """
    from .metrics import order_robustness

    finals = []
    for run in run_dirs:
        metrics = json.loads((Path(run) / "metrics.json").read_text(encoding="utf-8"))
        final = metrics["matrix"][-1]
        finals.append(
            {
                "-".join(map(str, sorted(metrics["classes"][name]))): final[i]
                for i, name in enumerate(metrics["tasks"])
            }
        )
    result: dict[str, Any] = {"runs": [str(r) for r in run_dirs], **order_robustness(finals)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "order_robustness.json").write_text(
        json.dumps(result, indent=2) + "\n", encoding="utf-8"
    )
    with open(out / "order_robustness.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["task_classes"] + [f"order{i}" for i in range(len(finals))] + ["OPD"])
        for identity, opd in result["OPD"].items():
            writer.writerow(
                [identity] + [f"{run[identity]:.4f}" for run in finals] + [f"{opd:.4f}"]
            )
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m halrp_adapt.training.reporting RUN_DIR ... --out DIR`: order robustness."""
    import argparse

    parser = argparse.ArgumentParser(
        description="OPD / MOPD / AOPD over runs of the same tasks in different --class-order s."
    )
    parser.add_argument("runs", nargs="+", help="output folders of finished runs")
    parser.add_argument("--out", required=True, help="folder for order_robustness.json/.csv")
    args = parser.parse_args(argv)
    missing = [r for r in args.runs if not (Path(r) / "metrics.json").is_file()]
    if missing:
        parser.error(f"runs without metrics.json: {missing}")
    try:
        result = order_report(args.runs, args.out)
    except ValueError as err:
        parser.error(str(err))
    print(f"MOPD {result['MOPD']:.2f}  AOPD {result['AOPD']:.2f}  over {len(args.runs)} orders")


if __name__ == "__main__":
    main()
