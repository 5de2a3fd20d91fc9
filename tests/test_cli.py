"""The `halrp-adapt` command, run as a subprocess on a saved shelf of tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import halrp_adapt
from halrp_adapt.files.storage import WEIGHTS_NAME

from conftest import batches, learn_task, tiny_cnn

TESTS = Path(__file__).resolve().parent
BACKBONE = ["--backbone", "py:conftest:tiny_cnn", "--backbone-kwargs", '{"num_classes": 5}']


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "halrp_adapt.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def shelf(tmp_path_factory):
    torch.manual_seed(0)
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    for i, name in enumerate(["first", "second"]):
        learn_task(cl, name, batches(n=2, seed=i), num_classes=3)
        cl.record_metrics(name, accuracy=90.0 + i)
    root = tmp_path_factory.mktemp("shelf")
    cl.save_pretrained(root)
    return root, cl


@pytest.mark.parametrize("command", ["inspect", "verify", "merge", "export-lora"])
def test_help(command):
    done = cli(command, "--help")
    assert done.returncode == 0 and "usage: halrp-adapt" in done.stdout


def test_inspect(shelf):
    root, cl = shelf
    done = cli("inspect", str(root), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    assert list(info["tasks"]) == ["first", "second"]
    assert info["tasks"]["second"]["ranks"] == cl.task_stats("second").ranks
    assert info["tasks"]["first"]["metrics"] == {"accuracy": 90.0}
    assert info["backbone"]["fingerprint"] and info["tasks"]["first"]["bytes"] > 0
    table = cli("inspect", str(root))
    assert table.returncode == 0 and "ranks per layer" in table.stdout
    assert info["backbone"]["fingerprint"] in table.stdout


def test_verify_passes_then_catches_a_changed_file(shelf, tmp_path):
    root, _ = shelf
    done = cli("verify", str(root))
    assert done.returncode == 0 and "OK: 2 tasks" in done.stdout, done.stdout + done.stderr
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(root, copy)
    weights = copy / "second" / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    (copy / "orphan").mkdir()
    done = cli("verify", str(copy))
    assert done.returncode == 1
    assert "problem: second: adapter_model.safetensors differs from the index" in done.stdout
    assert "note: orphan: not in the index" in done.stdout


def test_merge_writes_a_plain_model(shelf, tmp_path):
    root, cl = shelf
    done = cli("merge", str(root), "--task", "second", *BACKBONE, "--out", str(tmp_path / "m"))
    assert done.returncode == 0, done.stderr
    from safetensors.torch import load_file

    plain = tiny_cnn(num_classes=3)
    plain.load_state_dict(load_file(str(tmp_path / "m" / "model.safetensors")))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad(), cl.eval().task("second"):
        torch.testing.assert_close(plain.eval()(x), cl(x), atol=1e-5, rtol=1e-5)


def test_export_lora_is_exact_in_peft(shelf, tmp_path):
    from peft import PeftModel

    root, cl = shelf
    out = tmp_path / "lora"
    done = cli("export-lora", str(root), "--task", "first", *BACKBONE, "--out", str(out))
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    model = PeftModel.from_pretrained(tiny_cnn(num_classes=3), str(out)).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad(), cl.eval().task("first"):
        torch.testing.assert_close(model(x), cl(x), atol=1e-4, rtol=1e-4)


def test_export_lora_refuses_a_rank_it_cannot_hold(shelf, tmp_path):
    root, _ = shelf
    done = cli("export-lora", str(root), "--task", "first", *BACKBONE, "--max-rank", "1",
               "--out", str(tmp_path / "lora"))
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "cannot be written exactly as LoRA" in line and "above `max_rank`=1" in line
    assert not (tmp_path / "lora").exists()


@pytest.mark.parametrize("args,message", [
    (["inspect", "no/such/shelf/here"], "is neither a folder of saved tasks"),
    (["verify", "no-such-folder"], "is not a folder"),
    (["merge", "{root}", "--task", "zz", *BACKBONE, "--out", "x"], r"`tasks`: \['zz'\] are not"),
    (["merge", "{root}", "--task", "first", "--backbone", "keras:x", "--out", "x"],
     "`--backbone` must be timm:NAME, hf:PATH_OR_ID or py:MODULE:FUNCTION"),
    (["merge", "{root}", "--task", "first", "--backbone", "py:conftest:tiny_cnn",
      "--backbone-kwargs", "[1]", "--out", "x"], "`--backbone-kwargs` must be a JSON object"),
    (["export-lora", "{root}", "--task", "first", *BACKBONE, "--max-rank", "0", "--out", "x"],
     "`max_rank` must be None or an int >= 1"),
])
def test_bad_input_is_one_line_and_status_2(shelf, args, message):
    root, _ = shelf
    done = cli(*[a.replace("{root}", str(root)) for a in args])
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], done.stderr
    assert __import__("re").search(message, lines[0]), lines[0]
