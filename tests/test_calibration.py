"""Norm statistics recomputed when a task ends: they match the weights the task keeps, and
nothing outside the task changes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, TensorDataset

import halrp_adapt
from halrp_adapt.handle.calibration import task_batch_norms


def _bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _loader(n: int = 96, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g) * 2 + 1
    y = torch.randint(0, 4, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def _train_open_task(cl, loader, steps: int = 6) -> None:
    opt = torch.optim.Adam(cl.trainable_parameters(), lr=1e-2)
    cl.train()
    for _, (x, y) in zip(range(steps), loader):
        loss = nn.functional.cross_entropy(cl(x), y) + cl.regularization_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _two_tasks(budget: float = 0.5):
    cl = halrp_adapt.attach(_bn_net(), budget=budget)
    loader = _loader()
    cl.add_task("a")
    cl.estimate_ranks(loader, steps=2)
    _train_open_task(cl, loader)
    cl.end_task(calibration_data=loader)
    cl.add_task("b")
    cl.estimate_ranks(loader, steps=2)
    _train_open_task(cl, _loader(seed=1))
    return cl, loader


def test_statistics_equal_update_bn_on_the_merged_task():
    cl, loader = _two_tasks()
    cl.end_task(calibration_data=loader)
    # update_bn on a plain model holding task b's final weights: the reference result.
    plain = cl.merge("b")
    update_bn(loader, plain)
    ours = task_batch_norms(cl, "b")
    theirs = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
        assert a.momentum == 0.1 and not a.training  # restored, and frozen in eval mode


def test_eval_outputs_match_batch_statistics_after_calibration():
    """One batch of the whole data: eval mode with the recomputed statistics equals train-mode
    BatchNorm on that batch (up to the unbiased variance's n/(n-1))."""
    cl, _ = _two_tasks()
    x = _loader(n=512, seed=2).dataset.tensors[0]
    whole = DataLoader(TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), batch_size=512)
    cl.end_task(calibration_data=whole)
    cl.eval()
    with torch.no_grad(), cl.task("b"):
        eval_out = cl(x)
    plain = cl.merge("b").train()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False  # batch statistics, nothing kept
    with torch.no_grad():
        batch_out = plain(x)
    torch.testing.assert_close(eval_out, batch_out, rtol=1e-2, atol=1e-2)


def test_nothing_outside_the_task_changes():
    cl, loader = _two_tasks()
    before = {k: v.clone() for k, v in cl.state_dict().items() if ".b." not in k
              and not k.endswith(".b")}
    cl.end_task(calibration_data=loader)
    after = cl.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    # and task a's outputs are bit-identical
    x = loader.dataset.tensors[0][:8]
    cl.eval()
    ref = copy.deepcopy(cl)
    with torch.no_grad(), cl.task("a"), ref.task("a"):
        assert torch.equal(cl(x), ref(x))


def _reference_statistics(cl, task: str, batches: list[torch.Tensor]) -> nn.BatchNorm2d:
    plain = cl.merge(task).train()
    for m in plain.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for x in batches:
            plain(x)
    return next(m for m in plain.modules() if isinstance(m, nn.BatchNorm2d))


def test_max_batches_and_batch_forms():
    cl, loader = _two_tasks()
    x = loader.dataset.tensors[0]
    # a plain tensor, then a tuple of inputs only; the cap stops after two
    cl.end_task(calibration_data=[x[:32], (x[32:64],), x[64:]], max_calibration_batches=2)
    ref = _reference_statistics(cl, "b", [x[:32], x[32:64]])
    torch.testing.assert_close(task_batch_norms(cl, "b")[0].running_mean, ref.running_mean)


class _KeywordNet(nn.Module):
    """Takes its input by keyword, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _bn_net()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.body(pixel_values)


def test_dict_batches_pass_as_keywords_without_labels():
    cl = halrp_adapt.attach(_KeywordNet(), budget=0.5)
    x = _loader().dataset.tensors[0]
    cl.add_task("a")
    batches = [{"pixel_values": x[i:i + 32], "labels": torch.zeros(32, dtype=torch.long)}
               for i in range(0, 96, 32)]
    cl.end_task(calibration_data=batches)
    ref = _reference_statistics(cl, "a", [x[i:i + 32] for i in range(0, 96, 32)])
    torch.testing.assert_close(task_batch_norms(cl, "a")[0].running_var, ref.running_var)


def test_bad_calibration_data_changes_nothing():
    cl, _ = _two_tasks()
    state = {k: v.clone() for k, v in cl.state_dict().items()}
    with pytest.raises(ValueError, match="`calibration_data` yielded no batch"):
        cl.end_task(calibration_data=[])
    with pytest.raises(TypeError, match="a batch must be a tensor"):
        cl.end_task(calibration_data=[3])
    with pytest.raises(ValueError, match="`max_calibration_batches` must be None or an int"):
        cl.end_task(calibration_data=_loader(), max_calibration_batches=0)
    after = cl.state_dict()
    assert state.keys() == after.keys()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert cl.open_task == "b"


def test_warns_once_without_data_and_never_without_batchnorm():
    cl, loader = _two_tasks()
    with pytest.warns(UserWarning, match="without `calibration_data`"):
        cl.end_task()
    cl.add_task("c")
    cl.estimate_ranks(loader, steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cl.end_task()  # once per handle
    ln = halrp_adapt.attach(
        nn.Sequential(nn.Linear(32, 64), nn.LayerNorm(64), nn.Linear(64, 2)), budget=0.5)
    ln.add_task("a")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ln.end_task()  # no running statistics: nothing to recompute, nothing to say
