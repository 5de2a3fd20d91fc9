"""A real run: Split Fashion-MNIST (embedded real images), 3 tasks, small CNN, the demo's code."""

from __future__ import annotations

from pathlib import Path

from conftest import load_script

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def _quickstart():
    return load_script(QUICKSTART)


def test_three_tasks_learn_and_never_forget():
    result = _quickstart().main(["--tasks", "3", "--epochs", "2", "--data", "embedded"])
    matrix = result["matrix"]
    assert len(matrix) == 3
    for i in range(3):
        assert matrix[i][i] > 70.0, f"task {i} did not learn: {matrix[i][i]:.1f}% (chance 33%)"
        for later in range(i, 3):
            assert matrix[later][i] == matrix[i][i], "an earlier task's accuracy moved"
    assert result["bwt"] == 0.0
