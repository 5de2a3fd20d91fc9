"""Task evidence: how typical an input looks to one task in that task's own adapted features,
on a scale that compares across tasks.

The frozen backbone's features rank an input's candidate tasks (`task_signature.py`); each
candidate then sees the input through its own adapters. Two readings come from that forward:
the candidate head's confidence (its largest log-softmax) and the input's best prototype score
under the task's own-feature statistics (class means and within-class scatter of the task's
adapted features, a `TaskSignature` with features "task"). Raw, neither compares across tasks:
each task's head and feature space has its own scale, and a head is about as confident on
another task's inputs as on its own. Each reading is therefore standardised by its mean and
spread on the task's own held-out samples: a z-score says how far an input sits from what the
task's own data gives, in the task's own units, and the sum of the two z-scores is the task's
evidence.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .task_signature import PrototypeScorer, TaskSignature

_MOMENTS = ("confidence_moments", "distance_moments")


@dataclass(frozen=True)
class TaskEvidence:
    """One task's own-feature statistics and the mean and standard deviation of its two
    readings (head confidence, own-prototype score) on the task's held-out samples.

    Example:
        >>> from halrp_adapt.method.task_signature import SignatureAccumulator
        >>> acc = SignatureAccumulator()
        >>> acc.update(torch.randn(64, 3), torch.randint(0, 2, (64,)))
        >>> own = acc.finish("task")
        >>> evidence = TaskEvidence.calibrated(own, torch.randn(32, 3), torch.randn(32, 2))
        >>> evidence.score(torch.randn(5, 3), torch.randn(5, 2)).shape
        torch.Size([5])
    """

    signature: TaskSignature  # the task's own adapted features ("task")
    confidence_moments: tuple[float, float]  # mean, std of the head's max log-softmax
    distance_moments: tuple[float, float]  # mean, std of the best own-prototype score

    @classmethod
    def calibrated(cls, signature: TaskSignature, features: Tensor, logits: Tensor) -> TaskEvidence:
        """The evidence of a task whose own-feature statistics are `signature`, its readings'
        moments measured on `features` and `logits` of the task's held-out samples."""
        confidence, distance = readings(_scorer(signature), features, logits)
        if confidence.numel() < 2:
            raise ValueError("calibrating task evidence needs at least 2 held-out samples.")
        return cls(signature, _moments(confidence), _moments(distance))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())

    def score(
        self, features: Tensor, logits: Tensor, scorer: PrototypeScorer | None = None
    ) -> Tensor:
        """(batch,) the sum of the two readings' z-scores for inputs seen through this task
        (`scorer`: this evidence's `scorer()`, built once by callers that score often)."""
        confidence, distance = readings(scorer or self.scorer(), features, logits)
        z_conf = (confidence - self.confidence_moments[0]) / self.confidence_moments[1]
        z_dist = (distance - self.distance_moments[0]) / self.distance_moments[1]
        return z_conf + z_dist

    def scorer(self, device: torch.device | str | None = None) -> PrototypeScorer:
        return _scorer(self.signature, device)

    def to_tensors(self) -> dict[str, Tensor]:
        moments = {k: torch.tensor(getattr(self, k), dtype=torch.float64) for k in _MOMENTS}
        return {**{f"own_{k}": v for k, v in self.signature.to_tensors().items()}, **moments}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], source: str) -> TaskEvidence:
        """Rebuild the evidence from its saved tensors, refusing ones that do not fit."""
        own = {k[4:]: v for k, v in tensors.items() if k.startswith("own_")}
        for key in _MOMENTS:
            value = tensors.get(key)
            if value is None or value.shape != (2,) or not torch.isfinite(value).all():
                raise ValueError(f"{source}: the task evidence lacks {key!r} (2 finite numbers).")
        mean_c, std_c = (float(v) for v in tensors["confidence_moments"])
        mean_d, std_d = (float(v) for v in tensors["distance_moments"])
        signature = TaskSignature.from_tensors(own, "task", source)
        return cls(signature, (mean_c, std_c), (mean_d, std_d))


def readings(scorer: PrototypeScorer, features: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """(confidence, distance), each (batch,) float64: the head's largest log-softmax, and the
    best prototype score of `features` under the task's own statistics (higher: closer)."""
    if logits.dim() != 2 or logits.shape[0] != features.shape[0]:
        raise ValueError(
            f"task evidence needs (batch, classes) logits for the {features.shape[0]} feature "
            f"rows, got {tuple(logits.shape)}."
        )
    confidence = torch.log_softmax(logits.double(), 1).amax(1)
    distance = scorer.task_scores([features]).squeeze(1).double()
    return confidence.to(distance.device), distance


def _scorer(signature: TaskSignature, device: torch.device | str | None = None) -> PrototypeScorer:
    return PrototypeScorer([signature], shared=False, device=device)


def _moments(values: Tensor) -> tuple[float, float]:
    # A spread of 0 (every held-out sample reads the same) would make every z-score infinite.
    spread = float(values.std())
    return float(values.mean()), spread if spread > 1e-12 else 1.0
