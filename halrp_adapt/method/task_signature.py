"""Task signatures: what a finished task keeps of its data's features so that a later input's
task can be found without the task's name and without stored samples.

A signature holds, for the features a task's data produces (the classifier head's input), each
class's sample count and mean, and the within-class scatter `sum (x - mu_y)(x - mu_y)^T` over
the task's samples. Classes of different tasks are disjoint, so the within-class scatter of any
set of tasks is the sum of theirs: a covariance shared by whatever tasks are loaded comes from
their signatures alone, and retrieval among a subset of tasks uses that subset only.

Scoring is linear discriminant analysis on prototypes: with a shared covariance S, shrunk
towards a scaled identity by the Oracle Approximating Shrinkage rule (Chen et al., 2010; it
needs only S and the sample count), each prototype c scores `2 mu_c' P x - mu_c' P mu_c`
(P = S^-1), which orders prototypes as the Mahalanobis distance does. A sample's task is the
task of its best prototype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import SIGNATURE_CHOICES

SIGNATURE_FEATURES = tuple(c for c in SIGNATURE_CHOICES if c is not None)


@dataclass(frozen=True)
class TaskSignature:
    """One task's class counts, class means and within-class scatter of its features.

    `features` says which features they are: "backbone" (the frozen backbone's, the same for
    every task) or "task" (the task's own adapted features). The scatter is kept whole
    (`scatter`, D x D) or, from `compressed(rank)`, as its leading eigenvectors and eigenvalues
    plus its exact diagonal (`basis`, `spectrum`, `diagonal`: (rank + 1) * D numbers instead of
    D * D), which is what a task stores by default for wide features.

    Example:
        >>> acc = SignatureAccumulator()
        >>> acc.update(torch.tensor([[0.0, 1.0], [2.0, 1.0], [5.0, 5.0]]), torch.tensor([0, 0, 1]))
        >>> sig = acc.finish("backbone")
        >>> sig.counts.tolist(), sig.means[0].tolist(), sig.dim
        ([2.0, 1.0], [1.0, 1.0], 2)
    """

    features: str
    counts: Tensor  # (C,) float64: samples per class (0 for a class the data never showed)
    means: Tensor  # (C, D)
    scatter: Tensor | None = None  # (D, D) within-class scatter, summed over samples
    basis: Tensor | None = None  # (k, D): the scatter's leading eigenvectors, as rows
    spectrum: Tensor | None = None  # (k,): their eigenvalues
    diagonal: Tensor | None = None  # (D,): the scatter's diagonal

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    @property
    def rank(self) -> int | None:
        """Rank of the kept scatter summary (None: the whole matrix)."""
        return None if self.basis is None else int(self.basis.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def scatter_matrix(self) -> Tensor:
        """The within-class scatter (D, D) in float64: as kept, or rebuilt from its leading
        eigenpairs with the rest of each diagonal entry added back on the diagonal."""
        if self.scatter is not None:
            return self.scatter.double()
        assert self.basis is not None and self.spectrum is not None and self.diagonal is not None
        basis = self.basis.double()
        low = (basis.T * self.spectrum.double()) @ basis
        rest = (self.diagonal.double() - torch.diagonal(low)).clamp(min=0)
        return low + torch.diag(rest)

    def compressed(self, rank: int | None) -> TaskSignature:
        """This signature with its scatter cut to `rank` eigenpairs plus its diagonal (itself
        when `rank` is None or keeps nothing smaller)."""
        if rank is None or self.scatter is None or (rank + 1) * self.dim >= self.dim**2:
            return self
        values, vectors = symmetric_eigh(self.scatter.double())
        top = values.argsort(descending=True)[:rank]
        return TaskSignature(
            self.features,
            self.counts,
            self.means,
            basis=vectors[:, top].T.float().contiguous(),
            spectrum=values[top].clamp(min=0).float(),
            diagonal=torch.diagonal(self.scatter).float().clone(),
        )

    def to_tensors(self) -> dict[str, Tensor]:
        parts = {
            "counts": self.counts,
            "means": self.means,
            "scatter": self.scatter,
            "basis": self.basis,
            "spectrum": self.spectrum,
            "diagonal": self.diagonal,
        }
        return {k: v for k, v in parts.items() if v is not None}

    @classmethod
    def from_tensors(
        cls, tensors: Mapping[str, Tensor], features: str, source: str
    ) -> TaskSignature:
        """Rebuild a signature from its saved tensors, refusing shapes that do not fit."""
        full = "scatter" in tensors
        need = {"counts", "means"} | ({"scatter"} if full else {"basis", "spectrum", "diagonal"})
        missing = sorted(need - set(tensors))
        if missing:
            raise ValueError(f"{source}: the task signature lacks {missing}.")
        counts, means = tensors["counts"], tensors["means"]
        c, d = (means.shape[0], means.shape[1]) if means.dim() == 2 else (-1, -1)
        if full:
            fits = tensors["scatter"].shape == (d, d)
        else:
            k = tensors["basis"].shape[0] if tensors["basis"].dim() == 2 else -1
            fits = (
                tensors["basis"].shape == (k, d)
                and tensors["spectrum"].shape == (k,)
                and tensors["diagonal"].shape == (d,)
                and k >= 1
            )
        if features not in SIGNATURE_FEATURES or counts.shape != (c,) or not fits or min(c, d) < 1:
            shapes = {k: tuple(v.shape) for k, v in tensors.items()}
            raise ValueError(
                f"{source}: not a task signature (features {features!r}, shapes {shapes}; "
                "expected counts (C,), means (C, D), and scatter (D, D) or basis (k, D), "
                "spectrum (k,), diagonal (D,))."
            )
        parts = {k: tensors[k].float() for k in need - {"counts", "means"}}
        return cls(features, counts.double(), means.float(), **parts)


class SignatureAccumulator:
    """Running sums of features by label, in float64, for one task's signature.

    Rows whose label is negative (e.g. an ignore index of -100) are skipped; without labels,
    the whole task is one prototype.
    """

    def __init__(self) -> None:
        self._sums: Tensor | None = None  # (C, D) float64
        self._counts: Tensor | None = None  # (C,)
        self._second: Tensor | None = None  # (D, D) float64: sum of x x'

    def update(self, features: Tensor, labels: Tensor | None) -> None:
        x = features.detach().to("cpu", torch.float64)
        if x.dim() != 2:
            raise ValueError(f"features must be (batch, dim), got {tuple(x.shape)}.")
        if labels is None:
            y = torch.zeros(x.shape[0], dtype=torch.long)
        else:
            y = labels.detach().to("cpu").reshape(-1).long()
            if y.numel() != x.shape[0]:
                raise ValueError(
                    f"the calibration batch has {y.numel()} labels for {x.shape[0]} samples: "
                    "a task signature needs one class label per sample."
                )
            keep = y >= 0
            x, y = x[keep], y[keep]
        if x.shape[0] == 0:
            return
        if self._sums is None:
            d = x.shape[1]
            self._sums = x.new_zeros(0, d)
            self._counts = x.new_zeros(0)
            self._second = x.new_zeros(d, d)
        assert self._counts is not None and self._second is not None
        if x.shape[1] != self._sums.shape[1]:
            raise ValueError(
                f"features changed width within one task ({self._sums.shape[1]} then {x.shape[1]})."
            )
        classes = int(y.max()) + 1
        if classes > self._sums.shape[0]:
            grow = classes - self._sums.shape[0]
            self._sums = torch.cat([self._sums, x.new_zeros(grow, x.shape[1])])
            self._counts = torch.cat([self._counts, x.new_zeros(grow)])
        self._sums.index_add_(0, y, x)
        self._counts.index_add_(0, y, torch.ones_like(y, dtype=x.dtype))
        self._second += x.T @ x

    def finish(self, features: str) -> TaskSignature:
        if self._sums is None or self._counts is None or self._second is None:
            raise ValueError("no sample reached the task signature (empty data or all labels < 0).")
        counts = self._counts
        means = self._sums / counts.clamp(min=1).unsqueeze(1)
        # sum (x - mu_y)(x - mu_y)' = sum x x' - sum_c n_c mu_c mu_c'
        scatter = self._second - (means.T * counts) @ means
        scatter = (scatter + scatter.T) / 2
        return TaskSignature(features, counts, means.float(), scatter=scatter.float())


def symmetric_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors (as columns) of a symmetric matrix, robust to what a
    task's features can give: LAPACK's `eigh` can fail to converge on a nearly all-zero or
    ill-conditioned scatter (seen on one machine and not another of the same kind).

    The matrix is scaled to unit largest entry first (undone on the eigenvalues); an all-zero
    matrix has eigenvalues 0 and the identity as eigenvectors. If `eigh` still fails, it is
    retried with a tiny diagonal jitter, then replaced by an SVD (for the positive
    semi-definite scatters here its singular vectors are the eigenvectors), then by numpy's
    `eigh`. Raises ValueError for a matrix with NaN or inf, or if every way fails.

    >>> values, vectors = symmetric_eigh(torch.zeros(3, 3, dtype=torch.float64))
    >>> values.tolist(), bool((vectors == torch.eye(3, dtype=torch.float64)).all())
    ([0.0, 0.0, 0.0], True)
    """
    if not torch.isfinite(matrix).all():
        raise ValueError("the scatter matrix has NaN or inf entries (non-finite features)")
    matrix = (matrix + matrix.T) / 2
    scale = float(matrix.abs().max()) if matrix.numel() else 0.0
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    if scale == 0.0:
        return torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device), eye
    unit = matrix / scale
    attempts = (
        lambda: torch.linalg.eigh(unit),
        lambda: _jittered(torch.linalg.eigh(unit + 1e-10 * eye), 1e-10),
        lambda: _svd_as_eigh(unit),
        lambda: _numpy_eigh(unit),
    )
    failures = []
    for attempt in attempts:
        try:
            values, vectors = attempt()
        except (RuntimeError, ValueError, ArithmeticError) as err:  # LinAlgError is a RuntimeError
            failures.append(f"{type(err).__name__}: {err}")
            continue
        if torch.isfinite(values).all() and torch.isfinite(vectors).all():
            return values * scale, vectors
        failures.append("non-finite result")
    raise ValueError(f"no eigen-decomposition of the scatter succeeded ({'; '.join(failures)})")


