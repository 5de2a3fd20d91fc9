"""Continual-learning metrics from an accuracy matrix (HALRP.md section 7).

`R[i][j]` is the accuracy on task j after training tasks 0..i (entries with j > i are unused).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def _check(matrix: Sequence[Sequence[float]]) -> int:
    t = len(matrix)
    if t == 0 or any(len(row) < i + 1 for i, row in enumerate(matrix)):
        raise ValueError(
            "the accuracy matrix must have T rows, row i holding at least i + 1 accuracies."
        )
    return t


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """ACC: mean final accuracy over all tasks.

    Example:
        >>> average_accuracy([[90.0], [88.0, 80.0]])
        84.0
    """
    t = _check(matrix)
    return sum(matrix[t - 1][j] for j in range(t)) / t


def backward_transfer(matrix: Sequence[Sequence[float]]) -> float:
    """BWT: mean change of each earlier task's accuracy from when it was learned to the end.

    Example:
        >>> backward_transfer([[90.0], [88.0, 80.0]])
        -2.0
    """
    t = _check(matrix)
    if t == 1:
        return 0.0
    return sum(matrix[t - 1][j] - matrix[j][j] for j in range(t - 1)) / (t - 1)


def forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Mean over earlier tasks of (best accuracy ever - final accuracy)."""
    t = _check(matrix)
    if t == 1:
        return 0.0
    return sum(max(matrix[i][j] for i in range(j, t)) - matrix[t - 1][j] for j in range(t - 1)) / (
        t - 1
    )


def order_robustness(final_by_order: Sequence[Mapping[str, float]]) -> dict[str, object]:
    """OPD per task identity, MOPD (max) and AOPD (mean) over several task orders (APD, ICLR
    2020). Each mapping gives {task identity: final accuracy} for one order.

    Example:
        >>> order_robustness([{"a": 90.0, "b": 80.0}, {"a": 85.0, "b": 81.0}])["MOPD"]
        5.0
    """
    if len(final_by_order) < 2:
        raise ValueError("order robustness needs runs over at least 2 task orders.")
    identities = set(final_by_order[0])
    if any(set(run) != identities for run in final_by_order):
        raise ValueError("every order must hold the same task identities.")
    opd = {
        t: max(run[t] for run in final_by_order) - min(run[t] for run in final_by_order)
        for t in sorted(identities)
    }
    return {"OPD": opd, "MOPD": max(opd.values()), "AOPD": sum(opd.values()) / len(opd)}
