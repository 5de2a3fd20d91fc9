"""Task-agnostic inference: task signatures, predict_tasks, task_ids="auto", files."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import halrp_adapt
from halrp_adapt.cli import main as cli_main
from halrp_adapt.files.storage import EVIDENCE_NAME, SIGNATURE_NAME
from halrp_adapt.files.verify import verify_shelf
from halrp_adapt.handle import task_retrieval
from halrp_adapt.method.task_evidence import TaskEvidence
from halrp_adapt.method.task_signature import (
    PrototypeScorer,
    SignatureAccumulator,
    oas_shrinkage,
    shrunk_precision,
)

CENTRES = {"a": 4.0, "b": -4.0, "c": 0.0}


def _net(norm: bool = False) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(6, 24)]
    if norm:
        layers.append(nn.BatchNorm1d(24))
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 3))


def _task_data(task: str, n: int = 96, seed: int = 0) -> TensorDataset:
    """Two classes per task; the tasks sit apart in input space, the classes within a task
    differ in their first coordinate."""
    g = torch.Generator().manual_seed(seed + hash(task) % 1000)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 6, generator=g) * 0.5 + CENTRES[task]
    x[:, 0] += 2.0 * y - 1.0
    return TensorDataset(x, y)


def _learn(cl: halrp_adapt.HalrpModel, task: str, calibrate: bool = True, epochs: int = 5):
    cl.add_task(task, num_classes=2)
    data = _task_data(task)
    optimizer = torch.optim.Adam(cl.trainable_parameters(), lr=1e-2)
    loader = DataLoader(data, batch_size=32, shuffle=True)
    cl.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = nn.functional.cross_entropy(cl(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    cl.end_task(calibration_data=DataLoader(data, batch_size=32) if calibrate else None)
    return data


def _learned(tasks=("a", "b", "c"), **attach) -> halrp_adapt.HalrpModel:
    cl = halrp_adapt.attach(_net(attach.pop("norm", False)), budget=0.9, **attach)
    for task in tasks:
        _learn(cl, task)
    return cl.eval()


def _test_batch(tasks=("a", "b", "c")) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xs, ys, ts = [], [], []
    for index, task in enumerate(tasks):
        x, y = _task_data(task, n=40, seed=7).tensors
        xs.append(x)
        ys.append(y)
        ts.append(torch.full_like(y, index))
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


# ---- the statistics --------------------------------------------------------------------------
def test_signature_sums_match_direct_statistics():
    x = torch.randn(50, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    acc = SignatureAccumulator()
    acc.update(x[:20], y[:20])
    acc.update(x[20:], y[20:])
    acc.update(x[:5], torch.full((5,), -100))  # ignored rows
    sig = acc.finish("backbone")
    for c in range(3):
        rows = x[y == c]
        assert sig.counts[c] == len(rows)
        torch.testing.assert_close(sig.means[c].double(), rows.mean(0), rtol=1e-5, atol=1e-6)
    centred = x - sig.means.double()[y]
    torch.testing.assert_close(sig.scatter.double(), centred.T @ centred, rtol=1e-4, atol=1e-4)


def test_scores_order_prototypes_as_mahalanobis_distance():
    sigs = []
    for shift in (0.0, 3.0):
        acc = SignatureAccumulator()
        acc.update(
            torch.randn(80, 5) * torch.tensor([1, 2, 3, 1, 1.0]) + shift, torch.arange(80) % 4
        )
        sigs.append(acc.finish("backbone"))
    scorer = PrototypeScorer(sigs, shrinkage=0.1)
    scatter = sigs[0].scatter.double() + sigs[1].scatter.double()
    precision = shrunk_precision(scatter, 160, 8, 0.1)
    means = torch.cat([s.means for s in sigs]).double()
    x = torch.randn(30, 5) + 1.5
    diff = x.double().unsqueeze(1) - means.unsqueeze(0)
    distance = torch.einsum("bcd,de,bce->bc", diff, precision, diff)
    assert torch.equal(scorer.class_scores(x).argmax(1), distance.argmin(1))
    assert torch.equal(scorer.predict_tasks(x), distance.argmin(1) // 4)


def test_oas_shrinks_more_with_fewer_samples():
    cov = torch.diag(torch.tensor([4.0, 1.0, 0.5, 0.25], dtype=torch.float64))
    few, many = oas_shrinkage(cov, 5), oas_shrinkage(cov, 5000)
    assert 0.0 <= many < few <= 1.0
    assert oas_shrinkage(torch.eye(4, dtype=torch.float64), 10) == 1.0


# ---- the handle ------------------------------------------------------------------------------
def test_auto_routing_finds_tasks_and_gives_a_global_class_space():
    cl = _learned()
    x, y, t = _test_batch()
    with torch.no_grad():
        predicted = cl.predict_tasks(x)
        assert (predicted == t).float().mean() > 0.95
        assert cl.class_offsets() == {"a": (0, 2), "b": (2, 2), "c": (4, 2)}
        logits = cl(x, task_ids="auto")
        assert logits.shape == (len(x), 6)
        per_task = cl.forward_tasks(predicted, x)
    for row in range(len(x)):
        start = 2 * int(predicted[row])
        torch.testing.assert_close(logits[row, start : start + 2], per_task[row, :2])
        outside = torch.ones(6, dtype=torch.bool)
        outside[start : start + 2] = False
        assert torch.isinf(logits[row, outside]).all()
    # right exactly when the task is found and the task's own head is right
    with torch.no_grad():
        oracle = cl.forward_tasks(t, x).argmax(1) == y
    assert torch.equal(logits.argmax(1) == 2 * t + y, (predicted == t) & oracle)


def test_task_log_posterior_sums_each_tasks_class_posteriors():
    a, b = SignatureAccumulator(), SignatureAccumulator()
    a.update(torch.randn(64, 3), torch.randint(0, 2, (64,)))
    b.update(torch.randn(64, 3) + 3, torch.randint(0, 3, (64,)))
    scorer = PrototypeScorer([a.finish("backbone"), b.finish("backbone")])
    x = torch.randn(5, 3) * 2
    log_tasks = scorer.task_log_posterior(x)
    post = torch.softmax(0.5 * scorer.class_scores(x).double(), 1)
    expected = torch.stack([post[:, scorer.owners == t].sum(1) for t in (0, 1)], 1)
    torch.testing.assert_close(log_tasks.exp(), expected)
    far = scorer.task_log_posterior(torch.full((1, 3), 1e4))  # one task's posterior underflows
    assert torch.isfinite(far).any() and not torch.isnan(far).any()


def test_retrieval_candidates_check_the_top_tasks_with_their_own_evidence():
    cl = _learned()  # default: 2 candidates, so each task keeps its evidence
    assert cl.config.candidates == 2 and all(cl.task_evidence(t) for t in cl.tasks)
    x, y, t = _test_batch()
    with torch.no_grad():
        cl.config.retrieval_candidates = 1
        one = cl(x, task_ids="auto")
        cl.config.retrieval_candidates, cl.config.retrieval_check_below = 2, 2.0  # check all
        two = cl(x, task_ids="auto")
        ids, posterior, logits, evidence = task_retrieval.candidate_logits(
            cl, 2, x, check_below=2.0
        )
        assert ids.shape == posterior.shape == evidence.shape == (len(x), 2)
        assert logits.shape == (len(x), 2, 2) and (posterior[:, 0] >= posterior[:, 1]).all()
        # each candidate's logits are that task's own forward, its evidence that task's
        # z-scores of its own head and own features
        for column in range(2):
            torch.testing.assert_close(logits[:, column], cl.forward_tasks(ids[:, column], x))
            for index, name in enumerate(cl.tasks):
                rows = ids[:, column] == index
                if rows.any():
                    own = task_retrieval.head_features(cl, name, x[rows])
                    with cl.task(name):
                        expected = cl.task_evidence(name).score(own, cl(x[rows]))
                    # one pass vs a plain forward: float rounding, scaled by 1 / spread
                    torch.testing.assert_close(
                        evidence[rows, column], expected.to(evidence), rtol=1e-3, atol=1e-3
                    )
        # the answer is the candidate with the best log posterior + weight x evidence
        score = posterior + task_retrieval.EVIDENCE_WEIGHT * evidence
        chosen = ids.gather(1, score.argmax(1, keepdim=True)).squeeze(1)
        for row in range(len(x)):
            start = 2 * int(chosen[row])
            torch.testing.assert_close(
                two[row, start : start + 2], logits[row, score[row].argmax()]
            )
            assert torch.isinf(two[row]).sum() == 4
        hit = two.argmax(1) == 2 * t + y
        assert hit.any() and (chosen[hit] == t[hit]).all()  # right only through the right task
        # inputs sure of their first task run through it alone: check_below=0 is k=1
        cl.config.retrieval_check_below = 0.0
        torch.testing.assert_close(cl(x, task_ids="auto"), one)
        _, _, logits, evidence = task_retrieval.candidate_logits(cl, 2, x, check_below=0.0)
        assert torch.isinf(evidence[:, 1]).all() and torch.isinf(logits[:, 1]).all()


def test_routed_features_are_each_task_own_on_both_mixed_paths():
    cl = _learned()
    x, _, t = _test_batch()
    ids = torch.tensor([(i + 1) % 3 for i in t.tolist()])  # every row through another task
    with torch.no_grad():
        for training in (False, True):  # one pass in eval mode, grouped in train mode
            cl.train(training)
            features, logits = task_retrieval.routed_features(cl, ids, x, fill_value=-1.0)
            torch.testing.assert_close(logits, cl.forward_tasks(ids, x, fill_value=-1.0))
            for index, name in enumerate(cl.tasks):
                rows = ids == index
                expected = task_retrieval.head_features(cl, name, x[rows])
                torch.testing.assert_close(features[rows], expected)


def test_evidence_is_standardised_on_held_out_data():
    cl = halrp_adapt.attach(_net(), budget=0.9)
    train = _learn(cl, "a")
    held_out = DataLoader(_task_data("a", n=64, seed=3), batch_size=32)
    evidence = task_retrieval.compute_evidence(cl, "a", DataLoader(train, batch_size=32), held_out)
    x, _ = _task_data("a", n=64, seed=3).tensors
    with torch.no_grad(), cl.task("a"):
        z = evidence.score(task_retrieval.head_features(cl, "a", x), cl(x))
    # on the held-out data itself each z-score has mean 0 (their sum too)
    assert abs(float(z.mean())) < 1e-6
    assert evidence.signature.features == "task" and evidence.signature.num_samples == 96
    # the default calibration (the training batches) gives other moments
    assert cl.task_evidence("a").distance_moments != evidence.distance_moments


def test_evidence_is_saved_and_old_shelves_route_as_before(tmp_path):
    cl = _learned()
    cl.save_pretrained(tmp_path / "shelf")
    assert (tmp_path / "shelf" / "a" / EVIDENCE_NAME).exists()
    assert verify_shelf(tmp_path / "shelf").ok
    x, _, _ = _test_batch()
    back = halrp_adapt.load(_fresh_like(cl), tmp_path / "shelf").eval()
    for name in cl.tasks:
        saved, loaded = cl.task_evidence(name), back.task_evidence(name)
        assert loaded is not None and loaded.confidence_moments == saved.confidence_moments
        assert torch.equal(loaded.signature.means, saved.signature.means)
    with torch.no_grad():
        torch.testing.assert_close(back(x, task_ids="auto"), cl(x, task_ids="auto"))
        cl.config.retrieval_candidates = 1
        before = cl(x, task_ids="auto")
    # a shelf saved before evidence existed: routed by the frozen features alone, with a warning
    for name in cl.tasks:
        (tmp_path / "shelf" / name / EVIDENCE_NAME).unlink()
    old = halrp_adapt.load(_fresh_like(cl), tmp_path / "shelf").eval()
    assert old.config.candidates == 2 and old.task_evidence("a") is None
    with pytest.warns(UserWarning, match="add_evidence"), torch.no_grad():
        torch.testing.assert_close(old(x, task_ids="auto"), before)
    # add_evidence gives it back, from the task's data
    for name in old.tasks:
        old.add_evidence(name, DataLoader(_task_data(name), batch_size=32))
    with pytest.raises(ValueError, match="already has evidence"):
        old.add_evidence("a", DataLoader(_task_data("a"), batch_size=32))
    with torch.no_grad():
        torch.testing.assert_close(old(x, task_ids="auto"), back(x, task_ids="auto"))


def test_evidence_that_does_not_fit_is_refused():
    cl = _learned(tasks=("a",))
    tensors = cl.task_evidence("a").to_tensors()
    with pytest.raises(ValueError, match="distance_moments"):
        TaskEvidence.from_tensors(
            {k: v for k, v in tensors.items() if k != "distance_moments"}, source="x"
        )
    with pytest.raises(ValueError, match="not a task signature"):
        TaskEvidence.from_tensors({**tensors, "own_means": torch.zeros(3)}, source="x")


def test_retrieval_candidates_option_is_checked():
    with pytest.raises(ValueError, match="retrieval_candidates"):
        halrp_adapt.attach(_net(), budget=0.9, retrieval_candidates=0)
    with pytest.raises(ValueError, match="task_signature='backbone'"):
        halrp_adapt.attach(_net(), budget=0.9, retrieval_candidates=2, task_signature="task")
    with pytest.raises(ValueError, match="retrieval_check_below"):
        halrp_adapt.attach(_net(), budget=0.9, retrieval_check_below=-0.5)
    assert halrp_adapt.attach(_net(), budget=0.9, task_signature="task").config.candidates == 1
    one = _learned(tasks=("a",), retrieval_candidates=1)
    assert one.task_evidence("a") is None  # no candidates to check: nothing stored


def test_signature_comes_from_frozen_features_and_leaves_outputs_alone():
    cl = _learned(tasks=("a",))
    x, _, _ = _test_batch(("a",))
    with torch.no_grad(), cl.task("a"):
        before = cl(x).clone()
    cl.add_task("b", num_classes=2)
    cl.end_task(calibration_data=DataLoader(_task_data("b"), batch_size=32))
    with torch.no_grad(), cl.task("a"):
        assert torch.equal(cl(x), before)
    sig = cl.task_signature("b")
    assert sig is not None and sig.features == "backbone" and sig.dim == 16
    assert sig.counts.sum() == 96
    # "backbone" features are the same whatever task is active
    data = DataLoader(_task_data("b"), batch_size=32)
    acc = SignatureAccumulator()
    plain = cl.model
    with torch.no_grad(), cl.task(None):
        for xb, yb in data:
            acc.update(plain[:-1](xb), yb)
    torch.testing.assert_close(acc.finish("backbone").means, sig.means)


def test_per_task_feature_design_and_one_shot_iterator_with_batch_norm():
    cl = halrp_adapt.attach(_net(norm=True), budget=0.9, task_signature="task")
    for task in ("a", "b"):
        cl.add_task(task, num_classes=2)
        data = _task_data(task)
        running = [m for m in cl.modules() if isinstance(m, nn.BatchNorm1d)]
        cl.end_task(calibration_data=iter(DataLoader(data, batch_size=32)))
        sig = cl.task_signature(task)
        assert sig is not None and sig.features == "task" and sig.num_samples == 96
        assert running  # the norm copies exist, and both passes saw the batches
    x, _, t = _test_batch(("a", "b"))
    with torch.no_grad():
        assert (cl.eval().predict_tasks(x) == t).float().mean() > 0.9


def test_no_signature_option_and_headless_models():
    cl = halrp_adapt.attach(_net(), budget=0.9, task_signature=None)
    cl.add_task("a", num_classes=2)
    cl.end_task(calibration_data=DataLoader(_task_data("a"), batch_size=32))
    assert cl.task_signature("a") is None
    with pytest.raises(ValueError, match=r"tasks \['a'\] have no task signature"):
        cl.predict_tasks(torch.randn(2, 6))
    with pytest.raises(ValueError, match="task_signature"):
        halrp_adapt.attach(_net(), budget=0.9, task_signature="pixels")


def test_task_without_signature_beside_ones_with_it(tmp_path):
    cl = halrp_adapt.attach(_net(), budget=0.9)
    _learn(cl, "a")
    _learn(cl, "b", calibrate=False)
    with pytest.raises(
        ValueError, match=r"tasks \['b'\] have no task signature.*with one: \['a'\]"
    ):
        cl.predict_tasks(torch.randn(2, 6))
    with pytest.raises(ValueError, match="no task signature"):
        cl(torch.randn(2, 6), task_ids="auto")
    with pytest.raises(ValueError, match="already has a signature"):
        cl.add_signature("a", DataLoader(_task_data("a"), batch_size=32))
    cl.add_signature("b", DataLoader(_task_data("b"), batch_size=32))
    cl.eval()
    x, _, t = _test_batch(("a", "b"))
    with torch.no_grad():
        assert (cl.predict_tasks(x) == t).float().mean() > 0.9


def test_signature_saved_loaded_inspected_and_verified(tmp_path, capsys):
    cl = _learned()
    cl.save_pretrained(tmp_path / "shelf")
    for task in cl.tasks:
        assert (tmp_path / "shelf" / task / SIGNATURE_NAME).is_file()
    x, _, t = _test_batch()
    with torch.no_grad():
        expected = cl(x, task_ids="auto")
    back = halrp_adapt.load(_fresh_like(cl), tmp_path / "shelf").eval()
    with torch.no_grad():
        assert torch.equal(back(x, task_ids="auto"), expected)
    # a subset retrieves among that subset only
    subset = halrp_adapt.load(_fresh_like(cl), tmp_path / "shelf", tasks=["b", "c"]).eval()
    with torch.no_grad():
        assert set(subset.predict_tasks(x).tolist()) <= {0, 1}
        assert subset(x, task_ids="auto").shape == (len(x), 4)
    assert cli_main(["inspect", str(tmp_path / "shelf"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    sig = report["tasks"]["a"]["signature"]
    assert sig["features"] == "backbone" and sig["dim"] == 16 and sig["prototypes"] == 2
    weights = (tmp_path / "shelf" / "a" / "adapter_model.safetensors").stat().st_size
    evidence = report["tasks"]["a"]["evidence_bytes"]
    assert evidence == (tmp_path / "shelf" / "a" / EVIDENCE_NAME).stat().st_size
    assert report["tasks"]["a"]["bytes"] >= weights + sig["bytes"] + evidence
    assert verify_shelf(tmp_path / "shelf").problems == []
    path = tmp_path / "shelf" / "a" / SIGNATURE_NAME
    path.write_bytes(path.read_bytes()[:-8] + b"\x7f" * 8)
    assert any(SIGNATURE_NAME in p for p in verify_shelf(tmp_path / "shelf").problems)


def test_a_task_saved_without_signature_loaded_beside_ones_with_it(tmp_path):
    cl = halrp_adapt.attach(_net(), budget=0.9)
    _learn(cl, "a")
    _learn(cl, "b", calibrate=False)
    cl.save_pretrained(tmp_path / "shelf")
    assert not (tmp_path / "shelf" / "b" / SIGNATURE_NAME).exists()
    back = halrp_adapt.load(_fresh_like(cl), tmp_path / "shelf")
    with torch.no_grad(), back.task("b"):
        back(torch.randn(2, 6))  # task-incremental use still works
    with pytest.raises(ValueError, match=r"tasks \['b'\] have no task signature"):
        back.predict_tasks(torch.randn(2, 6))
    only_a = halrp_adapt.load(_fresh_like(cl), tmp_path / "shelf", tasks=["a"])
    assert only_a.predict_tasks(torch.randn(2, 6)).tolist() == [0, 0]


def test_features_of_the_wrong_size_are_refused():
    acc = SignatureAccumulator()
    acc.update(torch.randn(10, 5), torch.arange(10) % 2)
    scorer = PrototypeScorer([acc.finish("backbone")])
    with pytest.raises(ValueError, match=r"\(batch, 5\)"):
        scorer.predict_tasks(torch.randn(3, 7))
    with pytest.raises(ValueError, match="labels for"):
        acc.update(torch.randn(4, 5), torch.zeros(3, dtype=torch.long))


def _fresh_like(cl: halrp_adapt.HalrpModel) -> nn.Module:
    """The backbone `cl` was attached to, as a new plain module with the same weights."""
    torch.manual_seed(0)
    fresh = _net()
    state = {
        k.replace(".base_layer", ""): v
        for k, v in cl.model.state_dict().items()
        if "halrp_" not in k
    }
    fresh.load_state_dict(state)
    return fresh


def test_compressed_scatter_keeps_the_diagonal_and_round_trips(tmp_path):
    acc = SignatureAccumulator()
    acc.update(torch.randn(200, 12) @ torch.randn(12, 12), torch.arange(200) % 3)
    whole = acc.finish("backbone")
    cut = whole.compressed(4)
    assert cut.rank == 4 and cut.scatter is None and cut.nbytes < whole.nbytes
    rebuilt = cut.scatter_matrix()
    torch.testing.assert_close(
        torch.diagonal(rebuilt), torch.diagonal(whole.scatter_matrix()), rtol=1e-5, atol=1e-4
    )
    # the eigenpairs carry the off-diagonal structure: closer than the diagonal alone, and
    # a covariance still (no negative eigenvalue)
    exact = whole.scatter_matrix()
    off = ~torch.eye(12, dtype=torch.bool)
    assert (rebuilt - exact)[off].norm() < 0.5 * exact[off].norm()
    assert torch.linalg.eigvalsh(rebuilt).min() > -1e-6
    assert whole.compressed(None) is whole and whole.compressed(11) is whole  # nothing smaller
    back = type(cut).from_tensors(cut.to_tensors(), "backbone", source="test")
    assert torch.equal(back.basis, cut.basis) and back.rank == 4
    with pytest.raises(ValueError, match="not a task signature"):
        type(cut).from_tensors(
            {**cut.to_tensors(), "diagonal": torch.zeros(5)}, "backbone", source="test"
        )
    with pytest.raises(ValueError, match="lacks"):
        type(cut).from_tensors(
            {"counts": cut.counts, "means": cut.means}, "backbone", source="test"
        )


def test_signature_rank_option_sets_what_a_task_stores(tmp_path):
    cl = halrp_adapt.attach(_net(), budget=0.9, signature_rank=2)
    _learn(cl, "a")
    sig = cl.task_signature("a")
    assert sig is not None and sig.rank == 2 and sig.basis.shape == (2, 16)
    cl.save_pretrained(tmp_path / "shelf")
    back = halrp_adapt.load(_fresh_like(cl), tmp_path / "shelf")
    assert back.task_signature("a").rank == 2
    with pytest.raises(ValueError, match="`signature_rank` must be >= 1"):
        halrp_adapt.attach(_net(), budget=0.9, signature_rank=0)


def test_token_labels_give_one_prototype_and_a_bad_batch_never_loses_the_task():
    cl = halrp_adapt.attach(_net(), budget=0.9)
    cl.add_task("lm", num_classes=2)
    x = torch.randn(8, 6)
    cl.end_task(calibration_data=[(x, torch.zeros(8, 5, dtype=torch.long))])  # 5 per sample
    sig = cl.task_signature("lm")
    assert sig is not None and sig.counts.tolist() == [8.0]
    cl.add_task("odd", num_classes=2)
    batches = [(x, torch.zeros(8, dtype=torch.long)), (x, torch.zeros(3, dtype=torch.long))]
    with pytest.warns(UserWarning, match="ended without a task signature.*3 labels for 8"):
        cl.end_task(calibration_data=batches)
    assert "odd" in cl.tasks and cl.task_signature("odd") is None
    assert not cl.open_task  # finished all the same