def _jittered(result: tuple[Tensor, Tensor], jitter: float) -> tuple[Tensor, Tensor]:
    values, vectors = result
    return values - jitter, vectors


def _svd_as_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    u, singular, _ = torch.linalg.svd(matrix)
    return singular, u


def _numpy_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
    import numpy as np

    values, vectors = np.linalg.eigh(matrix.detach().cpu().numpy())
    return (
        torch.from_numpy(values).to(matrix.device, matrix.dtype),
        torch.from_numpy(vectors).to(matrix.device, matrix.dtype),
    )


def oas_shrinkage(covariance: Tensor, samples: int) -> float:
    """Oracle Approximating Shrinkage weight towards `trace/D * I` (Chen et al., 2010), from a
    covariance estimate and the number of samples behind it; in [0, 1]."""
    d = covariance.shape[0]
    trace = float(torch.diagonal(covariance).sum())
    trace_sq = float((covariance * covariance).sum())  # trace(S @ S) for a symmetric S
    numerator = (1 - 2 / d) * trace_sq + trace**2
    denominator = (samples + 1 - 2 / d) * (trace_sq - trace**2 / d)
    if denominator <= 0:
        return 1.0
    return float(min(1.0, max(0.0, numerator / denominator)))


def shrunk_precision(
    scatter: Tensor, samples: int, classes: int, shrinkage: float | None
) -> Tensor:
    """The inverse of the within-class covariance `scatter / (samples - classes)`, shrunk by
    `shrinkage` (None: the OAS weight) towards a scaled identity, in float64."""
    dof = max(samples - classes, 1)
    covariance = scatter.double() / dof
    d = covariance.shape[0]
    weight = oas_shrinkage(covariance, dof) if shrinkage is None else shrinkage
    level = float(torch.diagonal(covariance).mean())
    level = level if level > 0 else 1.0
    target = torch.eye(d, dtype=torch.float64, device=covariance.device) * level
    shrunk = (1 - weight) * covariance + weight * target
    shrunk += torch.eye(d, dtype=torch.float64, device=covariance.device) * (1e-6 * level)
    return torch.cholesky_inverse(torch.linalg.cholesky(shrunk))


