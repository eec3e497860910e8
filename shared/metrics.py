"""The metrics a round reports, in one table, and the classification figures behind them.

`METRICS` is the one place that names them: its rows give each metric's name (the spelling used
in job specs, the API's JSON, the CLI, the `RoundMetrics` message and the Model Manager's
columns), which way is better, the other names it may arrive under, and its display label. The
job spec, the Model Manager's storage and recommendation, the CLI's tables and plots and the
Flower apps read the table instead of spelling the names.

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

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Better = Literal["higher", "lower"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Metric:
    """One figure every round reports: a row of `METRICS`."""

    # The one spelling: job specs, JSON, CLI flags, the RoundMetrics field, the SQL column.
    name: str
    better: Better
    # Column heading and plot legend.
    label: str
    # True: a fraction in [0, 1], plotted with the others on one axis; False: unbounded (a loss).
    ratio: bool
    # Other spellings accepted from an aggregator or a person, stored under `name`.
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # The name becomes an SQL column and a message field: keep it a plain identifier.
        for key in (self.name, *self.aliases):
            if not _NAME_RE.match(key):
                raise ValueError(f"metric name {key!r} is not a lowercase identifier")

    @property
    def lower_is_better(self) -> bool:
        return self.better == "lower"


METRICS: tuple[Metric, ...] = (
    Metric("accuracy", "higher", "accuracy", ratio=True, aliases=("acc",)),
    Metric("loss", "lower", "loss", ratio=False),
    Metric("f1", "higher", "f1", ratio=True, aliases=("f1_macro", "macro_f1")),
    Metric("recall", "higher", "recall", ratio=True, aliases=("recall_macro", "macro_recall")),
    Metric(
        "precision",
        "higher",
        "precision",
        ratio=True,
        aliases=("precision_macro", "macro_precision"),
    ),
)
METRIC_NAMES: tuple[str, ...] = tuple(m.name for m in METRICS)
# What picks a job's best round when its spec names no metric.
DEFAULT_SELECTION_METRIC = "accuracy"
LOWER_IS_BETTER: frozenset[str] = frozenset(m.name for m in METRICS if m.lower_is_better)


def metric_index(rows: Sequence[Metric]) -> dict[str, Metric]:
    """Each name and alias of `rows` -> its row; ValueError when one names two rows."""
    out: dict[str, Metric] = {}
    for row in rows:
        for key in (row.name, *row.aliases):
            if key in out:
                raise ValueError(f"metric name {key!r} names two rows of the metric table")
            out[key] = row
    return out


_BY_KEY = metric_index(METRICS)


def find_metric(name: str) -> Metric | None:
    """The row for a name or alias (any case), or None when the table has no such metric."""
    return _BY_KEY.get(name.lower())


def metric_key(name: str) -> str:
    """The name a figure is stored under: the table's name for a metric or alias, else `name`
    lowercased (figures outside the table, such as `train_loss`, are kept under their own)."""
    row = find_metric(name)
    return row.name if row else name.lower()


def metric_values(source: object) -> dict[str, float | None]:
    """Every metric of the table, read from the attribute of that name (e.g. of a RoundMetrics)."""
    out: dict[str, float | None] = {}
    for row in METRICS:
        value = getattr(source, row.name)
        out[row.name] = None if value is None else float(value)
    return out


def format_values(values: Mapping[str, float | None], spec: str = ".4f") -> str:
    """`accuracy 0.9012 loss 0.3100 ...` in table order (n/a for a missing value)."""
    return " ".join(
        f"{m.name} {'n/a' if (v := values.get(m.name)) is None else format(v, spec)}"
        for m in METRICS
    )


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
