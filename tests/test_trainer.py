"""The continual trainer: outputs, metrics, resume after a kill, two ranks with gloo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from halrp_adapt.training.metrics import (average_accuracy, backward_transfer, forgetting,
                                 order_robustness)

from conftest import KILLED_RETURNCODE

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "continual_run.py"
PYTHON = sys.executable
CI = ["--scenario", "class-incremental"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _result(stdout: str) -> dict:
    line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_metrics_by_hand():
    matrix = [[90.0], [85.0, 80.0], [70.0, 82.0, 60.0]]
    assert average_accuracy(matrix) == pytest.approx((70 + 82 + 60) / 3)
    assert backward_transfer(matrix) == pytest.approx(((70 - 90) + (82 - 80)) / 2)
    assert forgetting(matrix) == pytest.approx(((90 - 70) + (82 - 82)) / 2)
    runs = [{"a": 90.0, "b": 70.0}, {"a": 85.0, "b": 72.0}, {"a": 88.0, "b": 71.0}]
    result = order_robustness(runs)
    assert result["OPD"] == {"a": 5.0, "b": 2.0}
    assert result["MOPD"] == 5.0 and result["AOPD"] == 3.5


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    done = subprocess.run([PYTHON, str(SCRIPT), str(out), *CI], capture_output=True, text=True,
                          env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, _result(done.stdout)


def test_run_writes_every_output(single_run):
    out, result = single_run
    for name in ("metrics.json", "accuracy_matrix.csv", "tasks.csv", "ranks.csv",
                 "accuracy_matrix.png", "ranks.png", "growth.png", "trainer_state.json",
                 "adapters/halrp_index.json", "adapters/task2/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    matrix = metrics["matrix"]
    assert matrix == result["matrix"] and len(matrix) == 3
    assert metrics["bwt"] == 0.0 and metrics["forgetting"] == 0.0
    assert all(matrix[i][i] > 75.0 for i in range(3)), matrix  # 2 classes: chance is 50
    assert set(metrics["times"]["task1"]) == {"estimate", "train", "prune", "evaluate", "save"}
    assert all(0 < g <= 0.2 for g in metrics["growth"].values())
    assert (out / "accuracy_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_class_incremental_scenario_scores_without_task_names(single_run):
    out, result = single_run
    ci = json.loads((out / "metrics.json").read_text())["class_incremental"]
    assert ci == result["class_incremental"]
    seen, found, matrix = ci["accuracy_seen"], ci["retrieval"], ci["matrix"]
    assert len(seen) == len(found) == len(matrix) == 3
    assert seen[0] == matrix[0][0] and found[0] == 100.0  # one task: nothing to confuse
    # without the task's name a sample can only lose: its task must be found first
    task_given = json.loads((out / "metrics.json").read_text())["matrix"]
    for i in range(3):
        for j in range(i + 1):
            assert matrix[i][j] <= task_given[i][j] + 1e-9
    assert all(f > 60.0 for f in found), found  # 5 pairs of FMNIST classes: chance is 1/3
    assert ci["average"] == pytest.approx(sum(seen) / 3) and ci["last"] == seen[-1]
    assert (out / "class_incremental.png").read_bytes()[:4] == b"\x89PNG"
    rows = (out / "class_incremental.csv").read_text().splitlines()
    assert rows[0] == "after_task,task0,task1,task2,all_seen,retrieval" and len(rows) == 4


def test_resume_after_a_kill_in_the_middle_of_a_task(single_run, tmp_path):
    _, uninterrupted = single_run
    out = tmp_path / "run"
    process = subprocess.Popen([PYTHON, str(SCRIPT), str(out), *CI], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=_env())
    killed = False
    for line in process.stdout:
        if line.startswith("[task1] ranks estimated"):  # task0 saved, task1 in training
            process.kill()
            killed = True
            break
    process.wait(timeout=120)
    assert killed and process.returncode == KILLED_RETURNCODE
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["finished"] == ["task0"]
    done = subprocess.run([PYTHON, str(SCRIPT), str(out), *CI], capture_output=True,
                          text=True, env=_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming after 1 finished task(s): ['task0']" in done.stdout
    assert "[task0] trained" not in done.stdout  # not redone
    resumed = _result(done.stdout)
    assert resumed["matrix"] == uninterrupted["matrix"]
    # the signature of the task finished before the kill came back from the shelf
    assert resumed["class_incremental"] == uninterrupted["class_incremental"]


def test_two_gloo_ranks_match_one_process(single_run, tmp_path):
    _, one = single_run
    done = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", str(SCRIPT), str(tmp_path), *CI],
                          capture_output=True, text=True, env=_env(), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    two = _result(done.stdout)
    assert two["processes"] == 2
    # Two ranks average gradients in another order, so the weights differ in the last bits;
    # a sample near a task boundary can then flip its retrieved task: 3 of 200 samples allowed.
    for key, tolerance in (("matrix", 0.5), ("ci", 1.5)):
        first = one["matrix"] if key == "matrix" else one["class_incremental"]["matrix"]
        second = two["matrix"] if key == "matrix" else two["class_incremental"]["matrix"]
        for row_one, row_two in zip(first, second):
            for a, b in zip(row_one, row_two):
                assert abs(a - b) <= tolerance, (key, first, second)


def test_fsdp_on_two_gloo_ranks_matches_one_process(tmp_path):
    # The backbone (two blocks, then the root) sharded with FSDP2 as Accelerate applies it,
    # after the first task has trained it; the tasks' parameters whole on both ranks. A sharded
    # model's estimation runs the full trial on a plain copy: the one process does the same.
    one = subprocess.run([PYTHON, str(SCRIPT), str(tmp_path / "one"), "--blocks", "--trial",
                          "full", *CI],
                         capture_output=True, text=True, env=_env(), timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29539", str(SCRIPT), str(tmp_path / "two"),
                          "--blocks", "--fsdp", *CI], capture_output=True, text=True,
                         env=_env(), timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = _result(one.stdout), _result(two.stdout)
    assert two["processes"] == 2 and two["sharded"].startswith("FSDP")
    assert two["fsdp_modules"] == ["", "blocks.0", "blocks.1"]  # each block, then the root
    assert not one["sharded"].startswith("FSDP")
    for row_one, row_two in zip(one["matrix"], two["matrix"]):
        for a, b in zip(row_one, row_two):
            assert abs(a - b) <= 0.5, (one["matrix"], two["matrix"])
    matrix = two["matrix"]
    for j in range(len(matrix)):  # a finished task never changes
        assert {row[j] for row in matrix[j:]} == {matrix[j][j]}, matrix
    rank0, rank1 = two["digests"]
    assert rank0 == rank1, "the ranks hold different copies of a task"
    assert rank0 == two["saved_digests"]  # what was saved when each task ended is still live
    assert len(two["class_incremental"]["matrix"]) == len(matrix)


def test_two_ranks_never_change_a_finished_task_with_batchnorm(tmp_path):
    # Each rank's BatchNorm statistics differ; the trainer must keep finished tasks identical
    # on every rank (DDP broadcasts buffers from rank 0 while training later tasks).
    done = subprocess.run([PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29535", str(SCRIPT), str(tmp_path),
                           "--batch-norm"], capture_output=True, text=True, env=_env(),
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = _result(done.stdout)
    matrix = result["matrix"]
    for j in range(len(matrix)):
        assert {row[j] for row in matrix[j:]} == {matrix[j][j]}, matrix
    rank0, rank1 = result["digests"]
    assert rank0 == rank1, "the ranks hold different copies of a finished task"


def test_order_report_matches_tasks_by_their_classes(tmp_path):
    from halrp_adapt.training.reporting import main as order_main

    runs = []
    for i, (order, finals) in enumerate([([[0, 1], [2, 3]], [90.0, 70.0]),
                                         ([[2, 3], [0, 1]], [74.0, 88.0])]):
        run = tmp_path / f"order{i}"
        run.mkdir()
        names = ["task0", "task1"]
        (run / "metrics.json").write_text(json.dumps({
            "tasks": names, "classes": dict(zip(names, order)),
            "matrix": [[finals[0]], finals]}))
        runs.append(str(run))
    order_main(runs + ["--out", str(tmp_path / "orders")])
    result = json.loads((tmp_path / "orders" / "order_robustness.json").read_text())
    assert result["OPD"] == {"0-1": 2.0, "2-3": 4.0}  # 90 vs 88, 70 vs 74
    assert result["MOPD"] == 4.0 and result["AOPD"] == 3.0
    assert (tmp_path / "orders" / "order_robustness.csv").read_text().startswith("task_classes")


def test_imagefolder_dataset_splits_into_tasks(tmp_path):
    from PIL import Image

    from halrp_adapt.data.task_splits import load_image_dataset, split_into_tasks

    for split, count in (("train", 3), ("test", 2)):
        for label in ("cat", "dog", "emu", "fox"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (6, 6), (i * 50, 10, 10)).save(folder / f"{i}.png")
    train, test = load_image_dataset(str(tmp_path))
    tasks = split_into_tasks(train, test, 2, transform=lambda im: im.size, seed=1)
    assert [len(t.train) for t in tasks] == [6, 6] and [len(t.test) for t in tasks] == [4, 4]
    assert sorted(c for t in tasks for c in t.classes) == [0, 1, 2, 3]
    assert {t.class_names[0] for t in tasks} <= {"cat", "dog", "emu", "fox"}
    image_size, label = tasks[0].train[0]
    assert image_size == (6, 6) and label in (0, 1)
