"""The math against HALRP.md on small hand-checked examples."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from halrp_adapt.method.allocation import LayerSpectrum, budget_ranks, explained_ranks
from halrp_adapt.method.decompose import decompose, factors_from_svd, fit_scales, residual
from halrp_adapt.method.fisher import empirical_fisher
from halrp_adapt.method.losses import default_loss
from halrp_adapt.method.pruning import prune_, prune_threshold


def test_scales_fit_by_hand():
    w0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).unsqueeze(-1)
    w_free = torch.tensor([[2.0, 2.0], [9.0, 6.0]]).unsqueeze(-1)  # diag(2,3) W0 diag(1,.5)
    r, s = fit_scales(w_free, w0)
    # r_j = <Wf_j, W0_j> / ||W0_j||^2
    assert r.tolist() == pytest.approx([6 / 5, 51 / 25])
    # s_i = <r W0[:, i], Wf[:, i]> / ||r W0[:, i]||^2
    s0 = (1.2 * 1 * 2 + 2.04 * 3 * 9) / ((1.2 * 1) ** 2 + (2.04 * 3) ** 2)
    s1 = (1.2 * 2 * 2 + 2.04 * 4 * 6) / ((1.2 * 2) ** 2 + (2.04 * 4) ** 2)
    assert s.tolist() == pytest.approx([s0, s1])


def test_scales_recover_output_scaling_of_a_conv_kernel():
    w0 = torch.randn(6, 4, 9)
    r_true = torch.rand(6) + 0.5
    w_free = r_true[:, None, None] * w0
    r, s = fit_scales(w_free, w0)
    torch.testing.assert_close(r, r_true)
    torch.testing.assert_close(s, torch.ones(4))
    assert residual(w_free, w0, r, s).abs().max() < 1e-5


def test_scales_shrink_the_residual_of_a_two_sided_scaling():
    # The two least-squares steps (rows, then columns) are the reference's: an approximation
    # of a two-sided scaling, never worse than no scaling at all.
    w0 = torch.randn(6, 4, 9)
    w_free = (torch.rand(6) + 0.5)[:, None, None] * w0 * (torch.rand(4) + 0.5)[None, :, None]
    r, s = fit_scales(w_free, w0)
    fitted = (w_free - r[:, None, None] * w0 * s[None, :, None]).norm()
    assert fitted < 0.5 * (w_free - w0).norm()


def test_zero_rows_do_not_divide_by_zero():
    w0 = torch.zeros(3, 2, 1)
    r, s = fit_scales(torch.ones(3, 2, 1), w0)
    assert torch.isfinite(r).all() and torch.isfinite(s).all()


def test_grouped_scales_match_per_group_fits():
    groups, w0, w_free = 2, torch.randn(4, 3, 9), torch.randn(4, 3, 9)
    r, s = fit_scales(w_free, w0, groups=groups)
    for g in range(groups):
        rows = slice(2 * g, 2 * g + 2)
        r_g, s_g = fit_scales(w_free[rows], w0[rows])
        torch.testing.assert_close(r[rows], r_g)
        torch.testing.assert_close(s[3 * g:3 * g + 3], s_g)


def test_residual_averages_kernel_positions():
    w0, w_free = torch.zeros(2, 2, 4), torch.arange(16.0).view(2, 2, 4)
    d = residual(w_free, w0, torch.ones(2), torch.ones(2))
    torch.testing.assert_close(d, w_free.mean(-1))


def test_svd_factors_reproduce_the_residual():
    d = torch.randn(8, 5)
    spectrum = decompose(d, "full")
    A, B = factors_from_svd(spectrum, 5)
    torch.testing.assert_close(B @ A, d, atol=1e-5, rtol=1e-5)
    assert spectrum.energy == pytest.approx(float((spectrum.S ** 2).sum()), rel=1e-5)


def test_randomized_svd_keeps_leading_values_and_exact_energy():
    torch.manual_seed(0)
    d = torch.randn(300, 5) @ torch.randn(5, 200) + 1e-3 * torch.randn(300, 200)
    full, fast = decompose(d, "full"), decompose(d, "randomized", rank_cap=5)
    assert fast.S.numel() == 15
    torch.testing.assert_close(fast.S[:5], full.S[:5], rtol=1e-3, atol=1e-3)
    assert fast.energy == full.energy


def _layer(name, sigma, fisher, area=1, out=10, inp=10):
    return LayerSpectrum(name, torch.tensor(sigma), float(sum(v * v for v in sigma)), fisher,
                         area, out, inp)


def test_scores_order_and_explained_share():
    # scores: a = 1*[9, 1]; b = 2*[4] = [8]; c = area 4 * 0.5 * [1] = [2]; total 20
    layers = [_layer("a", [3.0, 1.0], 1.0), _layer("b", [2.0], 2.0),
              _layer("c", [1.0], 0.5, area=4)]
    # cumulative shares in score order 9, 8, 2, 1: 0.45, 0.85, 0.95, 1.0
    assert explained_ranks(layers, 0.80, 100) == {"a": 1, "b": 1, "c": 1}  # c clamped up to 1
    assert explained_ranks(layers, 0.90, 100) == {"a": 1, "b": 1, "c": 1}
    assert explained_ranks(layers, 0.96, 100) == {"a": 2, "b": 1, "c": 1}
    assert explained_ranks(layers, 0.96, 1) == {"a": 1, "b": 1, "c": 1}  # upper_rank


def test_explained_share_counts_fisher_not_just_sigma():
    # Same spectra; Fisher decides which layer gets the rank.
    layers = [_layer("a", [1.0, 0.9], 10.0), _layer("b", [1.0, 0.9], 0.1)]
    assert explained_ranks(layers, 0.9, 100) == {"a": 2, "b": 1}


def test_budget_takes_best_score_per_parameter():
    # a: cheap rows (cost 4), b: expensive (cost 100); caps would cost 3*4 + 3*100
    layers = [_layer("a", [3.0, 2.0, 1.0], 1.0, out=2, inp=2),
              _layer("b", [3.0, 2.5, 2.0], 1.0, out=50, inp=50)]
    caps = {"a": 3, "b": 3}
    assert budget_ranks(layers, caps, 1000) == caps  # fits: untouched
    # 120 params: rank 1 each (104), then a's next values (4 each) before any of b's
    assert budget_ranks(layers, caps, 120) == {"a": 3, "b": 1}
    assert budget_ranks(layers, caps, 50) == {"a": 3, "b": 0}


def test_prune_threshold_keeps_at_most_keep_entries():
    a, b = torch.tensor([0.5, -0.1, 0.0]), torch.tensor([[2.0, -0.3], [1e-6, 0.2]])
    t = prune_threshold([a, b], keep=3, floor=1e-5)
    assert prune_([a, b], t) == 3
    assert torch.equal(a != 0, torch.tensor([True, False, False]))
    assert torch.equal(b != 0, torch.tensor([[True, True], [False, False]]))


def test_prune_floor_applies_when_budget_is_loose():
    a = torch.tensor([1e-6, 2e-5, 1.0])
    assert prune_threshold([a], keep=10, floor=1e-5) == 1e-5
    assert prune_([a], 1e-5) == 2


def test_fisher_is_mean_squared_gradient_weighted_by_batch_size():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    data = [(torch.randn(3, 4), torch.tensor([0, 1, 2])), (torch.randn(2, 4), torch.tensor([1, 1]))]
    fisher = empirical_fisher(model, data, {"0": model[0].weight}, default_loss)
    expected = 0.0
    for x, y in data:
        w = model[0].weight.detach().clone().requires_grad_(True)
        loss = nn.functional.cross_entropy(x @ w.t() + model[0].bias.detach(), y)
        (g,) = torch.autograd.grad(loss, w)
        expected += float(g.pow(2).mean()) * len(x)
    assert fisher["0"] == pytest.approx(expected / 2)
