"""`--deterministic`: the same command twice gives bit-identical accuracy matrices and adapters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "vit_split_imagenet.py"


def _run(out: Path) -> dict:
    args = ["--num-tasks", "2", "--epochs", "1", "--trial-steps", "2", "--img-size", "16",
            "--seed", "3", "--deterministic", "--no-progress", "--output-dir", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True,
                         timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # Tensors, not file bytes: safetensors writes its metadata entries in no fixed order.
    tensors = {task: load_file(out / "adapters" / task / "adapter_model.safetensors")
               for task in metrics["tasks"]}
    return {"matrix": metrics["matrix"], "tensors": tensors}


@pytest.mark.slow
def test_two_runs_are_bit_identical(tmp_path):
    first, second = _run(tmp_path / "one"), _run(tmp_path / "two")
    assert first["matrix"] == second["matrix"]
    for task, tensors in first["tensors"].items():  # every adapter tensor, bit for bit
        other = second["tensors"][task]
        assert tensors.keys() == other.keys()
        assert all(torch.equal(tensors[k], other[k]) for k in tensors), task
