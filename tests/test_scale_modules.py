"""`scale_modules`: which adapted layers get the dense scales r and s."""

from __future__ import annotations

import pytest
import torch

import halrp_adapt

from conftest import batches, learn_pruned_task, outputs_of, tiny_cnn


def _learned(scale_modules, budget=0.5):
    cl = halrp_adapt.attach(tiny_cnn(), budget=budget, scale_modules=scale_modules)
    data = batches()
    learn_pruned_task(cl, "a", data, num_classes=3)
    return cl


def test_no_scales_puts_the_budget_into_the_factors():
    plain, unscaled = _learned(None), _learned([])
    for layer in unscaled.adapter_layers().values():
        assert "a" not in layer.halrp_r and "a" not in layer.halrp_s
    with_scales, without = plain.report().tasks["a"], unscaled.report().tasks["a"]
    assert with_scales.scale_params > 0 and without.scale_params == 0
    # What the scales no longer take is left to the factors, within the same budget.
    assert without.low_rank_params > with_scales.low_rank_params
    assert without.stored_params <= 0.5 * unscaled.backbone_params
    assert without.stored_params - without.low_rank_params == (
        with_scales.stored_params - with_scales.low_rank_params - with_scales.scale_params)


def test_some_layers_scaled_round_trip(tmp_path):
    cl = _learned(["3"])  # the second conv only
    scaled = [n for n, ly in cl.adapter_layers().items() if "a" in ly.halrp_r]
    assert scaled == ["3"]
    learn_pruned_task(cl, "b", batches(seed=2), num_classes=3)
    inputs = torch.randn(4, 3, 8, 8)
    before = outputs_of(cl, inputs)
    cl.save_pretrained(tmp_path)
    assert halrp_adapt.HalrpConfig.from_pretrained(tmp_path / "a").scale_modules == ["3"]
    loaded = halrp_adapt.load(tiny_cnn(), tmp_path)
    after = outputs_of(loaded, inputs)
    for name in ("a", "b"):
        assert torch.equal(after[name], before[name]), name
    assert [n for n, ly in loaded.adapter_layers().items() if "b" in ly.halrp_r] == ["3"]


def test_every_layer_scaled_is_saved_as_none(tmp_path):
    cl = _learned(None)
    cl.save_pretrained(tmp_path)
    assert halrp_adapt.HalrpConfig.from_pretrained(tmp_path / "a").scale_modules is None


@pytest.mark.parametrize(
    ("value", "exc", "match"),
    [
        (["nowhere"], ValueError, r"`scale_modules` entries \['nowhere'\] match no adapted layer"),
        ("([", ValueError, r"`scale_modules` '\(\[' is not a valid regex"),
        ("nothing", ValueError, r"`scale_modules` regex 'nothing' matches no adapted layer"),
        (3, TypeError, r"`scale_modules` must be None, a regex string or a list"),
    ],
)
def test_bad_scale_modules(value, exc, match):
    with pytest.raises(exc, match=match):
        halrp_adapt.attach(tiny_cnn(), budget=0.5, scale_modules=value)
