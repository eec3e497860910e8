"""Classification metrics from a confusion matrix.

Federated evaluation sums the participants' confusion matrices and computes every figure from the
sum, so the round's accuracy, F1, recall and precision are exactly those of the union of the
participants' evaluation sets, not an average of per-site scores.

Conventions (the same as scikit-learn's defaults, `zero_division=0`):
- `cm[i][j]` counts samples of true class i predicted as class j.
- Macro averages run over the classes that occur in the truth or in the predictions; a class with
  neither does not pull the average down.
- A class's precision is 0 when it is never predicted, its recall 0 when it never occurs, and its
  F1 0 when precision + recall is 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Matrix = list[list[int]]


class MetricsError(ValueError):
    """A confusion matrix that is not square, negative or of the wrong size."""


@dataclass(frozen=True)
class ClassFigures:
    label: int
    precision: float
    recall: float
    f1: float
    support: int  # true samples of this class
    predicted: int  # samples predicted as this class


@dataclass(frozen=True)
class ClassificationFigures:
    accuracy: float
    f1: float  # macro
    recall: float  # macro
    precision: float  # macro
    per_class: tuple[ClassFigures, ...]
    total: int


def empty_matrix(num_classes: int) -> Matrix:
    if num_classes < 1:
        raise MetricsError(f"a confusion matrix needs at least 1 class (got {num_classes})")
    return [[0] * num_classes for _ in range(num_classes)]


def confusion_matrix(y_true: Iterable[int], y_pred: Iterable[int], num_classes: int) -> Matrix:
    """Count (true, predicted) pairs into a `num_classes` x `num_classes` matrix."""
    cm = empty_matrix(num_classes)
    for t, p in zip(y_true, y_pred, strict=True):
        ti, pi = int(t), int(p)
        if not (0 <= ti < num_classes and 0 <= pi < num_classes):
            raise MetricsError(
                f"label out of range 0..{num_classes - 1}: true {ti}, predicted {pi}"
            )
        cm[ti][pi] += 1
    return cm


def check_matrix(cm: Sequence[Sequence[int]]) -> Matrix:
    """Return `cm` as a list of lists of int if it is square and non-negative."""
    n = len(cm)
    if n == 0:
        raise MetricsError("confusion matrix is empty")
    out: Matrix = []
    for row in cm:
        if len(row) != n:
            raise MetricsError(
                f"confusion matrix is not square: a row has {len(row)} of {n} entries"
            )
        values = [int(v) for v in row]
        if any(v < 0 for v in values):
            raise MetricsError("confusion matrix has a negative count")
        out.append(values)
    return out


def flatten(cm: Sequence[Sequence[int]]) -> list[int]:
    """Row-major list of counts (what a Flower MetricRecord can carry)."""
    return [int(v) for row in cm for v in row]


def unflatten(values: Sequence[int | float], num_classes: int) -> Matrix:
    if len(values) != num_classes * num_classes:
        raise MetricsError(
            f"a {num_classes}-class confusion matrix has {num_classes * num_classes} entries, "
            f"got {len(values)}"
        )
    ints: list[int] = []
    for v in values:
        if float(v) != int(v) or v < 0:
            raise MetricsError(f"confusion matrix counts must be non-negative integers (got {v!r})")
        ints.append(int(v))
    return [ints[i * num_classes : (i + 1) * num_classes] for i in range(num_classes)]


def sum_matrices(matrices: Iterable[Sequence[Sequence[int]]]) -> Matrix:
    total: Matrix | None = None
    for cm in matrices:
        m = check_matrix(cm)
        if total is None:
            total = m
            continue
        if len(m) != len(total):
            raise MetricsError(f"cannot sum a {len(m)}-class matrix into a {len(total)}-class one")
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                total[i][j] += v
    if total is None:
        raise MetricsError("no confusion matrices to sum")
    return total


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def figures(cm: Sequence[Sequence[int]]) -> ClassificationFigures:
    """Accuracy, macro F1/recall/precision and per-class figures of a confusion matrix."""
    m = check_matrix(cm)
    n = len(m)
    total = sum(sum(row) for row in m)
    correct = sum(m[i][i] for i in range(n))
    per_class: list[ClassFigures] = []
    for k in range(n):
        tp = m[k][k]
        support = sum(m[k])
        predicted = sum(m[i][k] for i in range(n))
        precision = _ratio(tp, predicted)
        recall = _ratio(tp, support)
        # 2TP / (2TP + FP + FN) equals 2PR/(P+R) and needs no float round trip.
        f1 = _ratio(2 * tp, support + predicted)
        per_class.append(ClassFigures(k, precision, recall, f1, support, predicted))
    present = [c for c in per_class if c.support or c.predicted]
    count = len(present)
    return ClassificationFigures(
        accuracy=_ratio(correct, total),
        f1=sum(c.f1 for c in present) / count if count else 0.0,
        recall=sum(c.recall for c in present) / count if count else 0.0,
        precision=sum(c.precision for c in present) / count if count else 0.0,
        per_class=tuple(per_class),
        total=total,
    )