class PrototypeScorer:
    """Scores features against the class prototypes of several tasks.

    With `shared=True` (backbone features) every task's prototypes live in one feature space
    and share one covariance, pooled from the tasks given; `class_scores` then ranks all their
    classes at once. With `shared=False` (each task's own features) each task keeps its own
    covariance and `task_scores` takes one feature batch per task, adding each task's
    log-determinant so that Gaussian log-likelihoods compare across tasks.

    Example:
        >>> a, b = SignatureAccumulator(), SignatureAccumulator()
        >>> a.update(torch.randn(64, 3), torch.randint(0, 2, (64,)))
        >>> b.update(torch.randn(64, 3) + 8, torch.randint(0, 2, (64,)))
        >>> scorer = PrototypeScorer([a.finish("backbone"), b.finish("backbone")])
        >>> scorer.predict_tasks(torch.tensor([[0.0, 0.0, 0.0], [8.0, 8.0, 8.0]])).tolist()
        [0, 1]
    """

    def __init__(
        self,
        signatures: Sequence[TaskSignature],
        shared: bool = True,
        shrinkage: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if not signatures:
            raise ValueError("task retrieval needs at least one task signature.")
        dims = {s.dim for s in signatures}
        if shared and len(dims) > 1:
            raise ValueError(f"the task signatures have features of different widths: {dims}.")
        if shrinkage is not None and not 0 <= shrinkage <= 1:
            raise ValueError(f"`shrinkage` must be None or in [0, 1], got {shrinkage}.")
        self.shared = shared
        self.dims = [s.dim for s in signatures]
        weights, biases, owners = [], [], []
        if shared:
            samples = sum(s.num_samples for s in signatures)
            classes = sum(int((s.counts > 0).sum()) for s in signatures)
            scatter = sum((s.scatter_matrix() for s in signatures), torch.zeros(1))
            precisions = [shrunk_precision(scatter, samples, classes, shrinkage)] * len(signatures)
            log_dets = [0.0] * len(signatures)
        else:
            precisions, log_dets = [], []
            for s in signatures:
                classes = int((s.counts > 0).sum())
                precision = shrunk_precision(s.scatter_matrix(), s.num_samples, classes, shrinkage)
                precisions.append(precision)
                log_dets.append(-float(torch.linalg.slogdet(precision)[1]))
        for index, (s, precision, log_det) in enumerate(
            zip(signatures, precisions, log_dets, strict=True)
        ):
            present = s.counts > 0
            means = s.means[present].double()
            projected = means @ precision  # (C, D): P mu_c (P is symmetric)
            weights.append(projected)
            biases.append(-(projected * means).sum(1) - log_det)
            owners.append(torch.full((means.shape[0],), index, dtype=torch.long))
        self.class_index = [torch.nonzero(s.counts > 0).squeeze(1) for s in signatures]
        self._weights = [w.float() for w in weights]
        self._biases = [b.float() for b in biases]
        self._precisions = [p.float() for p in precisions] if not shared else []
        self.owners = torch.cat(owners)
        if shared:
            self._all_weights = torch.cat(self._weights)
            self._all_biases = torch.cat(self._biases)
        if device is not None:
            self.to(device)

    def to(self, device: torch.device | str) -> PrototypeScorer:
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        self._weights, self._biases = move(self._weights), move(self._biases)
        self._precisions = move(self._precisions)
        self.owners = self.owners.to(device)
        if self.shared:
            self._all_weights = self._all_weights.to(device)
            self._all_biases = self._all_biases.to(device)
        return self

    def _check_width(self, features: Tensor, index: int = 0) -> None:
        if features.dim() != 2 or features.shape[1] != self.dims[index]:
            raise ValueError(
                f"features of shape {tuple(features.shape)} do not fit the task signatures, "
                f"made from {self.dims[index]}-wide features (batch, {self.dims[index]})."
            )

    def class_scores(self, features: Tensor) -> Tensor:
        """(batch, prototypes) scores of the prototypes of every task, in task order (shared
        covariance only); higher is closer."""
        if not self.shared:
            raise RuntimeError("class_scores needs a shared feature space (shared=True).")
        self._check_width(features)
        x = features.to(self._all_weights.dtype)
        return 2 * x @ self._all_weights.T + self._all_biases

    def task_scores(self, features: Sequence[Tensor] | Tensor) -> Tensor:
        """(batch, tasks): each task's best prototype score. With shared features pass one
        batch; with per-task features one batch per task, in task order."""
        if self.shared:
            assert isinstance(features, Tensor)
            scores = self.class_scores(features)
            best = scores.new_full((scores.shape[0], len(self._weights)), float("-inf"))
            return best.scatter_reduce(
                1, self.owners.expand_as(scores), scores, reduce="amax", include_self=True
            )
        if isinstance(features, Tensor) or len(features) != len(self._weights):
            raise ValueError("per-task scoring needs one feature batch per task, in task order.")
        columns = []
        for index, x in enumerate(features):
            self._check_width(x, index)
            x = x.to(self._weights[index].dtype)
            quadratic = ((x @ self._precisions[index]) * x).sum(1, keepdim=True)
            scores = 2 * x @ self._weights[index].T + self._biases[index] - quadratic
            columns.append(scores.max(1).values)
        return torch.stack(columns, 1)

    def task_log_posterior(self, features: Tensor) -> Tensor:
        """(batch, tasks): log p(task | x) in a shared feature space, the classes' posterior
        (softmax of score / 2, the Gaussian log-likelihood up to a term every class shares)
        summed over each task's classes."""
        log_post = torch.log_softmax(0.5 * self.class_scores(features).double(), 1)
        per_task = log_post.new_full((log_post.shape[0], len(self._weights)), float("-inf"))
        index = self.owners.expand_as(log_post)
        peak = log_post.max(1, keepdim=True).values
        sums = torch.zeros_like(per_task).scatter_add(1, index, (log_post - peak).exp())
        return torch.where(sums > 0, sums.log() + peak, per_task)

    def predict_tasks(self, features: Sequence[Tensor] | Tensor) -> Tensor:
        """Each sample's task: an index into the signatures given."""
        return self.task_scores(features).argmax(1)
