"""Soak: 50 tasks on a small CNN and a small ViT (benchmarks/soak.py, tiny data per task).

Checked here: every old task bit-identical at the end (outputs and tensors), total growth within
50 x budget, the reloaded shelf equal, and loading one task reading only that task's files.
Times and memory per task are reported by the benchmark (slopes in benchmarks/README.md),
never asserted here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_script

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def _soak_module():
    return load_script(SOAK)


@pytest.mark.parametrize("model", ["small_cnn", "small_vit"])
def test_fifty_tasks(model):
    run = _soak_module().soak(model, tasks=50)
    assert run["old_tasks_bit_identical"]
    assert run["total_growth"] <= run["growth_limit"]
    assert run["loaded_outputs_equal"]
    task = run["loaded_task"]
    assert set(run["files_read_loading_one"]) <= {
        "halrp_index.json", ".halrp.lock", f"{task}/adapter_config.json",
        f"{task}/adapter_model.safetensors"}
    assert f"{task}/adapter_model.safetensors" in run["files_read_loading_one"]
    assert len(run["seconds_per_task"]) == len(run["rss_mb_after_task"]) == 50
