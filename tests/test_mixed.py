"""Mixed-task batches: every sample through its own task, equal to each task run alone."""

from __future__ import annotations

import pytest
import timm
import torch

import halrp_adapt

from conftest import batches, learn_task, tiny_cnn


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16,
                             patch_size=8, depth=2, num_classes=5)


MODELS = {"cnn-batchnorm": (tiny_cnn, (3, 8, 8)), "vit": (_vit, (3, 16, 16))}


@pytest.fixture(params=list(MODELS))
def three_tasks(request):
    make, shape = MODELS[request.param]
    cl = halrp_adapt.attach(make(), budget=0.5)
    for i, (name, classes) in enumerate((("a", 3), ("b", 4), ("c", 2))):
        learn_task(cl, name, batches(n=2, shape=shape, classes=classes, seed=i),
                   num_classes=classes)
    return cl.eval(), shape


@pytest.mark.parametrize("strategy", ["grouped", "one-pass"])
def test_mixed_batch_equals_each_task_alone(three_tasks, strategy):
    cl, shape = three_tasks
    x = torch.randn(11, *shape)
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 2])
    active = cl.active_task
    with torch.no_grad():
        mixed = cl(x, task_ids=ids, strategy=strategy)
    assert cl.active_task == active  # routing restored
    assert all(m.row_routing is None for m in cl._routed())
    with torch.no_grad():
        assert mixed.shape == (11, 4)
        for index, name in enumerate(cl.tasks):
            rows = torch.nonzero(ids == index).squeeze(1)
            with cl.task(name):
                alone = cl(x[rows])  # the same samples, this task alone
                whole = cl(x)[rows]  # the whole batch through this task
            width = alone.shape[1]
            if strategy == "grouped":  # the very same computation as the task alone
                assert torch.equal(mixed[rows, :width], alone)
            torch.testing.assert_close(mixed[rows, :width], whole, atol=1e-5, rtol=1e-5)
            assert torch.isinf(mixed[rows, width:]).all()


def test_auto_is_one_pass_in_eval_and_grouped_in_train(three_tasks, monkeypatch):
    from halrp_adapt.handle import mixed

    cl, shape = three_tasks
    x, ids = torch.randn(6, *shape), torch.tensor([0, 1, 2, 0, 1, 2])
    used = []
    for way in ("_one_pass", "_grouped"):
        original = getattr(mixed, way)
        monkeypatch.setattr(mixed, way, lambda *a, _f=original, _w=way, **k: (used.append(_w),
                                                                                  _f(*a, **k))[1])
    with torch.no_grad():
        cl(x, task_ids=ids)
        assert used == ["_one_pass"]
        cl.train()
        cl(x, task_ids=ids)
        assert used == ["_one_pass", "_grouped"]
    cl.eval()


class _FoldsBatch(torch.nn.Module):
    """Runs its linear layer on (batch * 2, features): rows no longer map to samples."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 8)
        self.fc = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(x.reshape(-1, 4)).reshape(x.shape[0], 2, 8).mean(1)
        return self.fc(h)


def test_a_model_that_reshapes_the_batch_falls_back_to_grouped():
    torch.manual_seed(0)
    cl = halrp_adapt.attach(_FoldsBatch(), budget=0.9)
    for i, name in enumerate(("a", "b")):
        learn_task(cl, name, batches(n=1, shape=(2, 4), classes=3, seed=i), num_classes=3)
    cl.eval()
    x, ids = torch.randn(5, 2, 4), torch.tensor([0, 1, 1, 0, 1])
    with torch.no_grad():
        auto = cl(x, task_ids=ids)
        assert torch.equal(auto, cl(x, task_ids=ids, strategy="grouped"))
        with pytest.raises(ValueError, match="strategy='one-pass'` cannot run this model"):
            cl(x, task_ids=ids, strategy="one-pass")
    assert all(m.row_routing is None for m in cl._routed())  # cleared after the failure


def test_task_names_and_a_single_task(three_tasks):
    cl, shape = three_tasks
    x = torch.randn(3, *shape)
    with torch.no_grad():
        by_name = cl.forward_tasks(["b", "b", "b"], x)
        with cl.task("b"):
            assert torch.equal(by_name, cl(x))


@pytest.mark.parametrize("ids,message", [
    (torch.tensor([0, 1]), r"one entry per sample \(3\), got 2"),
    (torch.tensor([0, 1, 3]), r"`task_ids` must be in \[0, 3\)"),
    (["a", "zz", "a"], r"unknown tasks \['zz'\]; known tasks: \['a', 'b', 'c'\]"),
    (torch.tensor([0.0, 1.0, 2.0]), "must hold integer task indices or task names"),
])
def test_bad_task_ids(three_tasks, ids, message):
    cl, shape = three_tasks
    with pytest.raises((ValueError, TypeError), match=message):
        cl(torch.randn(3, *shape), task_ids=ids)
