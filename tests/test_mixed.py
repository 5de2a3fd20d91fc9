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


def test_mixed_batch_equals_each_task_alone(three_tasks):
    cl, shape = three_tasks
    x = torch.randn(11, *shape)
    ids = torch.tensor([0, 2, 1, 1, 0, 2, 2, 0, 1, 0, 2])
    active = cl.active_task
    with torch.no_grad():
        mixed = cl(x, task_ids=ids)
    assert cl.active_task == active  # routing restored
    with torch.no_grad():
        assert mixed.shape == (11, 4)
        for index, name in enumerate(cl.tasks):
            rows = torch.nonzero(ids == index).squeeze(1)
            with cl.task(name):
                alone = cl(x[rows])  # the same samples, this task alone
                whole = cl(x)[rows]  # the whole batch through this task
            width = alone.shape[1]
            assert torch.equal(mixed[rows, :width], alone)
            torch.testing.assert_close(mixed[rows, :width], whole, atol=1e-5, rtol=1e-5)
            assert torch.isinf(mixed[rows, width:]).all()


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
