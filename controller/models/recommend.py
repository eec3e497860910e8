"""Recommendation: the best round by the criteria, why, the runners-up, and what came closest.

Plain functions over recorded numbers (`RoundSummary`); they touch no store, bus or HTTP. The
rules (ties, normalisation of a weighted score, which threshold is "closest") are written out in
docs/models.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedsky.controller.models.criteria import (
    TIE_BREAKER,
    TIE_DECIMALS,
    Criteria,
    RoundSummary,
    Threshold,
    meets,
    oriented,
    tie_key,
)
from fedsky.shared.metrics import LOWER_IS_BETTER


@dataclass(frozen=True)
class Ranked:
    """A candidate round with its score (the metric's value, or the weighted score in [0, 1])."""

    job_id: str
    round: int
    score: float
    metrics: Mapping[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "round": self.round,
            "score": self.score,
            "metrics": dict(self.metrics),
        }


@dataclass(frozen=True)
class ThresholdGap:
    """How close the rounds come to one threshold.

    `alone`: relaxing this threshold by `shortfall` alone would admit `round` (it meets every
    other threshold). Otherwise `round` is the round closest on this metric.
    """

    threshold: Threshold
    job_id: str | None
    round: int | None
    value: float | None
    shortfall: float
    relative: float
    alone: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold.to_dict(),
            "describe": self.threshold.describe(),
            "job": self.job_id,
            "round": self.round,
            "value": self.value,
            "shortfall": None if math.isinf(self.shortfall) else self.shortfall,
            "relative": None if math.isinf(self.relative) else self.relative,
            "alone": self.alone,
        }


@dataclass(frozen=True)
class Recommendation:
    criteria: Criteria
    best: Ranked | None
    runners_up: tuple[Ranked, ...]
    considered: int
    feasible: int
    reason: str
    closest: ThresholdGap | None = None
    gaps: tuple[ThresholdGap, ...] = ()
    # Extra context the caller adds (e.g. rounds whose checkpoint was pruned).
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "criteria": self.criteria.to_dict(),
            "feasible": self.best is not None,
            "best": self.best.to_dict() if self.best else None,
            "runners_up": [r.to_dict() for r in self.runners_up],
            "considered": self.considered,
            "meeting_thresholds": self.feasible,
            "reason": self.reason,
            "closest": self.closest.to_dict() if self.closest else None,
            "gaps": [g.to_dict() for g in self.gaps],
            "notes": list(self.notes),
        }


def _scores(rounds: Sequence[RoundSummary], criteria: Criteria) -> list[float | None]:
    """One score per round (None: cannot be ranked), higher is better.

    A single metric scores by its value (negated when lower is better). A weighted mix scores
    sum(w_m * norm_m) / sum(w_m), where norm_m is the min-max normalised value of metric m over
    `rounds` (the rounds that meet the thresholds), flipped when lower is better so that 1 is always best;
    a metric every round shares normalises to 1; a missing value counts 0.
    """
    if criteria.metric is not None:
        metric = criteria.metric
        return [None if (v := r.value(metric)) is None else oriented(v, metric) for r in rounds]
    total = sum(w for _, w in criteria.weights)
    out = [0.0] * len(rounds)
    for metric, weight in criteria.weights:
        values = [r.value(metric) for r in rounds]
        present = [v for v in values if v is not None]
        if not present:
            continue
        lo, hi = min(present), max(present)
        for i, v in enumerate(values):
            if v is None:
                continue
            if hi == lo:
                norm = 1.0
            elif metric in LOWER_IS_BETTER:
                norm = (hi - v) / (hi - lo)
            else:
                norm = (v - lo) / (hi - lo)
            out[i] += weight * norm
    return [s / total for s in out]


def rank(rounds: Sequence[RoundSummary], criteria: Criteria) -> list[Ranked]:
    """The rounds that meet every threshold and can be scored, best first (ties as documented)."""
    feasible = [r for r in rounds if meets(r.metrics, criteria.thresholds)]
    scored = [
        (r, s) for r, s in zip(feasible, _scores(feasible, criteria), strict=True) if s is not None
    ]
    scored.sort(key=lambda pair: tie_key(*pair))
    metric = criteria.metric
    return [
        Ranked(
            job_id=r.job_id,
            round=r.round,
            # Report the metric's own value (not negated) for a single metric.
            score=(-s if metric in LOWER_IS_BETTER else s),
            metrics=dict(r.metrics),
        )
        for r, s in scored
    ]


def threshold_gaps(
    rounds: Sequence[RoundSummary], thresholds: Sequence[Threshold]
) -> tuple[ThresholdGap, ...]:
    """For each threshold, how close the rounds come; closest first.

    A threshold whose relaxation alone would admit a round (one that meets all the others)
    sorts before those that would not; then by the relative shortfall (shortfall / |bound|).
    """
    gaps: list[ThresholdGap] = []
    for t in thresholds:
        others = [o for o in thresholds if o is not t]
        pool = [r for r in rounds if meets(r.metrics, others)]
        alone = bool(pool)
        best: RoundSummary | None = None
        best_short = math.inf
        for r in pool or rounds:
            short = t.shortfall(r.value(t.metric))
            if best is None or (short, r.round, r.job_id) < (best_short, best.round, best.job_id):
                best, best_short = r, short
        gaps.append(
            ThresholdGap(
                threshold=t,
                job_id=best.job_id if best else None,
                round=best.round if best else None,
                value=best.value(t.metric) if best else None,
                shortfall=best_short,
                relative=t.relative(best_short),
                alone=alone and best is not None and not math.isinf(best_short),
            )
        )
    gaps.sort(key=lambda g: (not g.alone, g.shortfall == 0, g.relative, g.threshold.metric))
    return tuple(gaps)


