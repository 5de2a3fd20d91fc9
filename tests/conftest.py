"""Shared fixtures: seeded RNG, small models and data made here."""

from __future__ import annotations

import os
import sys
import types  # noqa: F401  (annotations)

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import FakeHub  # noqa: E402

# huggingface_hub reads these when it is imported, which happens below (through torch users
# such as timm and transformers): point it at the tests' own loopback Hub, offline otherwise.
HUB_PORT = FakeHub.pick_free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


# Property and fuzz tests draw the same examples on every run, so that CI is repeatable;
# HYPOTHESIS_PROFILE=explore draws new ones (and remembers failures) when hunting for bugs.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("repeatable", derandomize=True, database=None)
_hypothesis_settings.register_profile("explore", derandomize=False)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def hub():
    """The loopback Hub at HF_ENDPOINT, for the tests that upload and download."""
    with FakeHub(HUB_PORT) as server:
        yield server


@pytest.fixture
def online(hub, monkeypatch, tmp_path):
    """huggingface_hub allowed to reach the loopback Hub, with a fresh cache."""
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    assert constants.ENDPOINT == hub.url, "huggingface_hub was imported before the conftest"
    return hub


# `Popen.kill()`: SIGKILL on POSIX (the return code is its negative), TerminateProcess with
# exit code 1 on Windows, which has no SIGKILL.
KILLED_RETURNCODE = 1 if os.name == "nt" else -9


def load_script(path) -> "types.ModuleType":
    """Import a script (a recipe, example or benchmark) by its path, as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def tiny_cnn(num_classes: int = 5, seed: int = 0) -> nn.Sequential:
    """A small CNN with BatchNorm and LayerNorm; the same weights for the same `seed`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _tiny_cnn(num_classes)


def _tiny_cnn(num_classes: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.LayerNorm(32), nn.ReLU(),
        nn.Linear(32, num_classes))


def batches(n: int = 4, size: int = 8, shape=(3, 8, 8), classes: int = 3,
            seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g),
             torch.randint(0, classes, (size,), generator=g)) for _ in range(n)]


def train_steps(cl, data, steps: int = 2, lr: float = 1e-2, loss_fn=None) -> None:
    """A few optimiser steps of the open task, regularised, as a user would write them."""
    from halrp_adapt import default_loss

    loss_fn = loss_fn or default_loss
    optimizer = torch.optim.Adam(cl.trainable_parameters(), lr=lr)
    cl.train()
    for _, batch in zip(range(steps), data):
        loss = loss_fn(cl, batch) + cl.regularization_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def learn_task(cl, name: str, data, num_classes=None, loss_fn=None, steps: int = 2) -> None:
    cl.add_task(name, num_classes=num_classes)
    if not cl._tasks[name].trains_base:
        cl.estimate_ranks(data, steps=steps, loss_fn=loss_fn)
    train_steps(cl, data, steps=steps, loss_fn=loss_fn)
    cl.end_task(calibration_data=data)


def learn_pruned_task(cl, name: str, data, num_classes=None, loss_fn=None) -> None:
    """Like `learn_task`, but each layer's factors are replaced by random ones of three times
    the rank (at least half the full rank) before training, so the task's dense factors exceed
    its budget: pruning has real work and the task ends with compact (bit-masked) factors."""
    cl.add_task(name, num_classes=num_classes)
    cl.estimate_ranks(data, steps=1, loss_fn=loss_fn)
    for layer in cl.adapter_layers().values():
        if layer.supports_low_rank:
            side = min(layer.out_features, layer.in_features)
            k = min(max(3 * layer.rank(name) + 2, side // 2), side)
            layer.set_low_rank(name, 0.1 * torch.randn(k, layer.in_features),
                               0.1 * torch.randn(layer.out_features, k))
    train_steps(cl, data, steps=1, loss_fn=loss_fn)
    cl.end_task(calibration_data=data)


def outputs_of(cl, inputs) -> dict:
    """{task: output} for every task, in eval mode, without gradients."""
    cl.eval()
    out = {}
    with torch.no_grad():
        for name in cl.tasks:
            with cl.task(name):
                result = cl(**inputs) if isinstance(inputs, dict) else cl(inputs)
            out[name] = result.logits if hasattr(result, "logits") else result
    return out


@pytest.fixture
def shelf(tmp_path):
    """A folder holding tasks a and b of `tiny_cnn()`."""
    import halrp_adapt

    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(cl, "a", batches(), num_classes=3)
    learn_task(cl, "b", batches(seed=2), num_classes=3)
    cl.save_pretrained(tmp_path)
    return tmp_path


def unchanged(model, reference):
    state = model.state_dict()
    return state.keys() == reference.keys() and all(torch.equal(state[k], reference[k])
                                                     for k in state)


def load_fails(shelf, match, tasks=None, model=None, exc=ValueError):
    """`halrp_adapt.load` raises `exc` matching `match`, and `model` is left untouched."""
    import halrp_adapt

    model = model or tiny_cnn()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc, match=match):
        halrp_adapt.load(model, shelf, tasks=tasks)
    assert unchanged(model, reference), "the model changed although loading failed"
    assert halrp_adapt.HalrpModel.of(model) is None


def pytest_terminal_summary(terminalreporter):
    """One line for CI's log: how PEFT's own tuner tests fared on HALRP (tests/test_peft_suite.py),
    with the PEFT version they come from; the skip reasons are in pytest's -ra summary."""
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            if getattr(report, "nodeid", "").startswith("tests/test_peft_suite.py") and (
                report.when == "call" or outcome in ("skipped", "error")
            ):
                counts[outcome] = counts.get(outcome, 0) + 1
    if not counts:
        return
    from importlib.metadata import version

    summary = ", ".join(f"{n} {outcome}" for outcome, n in sorted(counts.items()))
    terminalreporter.write_line(f"PEFT {version('peft')}'s own tuner tests on HALRP: {summary}")
