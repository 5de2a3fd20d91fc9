"""Rank estimation's paths: the low-rank trial (the default) and the full one, the Fisher from
the trial's own steps or a pass, truncated SVDs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import halrp_adapt
from halrp_adapt.handle import estimate as estimate_module
from halrp_adapt.method.fisher import TrialFisher, empirical_fisher
from halrp_adapt.method import trial as trial_module
from halrp_adapt.method.trial import trial_finetune

from conftest import batches


def _mlp(width: int = 96, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 4))


def _data(width: int = 96, n: int = 6):
    return batches(n=n, size=16, shape=(width,), classes=4, seed=3)


def test_trial_fisher_is_the_mean_over_the_last_fifth_of_steps():
    model, data = _mlp(16), _data(16, n=10)
    weights = {"0": model[0].weight, "2": model[2].weight}
    recorded = []

    def by_hand(step, batch):
        recorded.append({n: float(w.grad.pow(2).mean()) * batch[0].shape[0]
                         for n, w in weights.items()})

    start = {k: v.clone() for k, v in model.state_dict().items()}
    trial_finetune(model, data, _loss, epochs=1,
                   steps=None, lr=1e-3, after_backward=by_hand)
    expected = {n: (recorded[-2][n] + recorded[-1][n]) / 2 for n in weights}  # 20% of 10
    for total in (10, None):  # the length known up front, or not (every step measured)
        model.load_state_dict(start)
        fisher = TrialFisher(weights, total)
        trial_finetune(model, iter(data) if total is None else data, _loss, epochs=1,
                       steps=None, lr=1e-3,
                       after_backward=lambda s, b: fisher.after_backward(s, b[0].shape[0]))
        if total is not None:
            assert len(fisher.records) == 2  # only the window was measured
        for n in weights:
            assert fisher.result()[n] == pytest.approx(expected[n], rel=1e-5)


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def test_trial_fisher_runs_no_pass_and_the_pass_stays_an_option(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return empirical_fisher(*args, **kwargs)

    monkeypatch.setattr(trial_module, "empirical_fisher", counted)
    for fisher, expected_calls in (("trial", 0), ("pass", 1)):
        calls.clear()
        cl = halrp_adapt.attach(_mlp(), budget=0.5, fisher=fisher, trial="full")
        cl.add_task("a", num_classes=4)
        cl.estimate_ranks(_data(), steps=5)
        assert len(calls) == expected_calls
        result = cl._tasks["a"].estimate
        assert set(result.fisher) == {"0", "2"} and all(v > 0 for v in result.fisher.values())
    with pytest.warns(UserWarning, match="`fisher_data` is read only with fisher='pass'"):
        cl = halrp_adapt.attach(_mlp(), budget=0.5)
        cl.add_task("a", num_classes=4)
        cl.estimate_ranks(_data(), fisher_data=_data(), steps=2)


def test_the_low_rank_trial_measures_its_fisher_in_the_trial_or_a_pass(monkeypatch):
    calls = []
    real = estimate_module.dense_gradient_fisher_pass

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(estimate_module, "dense_gradient_fisher_pass", counted)
    fishers = {}
    for fisher, expected_calls in (("trial", 0), ("pass", 1)):
        calls.clear()
        cl = halrp_adapt.attach(_mlp(), budget=0.5, fisher=fisher)
        cl.add_task("a", num_classes=4)
        cl.estimate_ranks(_data(), steps=5)
        assert len(calls) == expected_calls
        fishers[fisher] = cl._tasks["a"].estimate.fisher
        assert set(fishers[fisher]) == {"0", "2"} and all(v > 0 for v in fishers[fisher].values())


def _ranks(**options):
    options.setdefault("trial", "full")  # the SVD options are the full trial's
    cl = halrp_adapt.attach(_mlp(), budget=1.0, upper_rank=4, **options)
    cl.add_task("a", num_classes=4)
    torch.manual_seed(5)
    cl.estimate_ranks(_data(), steps=6)
    return cl._tasks["a"].estimate


def test_truncated_svd_gives_the_full_svds_choice(monkeypatch):
    methods = []
    decompose = estimate_module.decompose

    def spy(d, method="full", **kwargs):
        methods.append(method)
        return decompose(d, method, **kwargs)

    monkeypatch.setattr(estimate_module, "decompose", spy)
    full = _ranks(svd="full")
    assert set(methods) == {"full"}
    methods.clear()
    # 4 + 10 triplets of 96: truncated; the choice takes few values, so none is completed
    fast = _ranks(svd="auto", randomized_min_dim=16, explained=0.3)
    assert methods == ["randomized"] * 2
    assert all(len(s) == 14 for s in fast.singular_values.values())
    exact = _ranks(svd="full", explained=0.3)
    assert fast.explained_ranks == exact.explained_ranks
    assert full.ranks  # the default explained share ran too
    methods.clear()
    # a share the truncated values cannot reach: every layer gets its whole spectrum
    completed = _ranks(svd="auto", randomized_min_dim=16, explained=0.999)
    assert methods == ["randomized"] * 2 + ["full"] * 2
    assert all(len(s) == 96 for s in completed.singular_values.values())
    assert completed.explained_ranks == _ranks(svd="full", explained=0.999).explained_ranks


def test_auto_keeps_the_full_svd_where_truncation_would_not_pay():
    assert estimate_module.svd_method("auto", 384, 256, 100) == "randomized"
    assert estimate_module.svd_method("auto", 200, 256, 100) == "full"  # narrow
    assert estimate_module.svd_method("auto", 384, 256, 300) == "full"  # cap near the width
    assert estimate_module.svd_method("full", 4096, 256, 100) == "full"