def nearest_round(
    rounds: Sequence[RoundSummary], thresholds: Sequence[Threshold]
) -> tuple[RoundSummary, tuple[ThresholdGap, ...]] | None:
    """The round that misses the fewest thresholds (then the least in sum of relative
    shortfalls, then the earlier round), with what it misses, closest first."""
    best: tuple[tuple[int, float, int, str], RoundSummary, list[ThresholdGap]] | None = None
    for r in rounds:
        misses = []
        for t in thresholds:
            short = t.shortfall(r.value(t.metric))
            if short > 0:
                value = r.value(t.metric)
                rel = t.relative(short)
                misses.append(ThresholdGap(t, r.job_id, r.round, value, short, rel, alone=False))
        key = (len(misses), sum(g.relative for g in misses), r.round, r.job_id)
        if best is None or key < best[0]:
            best = (key, r, misses)
    if best is None:
        return None
    _, r, misses = best
    misses.sort(key=lambda g: (g.relative, g.threshold.metric))
    return r, tuple(misses)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _score(value: float, criteria: Criteria) -> str:
    return f"{value:.3f}" if criteria.weights else _fmt(value)


def _where(job_id: str, round_no: int, many_jobs: bool) -> str:
    return f"job {job_id} round {round_no}" if many_jobs else f"round {round_no}"


def recommend(
    rounds: Sequence[RoundSummary], criteria: Criteria, *, runners_up: int = 3
) -> Recommendation:
    """The best round among those meeting every threshold, why, and the runners-up.

    When none qualifies, `closest` names the threshold closest to being met (see
    `threshold_gaps`) and `reason` says by how much.
    """
    many_jobs = len({r.job_id for r in rounds}) > 1
    ranked = rank(rounds, criteria)
    feasible = sum(1 for r in rounds if meets(r.metrics, criteria.thresholds))
    what = criteria.describe()
    limits = ", ".join(t.describe() for t in criteria.thresholds)
    if not rounds:
        return Recommendation(
            criteria, None, (), 0, 0, "no rounds with a checkpoint to choose from"
        )
    if ranked:
        best, rest = ranked[0], tuple(ranked[1 : 1 + max(runners_up, 0)])
        higher = "lowest" if criteria.metric in LOWER_IS_BETTER else "highest"
        among = (
            f"{feasible} of {len(rounds)} rounds meeting {limits}"
            if limits
            else f"{len(rounds)} rounds"
        )
        reason = (
            f"{_where(best.job_id, best.round, many_jobs)} has the {higher} {what} "
            f"({_score(best.score, criteria)}) among {among}"
        )
        if rest and round(rest[0].score, TIE_DECIMALS) == round(best.score, TIE_DECIMALS):
            tied = rest[0]
            bl, tl = best.metrics.get(TIE_BREAKER), tied.metrics.get(TIE_BREAKER)
            if bl is not None and (tl is None or bl < tl):
                why = f"its {TIE_BREAKER} is lower"
            elif best.round < tied.round:
                why = "it came earlier"
            else:
                why = "its job id sorts first"
            reason += (
                f"; tied with {_where(tied.job_id, tied.round, many_jobs)}, chosen because {why}"
            )
        elif rest:
            second = _where(rest[0].job_id, rest[0].round, many_jobs)
            reason += f"; runner-up {second} ({_score(rest[0].score, criteria)})"
        return Recommendation(criteria, best, rest, len(rounds), feasible, reason)
    if feasible:
        metric = criteria.metric or "any scored metric"
        reason = (
            f"{feasible} rounds meet {limits or 'the criteria'} but none has a value for {metric}"
        )
        return Recommendation(criteria, None, (), len(rounds), feasible, reason)
    gaps = threshold_gaps(rounds, criteria.thresholds)
    closest = gaps[0]
    t = closest.threshold
    if closest.alone:
        where = _where(closest.job_id or "", closest.round or 0, many_jobs)
        reason = (
            f"no round meets {limits}; closest is {t.describe()}: {where} reaches "
            f"{_fmt(closest.value)}, {closest.shortfall:.4g} short "
            f"({closest.relative:.1%} of the bound)"
        )
        if len(criteria.thresholds) > 1:
            reason += ", and meets the others"
    else:
        near = nearest_round(rounds, criteria.thresholds)
        assert near is not None  # rounds is not empty here
        r, misses = near
        closest = misses[0]
        where = _where(r.job_id, r.round, many_jobs)
        missed = " and ".join(
            f"{g.threshold.describe()} ("
            + ("no value" if g.value is None else f"{_fmt(g.value)}, {g.shortfall:.4g} short")
            + ")"
            for g in misses
        )
        reason = (
            f"no round meets {limits}, and relaxing one threshold alone admits none; "
            f"nearest is {where}, which misses {missed}"
        )
    return Recommendation(criteria, None, (), len(rounds), 0, reason, closest=closest, gaps=gaps)
