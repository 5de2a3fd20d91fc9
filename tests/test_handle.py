"""The task life cycle on a plain CNN: trainability, regularisation, pruning, routing."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import halrp_adapt
from halrp_adapt import HalrpLayer
from halrp_adapt.adapters.norms import TaskNorm

from conftest import batches, learn_task, tiny_cnn, train_steps


def test_attach_wraps_layers_norms_and_head():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    assert cl.head_name == "11"
    assert list(cl.adapter_layers()) == ["0", "3", "8"]
    assert list(cl.task_norms()) == ["1", "4", "9"]
    assert all(not p.requires_grad for p in cl.parameters())


def test_only_the_open_task_trains():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    data = batches()
    learn_task(cl, "a", data, num_classes=3)
    cl.add_task("b", num_classes=4)
    cl.estimate_ranks(data, steps=1)
    trainable = {id(p) for p in cl.trainable_parameters()}
    expected = set()
    for module in cl.model.modules():
        if hasattr(module, "task_parameters"):
            expected |= {id(p) for p in module.task_parameters("b")}
            assert not any(id(p) in trainable for p in module.task_parameters("a"))
    assert trainable == expected and trainable
    cl.end_task()
    assert cl.trainable_parameters() == []


def test_regularization_matches_the_formula():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5, l1=1e-3, wd=1e-2)
    cl.add_task("a", num_classes=3)
    cl.estimate_ranks(batches(), steps=1)
    l1 = wd = 0.0
    for layer in cl.adapter_layers().values():
        for d in (layer.halrp_r, layer.halrp_s, layer.halrp_A, layer.halrp_B):
            if "a" in d:
                wd += float(d["a"].detach().pow(2).sum())
        for d in (layer.halrp_A, layer.halrp_B):
            if "a" in d:
                l1 += float(d["a"].detach().abs().sum())
    assert cl.regularization_loss().item() == pytest.approx(1e-3 * l1 + 1e-2 * wd / 2, rel=1e-5)


def test_estimate_ranks_starts_from_the_trial_function():
    torch.manual_seed(0)
    cl = halrp_adapt.attach(tiny_cnn(), budget=1.0, explained=1.0, upper_rank=100)
    data = batches(n=3)
    cl.add_task("a", num_classes=3)
    result_ranks = cl.estimate_ranks(data, steps=3)
    # with explained=1 every layer keeps its full rank, so the task equals the trial model
    # except for the conv residual's spread over kernel positions
    linear = cl.adapter_layers()["8"]
    assert result_ranks["8"] == min(linear.out_features, linear.in_features)
    estimate = cl._tasks["a"].estimate
    assert set(estimate.fisher) == {"0", "3", "8"} and all(v > 0 for v in estimate.fisher.values())


def test_old_tasks_are_bit_identical_after_later_tasks():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    x = torch.randn(6, 3, 8, 8)
    outputs = {}
    for i, name in enumerate(["a", "b", "c"]):
        learn_task(cl, name, batches(seed=i), num_classes=3 + i)
        cl.eval()
        with cl.task(name):
            outputs[name] = cl(x)
    cl.eval()
    for name, before in outputs.items():
        with cl.task(name):
            assert torch.equal(cl(x), before)


def test_finished_task_norms_stay_frozen_in_train_mode():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(cl, "a", batches(), num_classes=3)
    norm = cl.task_norms()["1"].halrp_norm["a"]
    stats = norm.running_mean.clone()
    cl.train()
    with cl.task("a"):
        cl(torch.randn(4, 3, 8, 8) * 5 + 3)
    assert torch.equal(norm.running_mean, stats)


def test_merge_equals_adapted_for_every_task():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    for name in ["a", "b"]:
        learn_task(cl, name, batches(), num_classes=3)
    x = torch.randn(4, 3, 8, 8)
    cl.eval()
    for name in cl.tasks:
        plain = cl.merge(name).eval()
        assert not any(isinstance(m, (HalrpLayer, TaskNorm)) for m in plain.modules())
        with cl.task(name):
            torch.testing.assert_close(plain(x), cl(x), atol=1e-5, rtol=1e-5)


def test_set_task_and_context_manager():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(cl, "a", batches(), num_classes=3)
    cl.set_task(None)
    assert cl.active_task is None
    with cl.task("a"):
        assert cl.active_task == "a" and cl(torch.randn(1, 3, 8, 8)).shape == (1, 3)
    assert cl.active_task is None
    assert cl(torch.randn(1, 3, 8, 8)).shape == (1, 5)  # the backbone's own head


@pytest.mark.parametrize("budget", [0.01, 0.05, 0.2])
def test_budget_holds(budget):
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    cl = halrp_adapt.attach(model, budget=budget, explained=1.0)
    data = batches(n=2, size=4, shape=(3, 32, 32), classes=4)
    cl.add_task("a", num_classes=4)
    ranks = cl.estimate_ranks(data, steps=2, lr=1e-2)
    assert cl.report().tasks["a"].growth <= budget
    # training makes the factors dense; pruning must bring the task back under budget
    with torch.no_grad():
        for layer in cl.adapter_layers().values():
            for d in (layer.halrp_A, layer.halrp_B):
                if "a" in d:
                    d["a"].add_(torch.randn_like(d["a"]))
    stats = cl.end_task()
    assert 0 < stats.growth <= budget
    assert sum(ranks.values()) > 0


def test_budget_steers_ranks_up_front():
    model = timm.create_model("resnet18", pretrained=False, num_classes=4)
    data = batches(n=2, size=4, shape=(3, 32, 32), classes=4)
    chosen = {}
    for budget in (0.01, 0.2):
        torch.manual_seed(0)
        cl = halrp_adapt.attach(timm.create_model("resnet18", pretrained=False, num_classes=4),
                                budget=budget, explained=1.0)
        cl.add_task("a", num_classes=4)
        chosen[budget] = sum(cl.estimate_ranks(data, steps=2, lr=1e-2).values())
    assert chosen[0.01] < chosen[0.2]
    del model


def test_train_base_first_task_trains_the_backbone():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5, train_base=True)
    data = batches()
    cl.add_task("base", num_classes=3)
    conv = cl.adapter_layers()["0"]
    assert conv.weight.requires_grad and "base" not in conv.halrp_r
    with pytest.raises(RuntimeError, match="train_base"):
        cl.estimate_ranks(data)
    before = conv.weight.detach().clone()
    wd = float(sum(l.weight.detach().pow(2).sum() for l in cl.adapter_layers().values()))
    assert float(cl.regularization_loss()) == pytest.approx(cl.config.wd * wd / 2, rel=1e-5)
    train_steps(cl, data, steps=2)
    cl.end_task()
    assert not torch.equal(conv.weight, before) and not conv.weight.requires_grad
    x = torch.randn(3, 3, 8, 8)
    cl.eval()
    with cl.task("base"):
        base_out = cl(x)
    learn_task(cl, "next", data, num_classes=3)
    assert "next" in conv.halrp_r and conv.rank("next") >= 1
    cl.eval()
    with cl.task("base"):
        assert torch.equal(cl(x), base_out)


def test_report_counts_and_table():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(cl, "a", batches(), num_classes=3)
    report = cl.report()
    stats = report.tasks["a"]
    layers = cl.adapter_layers()
    assert stats.scale_params == sum(l.out_features + l.in_features for l in layers.values())
    assert stats.bias_params == sum(l.base_layer.bias.numel() for l in layers.values())
    assert stats.norm_params == 2 * 8 + 2 * 8 + 2 * 16 + 2 * 16 + 2 * 32  # BN: affine + stats
    assert stats.head_params == 32 * 3 + 3
    assert stats.growth == pytest.approx(stats.stored_params / report.backbone_params)
    assert report.backbone_params == sum(p.numel() for p in tiny_cnn().parameters()) - 32 * 5 - 5
    assert "a" in str(report) and report.ranks()["8"]["a"] == stats.ranks["8"]


def test_handle_moves_with_to_and_keeps_state_dict_keys():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    learn_task(cl, "a", batches(), num_classes=3)
    keys = cl.state_dict().keys()
    assert any(k.endswith(("halrp_A.a", "halrp_A_values.a")) for k in keys)
    assert any(k.endswith("halrp_head.a.weight") for k in keys)
    assert any(k.endswith("halrp_norm.a.running_mean") for k in keys)
    cl.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in cl.parameters())


def test_user_registered_layer_type():
    class ScaledLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 6))
            self.bias = nn.Parameter(torch.zeros(4))

        def forward(self, x):
            return nn.functional.linear(x, self.weight, self.bias)

    model = nn.Sequential(ScaledLinear(), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no adaptable layer"):
        halrp_adapt.attach(model, budget=0.9)
    halrp_adapt.register_layer_type(ScaledLinear, halrp_adapt.HalrpLinear)
    cl = halrp_adapt.attach(model, budget=0.9)
    assert list(cl.adapter_layers()) == ["0"]


def test_target_and_exclude_modules():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5, target_modules=["0", "8"])
    assert list(cl.adapter_layers()) == ["0", "8"]
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5, target_modules=r"\d")
    assert list(cl.adapter_layers()) == ["0", "3", "8"]
    with pytest.raises(ValueError, match=r"entry '1' matches only .*BatchNorm2d"):
        halrp_adapt.attach(tiny_cnn(), budget=0.5, target_modules=["0", "1"])
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5, exclude_modules=["3"])
    assert list(cl.adapter_layers()) == ["0", "8"]
