"""Bad input gets a clear error naming the argument and what is allowed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import halrp_adapt

from conftest import batches, tiny_cnn


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan")])
def test_budget_out_of_range(budget):
    with pytest.raises(ValueError, match=r"`budget` must be in \(0.0, 1.0\]"):
        halrp_adapt.attach(tiny_cnn(), budget=budget)


def test_budget_of_wrong_type():
    with pytest.raises(TypeError, match="`budget` must be a number"):
        halrp_adapt.attach(tiny_cnn(), budget="5%")


def test_budget_below_the_fixed_cost_of_a_task_with_the_papers_placement():
    with pytest.raises(ValueError, match=r"`budget`=0.001 allows .* placement='paper'; use "
                       r"budget >= 0\.\d+"):
        halrp_adapt.attach(tiny_cnn(), budget=0.001, placement="paper")


def test_budget_below_the_cheapest_part_names_the_smallest_that_works():
    with pytest.raises(ValueError, match=r"`budget`=1e-05 allows .* smallest budget that works "
                       r"here is 0\.\d+") as err:
        halrp_adapt.attach(tiny_cnn(), budget=1e-5)
    smallest = float(str(err.value).rsplit(" ", 1)[-1].rstrip("."))
    halrp_adapt.attach(tiny_cnn(), budget=smallest).add_task("a", num_classes=3)


def test_placement_must_be_known():
    with pytest.raises(ValueError, match=r"`placement` must be one of \('budget', 'paper'\)"):
        halrp_adapt.attach(tiny_cnn(), placement="greedy")


def test_no_adaptable_layer():
    model = nn.Sequential(nn.Embedding(10, 4), nn.ReLU())
    with pytest.raises(ValueError, match="no adaptable layer found.*Linear"):
        halrp_adapt.attach(model)


def test_target_entry_matching_nothing():
    with pytest.raises(ValueError, match=r"`target_modules` entries \['qkv'\] match no module"):
        halrp_adapt.attach(tiny_cnn(), target_modules=["0", "qkv"])


def test_exclude_entry_matching_nothing():
    with pytest.raises(ValueError, match=r"`exclude_modules` regex 'nothing.*' matches no"):
        halrp_adapt.attach(tiny_cnn(), exclude_modules="nothing.*")


def test_invalid_regex():
    with pytest.raises(ValueError, match="`target_modules` .* is not a valid regex"):
        halrp_adapt.attach(tiny_cnn(), target_modules="(")


def test_unknown_option():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['rank'\]; allowed options"):
        halrp_adapt.attach(tiny_cnn(), rank=4)


@pytest.mark.parametrize("option,value,message", [
    ("svd", "qr", r"`svd` must be one of \('auto', 'full', 'randomized'\)"),
    ("explained", 1.2, r"`explained` must be in \(0.0, 1.0\]"),
    ("upper_rank", 0, "`upper_rank` must be >= 1"),
    ("l1", -1.0, r"`l1` must be in \[0.0, inf\)"),
    ("trial_epochs", 1.5, "`trial_epochs` must be an int"),
    ("target_modules", 3, "`target_modules` must be None, a regex string or a list"),
    ("head_module", "nope", "`head_module` 'nope' is not a module of the model"),
])
def test_bad_options(option, value, message):
    with pytest.raises((ValueError, TypeError), match=message):
        halrp_adapt.attach(tiny_cnn(), **{option: value})


def test_attach_twice():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    with pytest.raises(ValueError, match="already has HALRP adapters"):
        halrp_adapt.attach(cl.model)


def test_not_a_module():
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        halrp_adapt.attach("resnet18")


@pytest.fixture
def cl():
    return halrp_adapt.attach(tiny_cnn(), budget=0.5)


def test_unknown_task_name(cl):
    cl.add_task("a", num_classes=3)
    with pytest.raises(ValueError, match=r"unknown task 'b'; known tasks: \['a'\]"):
        cl.set_task("b")
    with pytest.raises(ValueError, match="unknown task 'b'"):
        cl.merge("b")
    with pytest.raises(ValueError, match="unknown task 'b'"):
        with cl.task("b"):
            pass


def test_add_task_with_an_existing_name(cl):
    cl.add_task("a", num_classes=3)
    cl.end_task()
    before = cl.state_dict()
    with pytest.raises(ValueError, match=r"task 'a' already exists; existing tasks: \['a'\]"):
        cl.add_task("a")
    after = cl.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_add_task_while_another_is_open(cl):
    cl.add_task("a", num_classes=3)
    with pytest.raises(RuntimeError, match="task 'a' is still in training: call end_task"):
        cl.add_task("b")


@pytest.mark.parametrize("name", ["a/b", "..", "a.b", "", "x\x00", 3])
def test_bad_task_names(cl, name):
    with pytest.raises(ValueError, match="task name must be 1-128 characters of letters"):
        cl.add_task(name)
    assert cl.tasks == []


@pytest.mark.parametrize("num_classes", [0, -2, 2.5, True])
def test_bad_num_classes(cl, num_classes):
    with pytest.raises(ValueError, match="`num_classes` must be an int >= 1 or None"):
        cl.add_task("a", num_classes=num_classes)
    assert cl.tasks == []


def test_estimate_ranks_before_add_task(cl):
    with pytest.raises(RuntimeError, match=r"estimate_ranks\(\) needs a task in training: "
                                           r"call add_task\(name\) first"):
        cl.estimate_ranks(batches())


def test_end_task_and_regularization_without_a_task(cl):
    with pytest.raises(RuntimeError, match=r"end_task\(\) needs a task in training"):
        cl.end_task()
    with pytest.raises(RuntimeError, match=r"regularization_loss\(\) needs a task"):
        cl.regularization_loss()


def test_estimate_ranks_on_empty_data(cl):
    cl.add_task("a", num_classes=3)
    with pytest.raises(ValueError, match="the trial data yielded no batch"):
        cl.estimate_ranks([])


def test_default_loss_on_unknown_batch(cl):
    cl.add_task("a", num_classes=3)
    with pytest.raises(TypeError, match=r"batches `\(inputs, labels\)` or dicts"):
        cl.estimate_ranks([torch.randn(2, 3, 8, 8)])
    with pytest.raises(ValueError, match="a dict batch needs one of the keys"):
        cl.estimate_ranks([{"x": torch.randn(2, 3, 8, 8)}])
