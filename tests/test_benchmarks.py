"""The benchmarks' --quick modes run and write every field (never a timing threshold)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, *args: str):
    spec = importlib.util.spec_from_file_location(script, BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(list(args))


def test_bytes_per_task_quick():
    rows = _run("bytes_per_task", "--quick")
    data = json.loads((BENCHMARKS / "results" / "bytes_per_task_quick.json").read_text())
    assert data["rows"] == rows and data["command"].endswith("--quick")
    for row in rows:
        assert {"model", "budget", "dtype", "file_bytes", "bytes_over_backbone", "growth",
                "within_budget_plus_64KiB"} <= set(row)
        assert row["file_bytes"] > 0
