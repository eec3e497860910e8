"""What "best" means: a metric or a weighted score, and thresholds every pick must meet.

Plain data and the parsers of the CLI's and API's `--metric`, `--min`, `--max` and `--score`;
the metric names come from the table in `fedsky.shared.metrics`. The rules (ties,
normalisation) are written out in docs/models.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from fedsky.shared.metrics import (
    DEFAULT_SELECTION_METRIC,
    LOWER_IS_BETTER,
    METRIC_NAMES,
    find_metric,
)

Bound = Literal["min", "max"]
# Scores equal to this many decimal places are a tie (float noise must not decide a winner).
TIE_DECIMALS = 12
# Between rounds that score the same, the one with the lower value of this metric wins.
TIE_BREAKER = "loss"


def parse_metric(name: str) -> str:
    """A metric name as the user typed it -> its canonical name, or ValueError."""
    row = find_metric(name.strip())
    if row is None:
        raise ValueError(f"unknown metric {name!r}; use one of {', '.join(METRIC_NAMES)}")
    return row.name


@dataclass(frozen=True)
class Threshold:
    """`metric >= bound` (kind "min") or `metric <= bound` (kind "max")."""

    metric: str
    kind: Bound
    bound: float

    def met(self, value: float | None) -> bool:
        if value is None:
            return False
        return value >= self.bound if self.kind == "min" else value <= self.bound

    def shortfall(self, value: float | None) -> float:
        """How far `value` is from meeting the threshold (0 when met, inf when missing)."""
        if value is None:
            return math.inf
        gap = self.bound - value if self.kind == "min" else value - self.bound
        return max(gap, 0.0)

    def relative(self, shortfall: float) -> float:
        """The shortfall as a fraction of the bound, so accuracy and loss gaps compare."""
        return shortfall / abs(self.bound) if self.bound else shortfall

    def describe(self) -> str:
        return f"{self.metric} {'>=' if self.kind == 'min' else '<='} {self.bound:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "kind": self.kind, "bound": self.bound}


def _parse_pair(text: str, sep: str, what: str) -> tuple[str, float]:
    name, found, value = text.partition(sep)
    if not found or not name.strip() or not value.strip():
        raise ValueError(f"{what} {text!r}: expected NAME{sep}VALUE, e.g. accuracy{sep}0.9")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{what} {text!r}: {value.strip()!r} is not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"{what} {text!r}: the value must be a finite number")
    try:
        return parse_metric(name), number
    except ValueError as exc:
        raise ValueError(f"{what} {text!r}: {exc}") from None


def parse_thresholds(mins: Iterable[str] = (), maxs: Iterable[str] = ()) -> tuple[Threshold, ...]:
    """`--min accuracy=0.9`, `--max loss=0.3` -> thresholds (ValueError names the bad one)."""
    out: list[Threshold] = []
    for kind, texts in (("min", mins), ("max", maxs)):
        for text in texts:
            metric, bound = _parse_pair(text, "=", f"--{kind}")
            out.append(Threshold(metric=metric, kind=kind, bound=bound))  # type: ignore[arg-type]
    return tuple(out)


def parse_score(text: str) -> tuple[tuple[str, float], ...]:
    """`f1:0.7,accuracy:0.3` -> ((f1, 0.7), (accuracy, 0.3)); weights must be > 0."""
    weights: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        name, weight = _parse_pair(part.strip(), ":", "--score term")
        if weight <= 0:
            raise ValueError(f"--score term {part.strip()!r}: weights must be greater than 0")
        if name in weights:
            raise ValueError(f"--score names {name} twice")
        weights[name] = weight
    if not weights:
        raise ValueError("--score is empty; expected e.g. f1:0.7,accuracy:0.3")
    return tuple(weights.items())


@dataclass(frozen=True)
class Criteria:
    """What "best" means: one metric, or a weighted mix; plus thresholds every pick must meet."""

    metric: str | None = DEFAULT_SELECTION_METRIC
    weights: tuple[tuple[str, float], ...] = ()
    thresholds: tuple[Threshold, ...] = ()

    def __post_init__(self) -> None:
        if self.weights and self.metric is not None:
            raise ValueError("give either a metric or a weighted score, not both")
        if not self.weights and self.metric is None:
            raise ValueError("give a metric or a weighted score")
        if self.metric is not None and self.metric not in METRIC_NAMES:
            raise ValueError(
                f"unknown metric {self.metric!r}; use one of {', '.join(METRIC_NAMES)}"
            )

    def describe(self) -> str:
        if self.weights:
            return "score " + ",".join(f"{m}:{w:g}" for m, w in self.weights)
        return str(self.metric)

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "score": [{"metric": m, "weight": w} for m, w in self.weights],
            "thresholds": [t.to_dict() for t in self.thresholds],
        }


@dataclass(frozen=True)
class RoundSummary:
    """What decisions need of a round: which job, which round, its metrics."""

    job_id: str
    round: int
    metrics: Mapping[str, float | None]

    def value(self, metric: str) -> float | None:
        return self.metrics.get(metric)


def meets(metrics: Mapping[str, float | None], thresholds: Sequence[Threshold]) -> bool:
    return all(t.met(metrics.get(t.metric)) for t in thresholds)


def oriented(value: float, metric: str) -> float:
    """Higher is better after this (a lower-is-better metric is negated)."""
    return -value if metric in LOWER_IS_BETTER else value


def tie_key(r: RoundSummary, score: float) -> tuple[float, float, int, str]:
    """Sort key, best first, for a round with `score` (higher is better).

    Ties (equal to TIE_DECIMALS places) go to the lower TIE_BREAKER value, then the earlier
    round, then the job id: an equally good model reached sooner is preferred, and a later
    round that merely equals the current pick never displaces it.
    """
    tie = r.value(TIE_BREAKER)
    return (-round(score, TIE_DECIMALS), math.inf if tie is None else tie, r.round, r.job_id)
