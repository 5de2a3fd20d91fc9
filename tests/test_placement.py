"""Budget placement: a task's scales, biases and norm copies compete with its factors' ranks."""

from __future__ import annotations

import pytest
import torch

import halrp_adapt
from halrp_adapt.method.allocation import DensePart, LayerSpectrum, budget_placement

from conftest import batches, learn_task, outputs_of, tiny_cnn, train_steps


def test_placement_keeps_everything_that_fits_and_takes_the_best_gain_per_parameter():
    layer = LayerSpectrum("fc", torch.tensor([3.0, 2.0, 1.0]), 14.0, 1.0, 1, 4, 4)
    parts = [DensePart("bias:fc", 4, 1.0), DensePart("norm:ln", 8, 100.0)]
    assert budget_placement([layer], {"fc": 3}, parts, 36) == (
        {"fc": 3}, {"bias:fc", "norm:ln"})
    # densities: norm 12.5, rank 1 9/8, rank 2 4/8, bias 1/4, rank 3 1/8
    ranks, kept = budget_placement([layer], {"fc": 3}, parts, 20)
    assert ranks == {"fc": 1} and kept == {"norm:ln", "bias:fc"}  # rank 2 does not fit: bias does
    ranks, kept = budget_placement([layer], {"fc": 3}, parts, 26)
    assert ranks == {"fc": 2} and kept == {"norm:ln"}  # 2 left: the bias (4) does not fit


@pytest.mark.parametrize("trial", ["low-rank", "full"])
def test_a_budget_below_the_papers_floor_works_and_holds(trial):
    """At a budget below every scale, bias and norm together, a task keeps the parts with the
    most gain per parameter, stores at most the budget, and leaves older tasks bit-identical;
    a saved task without some parts loads back to the same outputs."""
    with pytest.raises(ValueError, match="placement='paper'"):
        halrp_adapt.attach(tiny_cnn(), budget=0.01, placement="paper").add_task("a")
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.01, trial=trial)
    data = batches()
    learn_task(cl, "a", data, num_classes=3)
    x = data[0][0]
    before = outputs_of(cl, x)["a"]
    learn_task(cl, "b", batches(seed=2), num_classes=4)
    assert torch.equal(outputs_of(cl, x)["a"], before)
    for name in ("a", "b"):
        stats = cl.task_stats(name)
        assert stats.stored_params <= 0.01 * cl.backbone_params
        parts = cl._tasks[name].estimate.parts
        assert any(parts.values()) and not all(parts.values())
    # a part not kept is the backbone's own: no tensor stored, the base module runs
    kept = cl._tasks["b"].estimate.parts
    for part, is_kept in kept.items():
        kind, _, module = part.partition(":")
        if kind == "norm":
            assert ("b" in cl.task_norms()[module].halrp_norm) == is_kept
        elif kind == "bias":
            assert ("b" in cl.adapter_layers()[module].halrp_bias) == is_kept
        else:
            assert ("b" in cl.adapter_layers()[module].halrp_r) == is_kept
    # the plain merged model of a task gives its outputs
    plain = cl.merge("b").eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), outputs_of(cl, x)["b"], atol=1e-5)


def test_a_task_with_dropped_parts_saves_and_loads_to_the_same_outputs(tmp_path):
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.01)
    data = batches()
    learn_task(cl, "a", data, num_classes=3)
    learn_task(cl, "b", batches(seed=2), num_classes=4)
    config = cl.task_config("b")
    assert config.norm_modules is not None or config.bias_modules is not None \
        or config.scale_modules is not None  # something was left to the backbone
    x = data[0][0]
    expected = outputs_of(cl, x)
    cl.save_pretrained(tmp_path / "shelf")
    loaded = halrp_adapt.load(tiny_cnn(), tmp_path / "shelf")
    got = outputs_of(loaded, x)
    for name in ("a", "b"):
        assert torch.equal(got[name], expected[name])
    assert loaded.task_stats("b").stored_params == cl.task_stats("b").stored_params


def test_mixed_batches_route_rows_of_a_task_without_its_own_norms():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.01)
    learn_task(cl, "a", batches(), num_classes=3)
    learn_task(cl, "b", batches(seed=2), num_classes=3)
    x = batches(n=1)[0][0]
    alone = outputs_of(cl, x)
    cl.eval()
    with torch.no_grad():
        mixed = cl(x, task_ids=["a", "b"] * (len(x) // 2))
    assert torch.allclose(mixed[0::2], alone["a"][0::2], atol=1e-5)
    assert torch.allclose(mixed[1::2], alone["b"][1::2], atol=1e-5)


def test_a_task_ended_without_estimation_is_fitted_to_its_budget():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.01)
    cl.add_task("a", num_classes=3)
    data = batches()
    train_steps(cl, data, steps=2)
    stats = cl.end_task(calibration_data=data)
    assert stats.stored_params <= 0.01 * cl.backbone_params and stats.stored_params > 0


def test_the_papers_placement_keeps_every_part():
    cl = halrp_adapt.attach(tiny_cnn(), budget=0.5, placement="paper")
    learn_task(cl, "a", batches(), num_classes=3)
    stats = cl.task_stats("a")
    assert stats.norm_params == sum(
        sum(t.numel() for t in n.halrp_norm["a"].state_dict().values() if t.is_floating_point())
        for n in cl.task_norms().values())
    assert all("a" in ly.halrp_r for ly in cl.adapter_layers().values())
    assert cl._tasks["a"].estimate.parts == {}


def test_batchnorm_copies_are_kept_all_or_none_when_the_task_is_added():
    """A task copies every BatchNorm (statistics and affine) or none, decided before it trains:
    its trial then learns on the network it keeps. Without copies it runs the backbone's
    frozen statistics, the trial's automatic rate is the frozen-statistics one, and the
    backbone's running statistics never move."""
    from halrp_adapt.handle.placement import STATISTICS_SHARE, statistics_norms
    from halrp_adapt.method.trial import LOW_RANK_TRIAL_LRS

    small = halrp_adapt.attach(tiny_cnn(), budget=0.01)
    bn_names = statistics_norms(small)
    cost = sum(4 * small.task_norms()[n].base_layer.num_features for n in bn_names)
    assert len(bn_names) == 2 and cost > STATISTICS_SHARE * 0.01 * small.backbone_params
    base_stats = {n: small.task_norms()[n].base_layer.running_mean.clone() for n in bn_names}
    small.add_task("a", num_classes=3)
    assert not any("a" in small.task_norms()[n].halrp_norm for n in bn_names)
    assert "a" in small.task_norms()["9"].halrp_norm  # the LayerNorm competes after the trial
    data = batches()
    small.estimate_ranks(data)
    assert small._tasks["a"].estimate.trial_lr == LOW_RANK_TRIAL_LRS["cnn-frozen-statistics"]
    assert not any(p.startswith("norm:1") or p.startswith("norm:4")
                   for p in small._tasks["a"].estimate.parts)
    train_steps(small, data, steps=2)
    small.end_task(calibration_data=data)
    for n in bn_names:
        assert torch.equal(small.task_norms()[n].base_layer.running_mean, base_stats[n])
    assert small.task_config("a").norm_modules in (["9"], [])

    large = halrp_adapt.attach(tiny_cnn(), budget=0.5)
    large.add_task("a", num_classes=3)
    assert all("a" in large.task_norms()[n].halrp_norm for n in bn_names)
    large.estimate_ranks(data)
    assert large._tasks["a"].estimate.trial_lr == LOW_RANK_TRIAL_LRS["cnn"]
