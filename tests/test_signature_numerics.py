"""Task signatures from degenerate features: the eigen-decomposition never fails a task.

On one machine LAPACK's `eigh` failed to converge on a nearly all-zero scatter
(tests/test_benchmarks.py::test_class_incremental_quick); end_task then raised after training,
with the task half ended. `symmetric_eigh` scales, retries and falls back; a signature that
still cannot be made is a warning and the task ends complete.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import halrp_adapt
from halrp_adapt.method import task_signature
from halrp_adapt.method.task_signature import SignatureAccumulator, symmetric_eigh


def _psd(d: int, rank: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(d, rank, generator=g, dtype=torch.float64)
    return scale * (f @ f.T)


@pytest.mark.parametrize(
    "matrix",
    [
        torch.zeros(5, 5, dtype=torch.float64),
        _psd(6, 1, 1.0),  # rank 1
        _psd(6, 6, 1e-30),  # nearly all zero
        _psd(6, 6, 1e30),
        _psd(8, 8, 1.0) + torch.diag(torch.logspace(-14, 2, 8, dtype=torch.float64)),
    ],
    ids=["zero", "rank-1", "tiny", "huge", "ill-conditioned"],
)
def test_symmetric_eigh_rebuilds_degenerate_scatters(matrix):
    values, vectors = symmetric_eigh(matrix)
    rebuilt = (vectors * values) @ vectors.T
    scale = max(float(matrix.abs().max()), 1e-300)
    assert torch.allclose(rebuilt / scale, matrix / scale, atol=1e-9)
    assert torch.allclose(vectors.T @ vectors, torch.eye(len(values), dtype=torch.float64),
                          atol=1e-9)


def test_symmetric_eigh_falls_back_when_lapack_fails(monkeypatch):
    def no_convergence(*args, **kwargs):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", no_convergence)
    matrix = _psd(6, 3, 2.0)
    values, vectors = symmetric_eigh(matrix)
    assert torch.allclose((vectors * values) @ vectors.T, matrix, atol=1e-9)
    monkeypatch.setattr(torch.linalg, "svd", no_convergence)
    values, vectors = symmetric_eigh(matrix)  # numpy's eigh is the last way
    assert torch.allclose((vectors * values) @ vectors.T, matrix, atol=1e-9)


def test_symmetric_eigh_refuses_non_finite_matrices():
    with pytest.raises(ValueError, match="NaN or inf"):
        symmetric_eigh(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 80), nn.ReLU(), nn.Linear(80, 80), nn.ReLU(),
                         nn.Linear(80, 2))


def _end_with(features: torch.Tensor, labels: torch.Tensor, **attach):
    """A task whose head sees `features`: the backbone maps every input to them (its last
    hidden layer is replaced by constants through a zero weight and a bias)."""
    net = _net()
    with torch.no_grad():
        net[2].weight.zero_()
    cl = halrp_adapt.attach(net, budget=0.9, signature_rank=4, **attach)
    cl.add_task("t", num_classes=2)
    with torch.no_grad():
        net[2].base_layer.bias.copy_(features)
    data = [(torch.randn(len(labels), 4), labels)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cl.end_task(calibration_data=data)
    return cl, [str(w.message) for w in caught]


def test_constant_features_end_the_task_with_a_signature():
    cl, caught = _end_with(torch.full((80,), 0.5), torch.tensor([0, 1, 0, 1, 1]))
    assert not any("signature" in m for m in caught)
    signature = cl.task_signature("t")
    assert signature is not None and signature.rank == 4
    assert float(signature.spectrum.abs().max()) == 0.0  # no spread: a zero scatter


def test_one_sample_per_class_ends_the_task_with_a_signature():
    cl, _ = _end_with(torch.linspace(-1, 1, 80), torch.tensor([0, 1]))
    signature = cl.task_signature("t")
    assert signature is not None and signature.counts.tolist() == [1.0, 1.0]
    assert cl.predict_tasks(torch.randn(3, 4)).tolist() == [0, 0, 0]


def test_rank_one_features():
    acc = SignatureAccumulator()
    direction = torch.randn(80)
    acc.update(torch.outer(torch.randn(50), direction), torch.randint(0, 3, (50,)))
    signature = acc.finish("backbone").compressed(4)
    assert signature.rank == 4 and torch.isfinite(signature.basis).all()


def test_a_signature_that_cannot_be_made_leaves_the_task_ended(monkeypatch):
    def broken(matrix):
        raise RuntimeError("something unforeseen in the signature")

    monkeypatch.setattr(task_signature, "symmetric_eigh", broken)
    cl, caught = _end_with(torch.linspace(-1, 1, 80), torch.tensor([0, 1, 1, 0]))
    assert any("ended without a task signature (something unforeseen" in m for m in caught)
    assert cl.open_task is None and cl._tasks["t"].finished
    assert cl.task_signature("t") is None
    assert not any(p.requires_grad for p in cl.parameters())
    cl.add_task("next", num_classes=2)  # the life cycle goes on


def test_non_finite_features_warn_and_the_task_ends():
    features = torch.linspace(-1, 1, 80)
    features[3] = float("inf")
    cl, caught = _end_with(features, torch.tensor([0, 1, 1, 0]))
    assert any("ended without a task signature" in m for m in caught)
    assert cl._tasks["t"].finished and cl.task_signature("t") is None
