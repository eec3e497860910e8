"""The Model Manager: every round's metrics and global weights, recommendation, signed download.

Three layers, in this order in the file:

1. Decisions as plain functions over plain data (`recommend`, `retention_drops`,
   `global_evictions`, the parsers of `--min`/`--max`/`--score`). They touch no store, bus or
   HTTP and are tested on recorded numbers.
2. Storage: a content-addressed blob store (`BlobStore`: files named by their SHA-256, written
   atomically, deduplicated), a signing key (`SigningKey`, Ed25519, made on first use), and
   the signed download format (`build_metadata`, `verify_download`).
3. The service the daemon and the API use (`Registry`): record a job and its rounds, enforce
   retention after every round, answer queries, hand out weights and signed metadata.

The rules (ties, normalisation, retention order) are written out in docs/models.md.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fedsky.controller.store import Store, transaction
from fedsky.shared.config import resolve_path
from fedsky.shared.messages import RoundMetrics
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = ("accuracy", "loss", "f1", "recall", "precision")
LOWER_IS_BETTER = frozenset({"loss"})
# Names the aggregator may use for the macro averages; stored under the short name.
_METRIC_ALIASES = {
    "acc": "accuracy",
    "f1_macro": "f1",
    "macro_f1": "f1",
    "recall_macro": "recall",
    "macro_recall": "recall",
    "precision_macro": "precision",
    "macro_precision": "precision",
}
# Scores equal to this many decimal places are a tie (float noise must not decide a winner).
TIE_DECIMALS = 12
METADATA_FORMAT = "fedsky-model-metadata/1"
METADATA_SUFFIX = ".meta.json"
WEIGHTS_FORMAT = "safetensors"

RetentionMode = Literal["all", "best", "last"]
Bound = Literal["min", "max"]


class RegistryError(Exception):
    """A request the Model Manager cannot serve; the message is safe to show."""


class NotFound(RegistryError):
    """No such job, round or checkpoint."""


class Infeasible(RegistryError):
    """No round meets the criteria (the message says which threshold is closest)."""


class CheckpointCorrupted(RegistryError):
    """A stored checkpoint no longer matches its SHA-256 (disk damage or tampering)."""


class VerificationError(Exception):
    """A downloaded model fails verification; the message says which file and why."""


# =============================================================================================
# 1. Decisions: plain functions over plain data
# =============================================================================================


def parse_metric(name: str) -> str:
    """A metric name as the user typed it -> its canonical name, or ValueError."""
    key = name.strip().lower()
    key = _METRIC_ALIASES.get(key, key)
    if key not in METRICS:
        raise ValueError(f"unknown metric {name!r}; use one of {', '.join(METRICS)}")
    return key


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

    metric: str | None = "accuracy"
    weights: tuple[tuple[str, float], ...] = ()
    thresholds: tuple[Threshold, ...] = ()

    def __post_init__(self) -> None:
        if self.weights and self.metric is not None:
            raise ValueError("give either a metric or a weighted score, not both")
        if not self.weights and self.metric is None:
            raise ValueError("give a metric or a weighted score")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)}")

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
    """What decisions need of a round: who, when, the five metrics."""

    job_id: str
    round: int
    metrics: Mapping[str, float | None]

    def value(self, metric: str) -> float | None:
        return self.metrics.get(metric)


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


def meets(metrics: Mapping[str, float | None], thresholds: Sequence[Threshold]) -> bool:
    return all(t.met(metrics.get(t.metric)) for t in thresholds)


def _oriented(value: float, metric: str) -> float:
    """Higher is better after this (loss is negated)."""
    return -value if metric in LOWER_IS_BETTER else value


def _tie_key(r: RoundSummary, score: float) -> tuple[float, float, int, str]:
    # Ties (equal to TIE_DECIMALS places) go to the lower loss, then the earlier round, then
    # the job id: an equally good model reached sooner is preferred, and a later round that
    # merely equals the current pick never displaces it.
    loss = r.value("loss")
    return (-round(score, TIE_DECIMALS), math.inf if loss is None else loss, r.round, r.job_id)


def _scores(rounds: Sequence[RoundSummary], criteria: Criteria) -> list[float | None]:
    """One score per round (None: cannot be ranked), higher is better.

    A single metric scores by its value (negated for loss). A weighted mix scores
    sum(w_m * norm_m) / sum(w_m), where norm_m is the min-max normalised value of metric m over
    `rounds` (the rounds that meet the thresholds), flipped for loss so that 1 is always best;
    a metric every round shares normalises to 1; a missing value counts 0.
    """
    if criteria.metric is not None:
        metric = criteria.metric
        return [None if (v := r.value(metric)) is None else _oriented(v, metric) for r in rounds]
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
    scored.sort(key=lambda pair: _tie_key(*pair))
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
            bl, tl = best.metrics.get("loss"), tied.metrics.get("loss")
            if bl is not None and (tl is None or bl < tl):
                why = "its loss is lower"
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


# --- retention ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetentionPolicy:
    """Which checkpoints of a job to keep: all, the best `keep` or the last `keep` rounds.

    Retention removes checkpoints (weights) only; every round's metrics stay. The job's best
    round by its selection metric and every pinned round are always kept.
    """

    mode: RetentionMode = "best"
    keep: int = 5

    def __post_init__(self) -> None:
        if self.mode not in ("all", "best", "last"):
            raise ValueError(f"retention mode {self.mode!r}: use all, best or last")
        if self.keep < 1:
            raise ValueError(f"retention keep={self.keep}: keep at least 1")

    @classmethod
    def parse(cls, text: str) -> RetentionPolicy:
        """`all`, `best:3`, `last:10`."""
        mode, _, k = text.strip().lower().partition(":")
        if mode == "all" and not k:
            return cls("all")
        if mode in ("best", "last") and k.isdigit():
            return cls(mode, int(k))  # type: ignore[arg-type]
        raise ValueError(f"retention {text!r}: expected all, best:K or last:K")

    def describe(self) -> str:
        return "all" if self.mode == "all" else f"{self.mode}:{self.keep}"


@dataclass(frozen=True)
class CheckpointRow:
    """A round as retention sees it."""

    summary: RoundSummary
    sha256: str | None
    size: int
    pinned: bool
    order: int  # recording order across the whole store (oldest first)


def selection_ranking(rounds: Sequence[RoundSummary], selection: Criteria) -> list[RoundSummary]:
    """All rounds, best first: those meeting the selection's thresholds, then the rest.

    Within each group by the selection metric with the recommendation's tie rules; rounds
    lacking the metric last. A round's place never depends on rounds recorded later, so a
    checkpoint dropped by `best:K` could never have come back.
    """
    metric = selection.metric or "accuracy"

    def key(r: RoundSummary) -> tuple[int, int, tuple[float, float, int, str]]:
        value = r.value(metric)
        infeasible = 0 if meets(r.metrics, selection.thresholds) else 1
        if value is None:
            return (infeasible, 1, (0.0, math.inf, r.round, r.job_id))
        return (infeasible, 0, _tie_key(r, _oriented(value, metric)))

    return sorted(rounds, key=key)


def protected_rounds(rows: Sequence[CheckpointRow], selection: Criteria) -> set[int]:
    """Rounds whose checkpoint must never be pruned: the best held one, and every pinned one."""
    held = [r for r in rows if r.sha256]
    keep = {r.summary.round for r in held if r.pinned}
    ranking = selection_ranking([r.summary for r in held], selection)
    if ranking:
        keep.add(ranking[0].round)
    return keep


def retention_drops(
    rows: Sequence[CheckpointRow], policy: RetentionPolicy, selection: Criteria
) -> list[int]:
    """The rounds of one job whose checkpoint the policy drops now (ascending)."""
    held = [r for r in rows if r.sha256]
    if policy.mode == "all":
        return []
    if policy.mode == "last":
        kept = {
            r.summary.round for r in sorted(held, key=lambda r: r.summary.round)[-policy.keep :]
        }
    else:
        ranking = selection_ranking([r.summary for r in held], selection)
        kept = {r.round for r in ranking[: policy.keep]}
    kept |= protected_rounds(rows, selection)
    return sorted(r.summary.round for r in held if r.summary.round not in kept)


def global_evictions(
    rows: Sequence[CheckpointRow], protected: set[tuple[str, int]], max_bytes: int
) -> list[tuple[str, int]]:
    """Checkpoints to drop, oldest recorded first, until the distinct blobs fit in `max_bytes`.

    Several rounds may share one blob (identical weights): dropping a round frees its bytes only
    when no other held round still refers to the blob. Protected rounds are never dropped; if they
    alone exceed the bound, the result leaves the store above it (the caller logs that).
    """
    held = [r for r in rows if r.sha256]
    refs: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for r in held:
        assert r.sha256 is not None
        refs[r.sha256] = refs.get(r.sha256, 0) + 1
        sizes[r.sha256] = r.size
    total = sum(sizes.values())
    out: list[tuple[str, int]] = []
    for r in sorted(held, key=lambda r: r.order):
        if total <= max_bytes:
            break
        ident = (r.summary.job_id, r.summary.round)
        if ident in protected:
            continue
        assert r.sha256 is not None
        out.append(ident)
        refs[r.sha256] -= 1
        if refs[r.sha256] == 0:
            total -= sizes[r.sha256]
    return out


# =============================================================================================
# 2. Storage: blobs, the signing key, the download format
# =============================================================================================


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def safetensors_header(data: bytes) -> dict[str, Any]:
    """Parse and check a safetensors header (no tensor is loaded): name -> dtype, shape, offsets.

    Raises ValueError when `data` is not a complete safetensors file.
    """
    if len(data) < 8:
        raise ValueError("too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 << 20:
        raise ValueError("header length is beyond the end of the file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    body = len(data) - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise ValueError(f"tensor {name!r} lies outside the file")
        end = max(end, offsets[1])
    if end != body:
        raise ValueError("the tensors do not fill the file (truncated or padded)")
    return header


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int


class BlobStore:
    """Files named by the SHA-256 of their content under `root/ab/abcd...`.

    Writes go to a temporary file in the same directory, are fsynced and renamed into place, so a
    reader never sees half a file and a crash leaves at most a `.tmp-*` file (swept at start).
    Writing content that is already there is a no-op (after checking the existing file).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, sha256: str) -> Path:
        if not _SHA_RE.match(sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> BlobRef:
        sha = sha256_hex(data)
        target = self.path(sha)
        if target.exists():
            have, size = sha256_file(target)
            if have == sha and size == len(data):
                return BlobRef(sha, size)
            log.warning("checkpoint blob %s was damaged on disk; rewriting it", sha[:12])
        target.parent.mkdir(exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return BlobRef(sha, len(data))

    def read(self, sha256: str) -> bytes:
        """The blob's bytes, checked against its name."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"checkpoint {sha256[:12]} is missing from the model store") from None
        if sha256_hex(data) != sha256:
            raise CheckpointCorrupted(
                f"checkpoint {sha256[:12]} in the model store no longer matches its SHA-256; "
                "it was damaged on disk and cannot be handed out"
            )
        return data

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def walk(self) -> Iterator[tuple[str, int]]:
        """Every stored blob as (sha256, size); temporary files are not blobs."""
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if _SHA_RE.match(f.name):
                    yield f.name, f.stat().st_size

    def sweep_temporaries(self) -> int:
        n = 0
        for tmp in self.root.glob("*/.tmp-*"):
            tmp.unlink(missing_ok=True)
            n += 1
        return n

    def total_bytes(self) -> int:
        return sum(size for _, size in self.walk())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def public_key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (as `fedctl models signing-key` exports it)."""
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        raise ValueError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


class SigningKey:
    """The controller's Ed25519 key for model metadata: `path` (PEM, 0600), made on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: Ed25519PrivateKey | None = None

    def _load_or_create(self) -> Ed25519PrivateKey:
        if self._key is not None:
            return self._key
        if not self.path.exists():
            self._create()
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("model signing key was readable by others (mode %o); set it to 0600", mode)
            self.path.chmod(0o600)
        try:
            key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        except ValueError:
            raise RegistryError(
                f"the model signing key {self.path} is not a valid PEM key"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise RegistryError(f"the model signing key {self.path} is not an Ed25519 key")
        self._key = key
        return key

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-key-")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            # link() fails if another process made the key meanwhile: then its key is the key.
            try:
                os.link(tmp, self.path)
                log.info("made a model signing key (key id %s)", public_key_id(key.public_key()))
            except FileExistsError:
                pass
        finally:
            Path(tmp).unlink(missing_ok=True)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._load_or_create().public_key()

    @property
    def key_id(self) -> str:
        return public_key_id(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self._load_or_create().sign(data)


def canonical_json(obj: Any) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sign_metadata(metadata: Mapping[str, Any], key: SigningKey) -> bytes:
    """The metadata file's bytes: the metadata and an Ed25519 signature over its canonical JSON."""
    signature = key.sign(canonical_json(metadata))
    raw_pub = key.public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    doc = {
        "format": METADATA_FORMAT,
        "metadata": metadata,
        "signature": {
            "algorithm": "ed25519",
            "key_id": key.key_id,
            "public_key": base64.b64encode(raw_pub).decode(),
            "signed": "canonical JSON of `metadata` (sorted keys, no spaces, UTF-8)",
            "value": base64.b64encode(signature).decode(),
        },
    }
    return (
        json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False).encode()
        + b"\n"
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # A duplicate key could show a person one value while the signature covers another.
            raise VerificationError(f"metadata repeats the key {k!r}")
        out[k] = v
    return out


def metadata_path_for(weights_path: Path) -> Path:
    """Where the metadata of a downloaded weights file lives: beside it, `FILE.meta.json`."""
    return weights_path.with_name(weights_path.name + METADATA_SUFFIX)


@dataclass(frozen=True)
class VerifiedModel:
    metadata: dict[str, Any]
    key_id: str
    sha256: str
    size: int


def verify_download(
    weights_path: Path, meta_path: Path, public_key: Ed25519PublicKey
) -> VerifiedModel:
    """Check a downloaded model: the metadata is signed by `public_key` and the weights match it.

    `public_key` must come from a trusted place (the controller, or a key file exported from it),
    never from the metadata itself. Raises VerificationError with what failed.
    """
    weights_path, meta_path = Path(weights_path), Path(meta_path)
    try:
        raw = meta_path.read_bytes()
    except OSError as exc:
        raise VerificationError(f"cannot read metadata {meta_path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise VerificationError(
            f"metadata {meta_path} is not valid JSON: it was damaged or altered"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != METADATA_FORMAT:
        raise VerificationError(f"{meta_path} is not fedsky model metadata ({METADATA_FORMAT})")
    metadata, sig = doc.get("metadata"), doc.get("signature")
    if not isinstance(metadata, dict) or not isinstance(sig, dict):
        raise VerificationError(f"metadata {meta_path} lacks its metadata or signature")
    if sig.get("algorithm") != "ed25519" or not isinstance(sig.get("value"), str):
        raise VerificationError(f"metadata {meta_path} carries no Ed25519 signature")
    trusted_id = public_key_id(public_key)
    try:
        signature = base64.b64decode(sig["value"], validate=True)
        public_key.verify(signature, canonical_json(metadata))
    except (InvalidSignature, ValueError):
        if sig.get("key_id") != trusted_id:
            raise VerificationError(
                f"metadata {meta_path} was not signed by this controller: it names key "
                f"{sig.get('key_id')!r}, the trusted key is {trusted_id}"
            ) from None
        raise VerificationError(
            f"metadata {meta_path} was altered after signing: its signature does not match its "
            f"content (key {trusted_id})"
        ) from None
    weights = metadata.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("sha256"), str):
        raise VerificationError(f"metadata {meta_path} does not describe the weights")
    try:
        sha, size = sha256_file(weights_path)
    except OSError as exc:
        raise VerificationError(f"cannot read weights {weights_path}: {exc.strerror}") from None
    if size != weights.get("size") or sha != weights["sha256"]:
        raise VerificationError(
            f"weights {weights_path} do not match the signed metadata: SHA-256 {sha[:16]}... "
            f"({size} bytes), signed {weights['sha256'][:16]}... ({weights.get('size')} bytes); "
            "the file was damaged or replaced"
        )
    return VerifiedModel(metadata=metadata, key_id=trusted_id, sha256=sha, size=size)


# =============================================================================================
# 3. The service
# =============================================================================================


class RegistryConfig(BaseModel):
    """The `[registry]` section of controller.toml."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Default retention for jobs that do not set their own: "all", "best" or "last".
    retention: RetentionMode = "best"
    keep: int = Field(default=5, ge=1, le=100000)
    # Bound on the whole checkpoint store (distinct blobs), bytes; 0 = no bound beyond retention.
    max_bytes: int = Field(default=10 << 30, ge=0)
    # Default: <state_dir>/models
    directory: Path | None = None

    @field_validator("directory")
    @classmethod
    def _resolve(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Relative to the config file's directory, like every path in controller.toml.
        if value is None:
            return None
        return resolve_path(value, (info.context or {}).get("config_dir"))

    @property
    def default_policy(self) -> RetentionPolicy:
        return RetentionPolicy(self.retention, self.keep)


SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE registry_jobs (
        job_id TEXT PRIMARY KEY,
        name TEXT,
        selection_metric TEXT NOT NULL DEFAULT 'accuracy',
        thresholds TEXT NOT NULL DEFAULT '[]',
        hyperparameters TEXT NOT NULL DEFAULT '{}',
        model_digest TEXT,
        participants TEXT NOT NULL DEFAULT '[]',
        datasets TEXT NOT NULL DEFAULT '[]',
        retention TEXT,
        status TEXT,
        created_at TEXT NOT NULL,
        ended_at TEXT
    )
    """,
    """
    CREATE TABLE registry_rounds (
        job_id TEXT NOT NULL REFERENCES registry_jobs(job_id) ON DELETE CASCADE,
        round INTEGER NOT NULL CHECK (round >= 0),
        accuracy REAL,
        loss REAL,
        f1 REAL,
        recall REAL,
        precision REAL,
        metrics TEXT NOT NULL DEFAULT '{}',
        per_class TEXT,
        confusion TEXT,
        participants TEXT NOT NULL DEFAULT '[]',
        failures TEXT NOT NULL DEFAULT '[]',
        duration_s REAL,
        weights_sha256 TEXT,
        weights_size INTEGER,
        weights_pruned_at TEXT,
        pinned INTEGER NOT NULL DEFAULT 0,
        recorded_at TEXT NOT NULL,
        seq INTEGER NOT NULL,
        PRIMARY KEY (job_id, round)
    )
    """,
    "CREATE INDEX registry_rounds_sha ON registry_rounds(weights_sha256)",
)


def _upsert(table: str, columns: Sequence[str], key: Sequence[str], also: str = "") -> str:
    """INSERT ... ON CONFLICT(key) DO UPDATE every other column (names are constants here)."""
    updates = [f"{c}=excluded.{c}" for c in columns if c not in key and c != "created_at"]
    if also:
        updates.append(also)
    return (
        f"INSERT INTO {table}({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "  # noqa: S608
        f"ON CONFLICT({', '.join(key)}) DO UPDATE SET {', '.join(updates)}"
    )


_JOB_UPSERT = _upsert(
    "registry_jobs",
    (
        "job_id",
        "name",
        "selection_metric",
        "thresholds",
        "hyperparameters",
        "model_digest",
        "participants",
        "datasets",
        "retention",
        "created_at",
    ),
    ("job_id",),
)
_ROUND_UPSERT = _upsert(
    "registry_rounds",
    (
        "job_id",
        "round",
        "accuracy",
        "loss",
        "f1",
        "recall",
        "precision",
        "metrics",
        "per_class",
        "confusion",
        "participants",
        "failures",
        "duration_s",
        "weights_sha256",
        "weights_size",
        "recorded_at",
        "seq",
    ),
    ("job_id", "round"),
    also="weights_pruned_at=NULL",
)


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    name: str | None
    selection: Criteria
    hyperparameters: dict[str, Any]
    model_digest: str | None
    participants: list[str]
    datasets: Any
    retention: RetentionPolicy | None  # None: the controller's default
    status: str | None
    created_at: str
    ended_at: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "name": self.name,
            "selection_metric": self.selection.metric,
            "thresholds": [t.to_dict() for t in self.selection.thresholds],
            "hyperparameters": self.hyperparameters,
            "model_digest": self.model_digest,
            "participants": self.participants,
            "datasets": self.datasets,
            "retention": self.retention.describe() if self.retention else None,
            "status": self.status,
            "created_at": self.created_at,
            "ended_at": self.ended_at,
        }


@dataclass(frozen=True)
class RoundRecord:
    job_id: str
    round: int
    metrics: dict[str, float | None]
    all_metrics: dict[str, float]
    per_class: Any
    confusion_matrix: list[list[int]] | None
    # One entry per contributing site: {"site": id, "train_examples": n, "eval_examples": n, ...}
    participants: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    duration_s: float | None
    weights_sha256: str | None
    weights_size: int | None
    weights_pruned_at: str | None
    pinned: bool
    recorded_at: str

    @property
    def summary(self) -> RoundSummary:
        return RoundSummary(self.job_id, self.round, self.metrics)

    @property
    def has_checkpoint(self) -> bool:
        return self.weights_sha256 is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "round": self.round,
            "metrics": self.metrics,
            "all_metrics": self.all_metrics,
            "per_class": self.per_class,
            "confusion_matrix": self.confusion_matrix,
            "participants": self.participants,
            "failures": self.failures,
            "train_examples": sum(int(p.get("train_examples") or 0) for p in self.participants),
            "eval_examples": sum(int(p.get("eval_examples") or 0) for p in self.participants),
            "duration_s": self.duration_s,
            "checkpoint": (
                {"sha256": self.weights_sha256, "size": self.weights_size}
                if self.weights_sha256
                else None
            ),
            "pruned_at": self.weights_pruned_at,
            "pinned": self.pinned,
            "recorded_at": self.recorded_at,
        }


@dataclass(frozen=True)
class StoreUsage:
    blobs: int
    bytes: int
    max_bytes: int
    checkpoints: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "blobs": self.blobs,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "checkpoints": self.checkpoints,
        }


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _finite(value: Any) -> float | None:
    """A metric value as float; NaN, infinities and non-numbers become None (not recorded)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _contributions(
    participants: Sequence[Mapping[str, Any]] | Mapping[str, int],
) -> list[dict[str, Any]]:
    """Participants as a list of {"site": id, counts...}; {site: train examples} is accepted."""
    if isinstance(participants, Mapping):
        return [{"site": str(k), "train_examples": int(v)} for k, v in sorted(participants.items())]
    out = []
    for p in participants:
        entry = dict(p)
        if not isinstance(entry.get("site"), str):
            raise RegistryError("each participant needs a site id")
        out.append(entry)
    return out


def _json_or_none(value: Any, what: str) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError):
        raise RegistryError(
            f"{what} is not plain JSON data (numbers, strings, lists, maps)"
        ) from None


def _load(text: str | None, default: Any) -> Any:
    return default if text is None else json.loads(text)


def _job_from_row(row: sqlite3.Row) -> JobRecord:
    thresholds = tuple(
        Threshold(metric=t["metric"], kind=t["kind"], bound=float(t["bound"]))
        for t in _load(row["thresholds"], [])
    )
    return JobRecord(
        job_id=row["job_id"],
        name=row["name"],
        selection=Criteria(metric=row["selection_metric"], thresholds=thresholds),
        hyperparameters=_load(row["hyperparameters"], {}),
        model_digest=row["model_digest"],
        participants=_load(row["participants"], []),
        datasets=_load(row["datasets"], []),
        retention=RetentionPolicy.parse(row["retention"]) if row["retention"] else None,
        status=row["status"],
        created_at=row["created_at"],
        ended_at=row["ended_at"],
    )


def _round_from_row(row: sqlite3.Row) -> RoundRecord:
    return RoundRecord(
        job_id=row["job_id"],
        round=int(row["round"]),
        metrics={m: row[m] for m in METRICS},
        all_metrics=_load(row["metrics"], {}),
        per_class=_load(row["per_class"], None),
        confusion_matrix=_load(row["confusion"], None),
        participants=_load(row["participants"], []),
        failures=_load(row["failures"], []),
        duration_s=row["duration_s"],
        weights_sha256=row["weights_sha256"],
        weights_size=row["weights_size"],
        weights_pruned_at=row["weights_pruned_at"],
        pinned=bool(row["pinned"]),
        recorded_at=row["recorded_at"],
    )


def _get_job(conn: sqlite3.Connection, job_id: str) -> JobRecord | None:
    row = conn.execute("SELECT * FROM registry_jobs WHERE job_id = ?", (job_id,)).fetchone()
    return _job_from_row(row) if row else None


def _get_rounds(conn: sqlite3.Connection, job_id: str | None) -> list[RoundRecord]:
    if job_id is None:
        rows = conn.execute("SELECT * FROM registry_rounds ORDER BY job_id, round").fetchall()
    else:
        rows = conn.execute(
            "SELECT * FROM registry_rounds WHERE job_id = ? ORDER BY round", (job_id,)
        ).fetchall()
    return [_round_from_row(r) for r in rows]


def _held_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the distinct checkpoints rounds refer to (a shared blob counts once)."""
    row = conn.execute(
        "SELECT COALESCE(SUM(size), 0) FROM (SELECT DISTINCT weights_sha256, weights_size AS size "
        "FROM registry_rounds WHERE weights_sha256 IS NOT NULL)"
    ).fetchone()
    return int(row[0])


def _referenced(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT DISTINCT weights_sha256 FROM registry_rounds WHERE weights_sha256 IS NOT NULL"
    )
    return {r[0] for r in rows}


class Registry:
    """The Model Manager service (`services.parts["registry"]`).

    Mutations are serialised by one asyncio lock: recording a round, pinning and pruning must not
    interleave, or a blob shared by two rounds could be deleted while a new round refers to it.
    SQLite runs in the store's thread and file I/O in a worker thread; nothing blocks the loop.
    """

    def __init__(self, *, store: Store, root: Path, config: RegistryConfig | None = None) -> None:
        self.store = store
        self.config = config or RegistryConfig()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.blobs = BlobStore(self.root / "blobs")
        self.signing_key = SigningKey(self.root / "signing.key")
        self._lock = asyncio.Lock()
        store.ensure_schema("registry", SCHEMA)
        self._reconcile()

    @classmethod
    def from_controller_config(cls, *, store: Store, config: Any) -> Registry:
        """Build from the controller's config: `config.registry` if it has one, else defaults."""
        reg = getattr(config, "registry", None) or RegistryConfig()
        root = reg.directory or (Path(config.state_dir) / "models")
        return cls(store=store, root=root, config=reg)

    def _reconcile(self) -> None:
        """At start: drop temporaries and blobs no round refers to (left by a crash mid-way)."""
        swept = self.blobs.sweep_temporaries()
        referenced = self.store.call(_referenced)
        orphans = [sha for sha, _ in self.blobs.walk() if sha not in referenced]
        for sha in orphans:
            self.blobs.delete(sha)
        missing = [sha for sha in referenced if not self.blobs.path(sha).exists()]
        if swept or orphans:
            log.info(
                "model store: removed %d unfinished writes and %d unreferenced checkpoints",
                swept,
                len(orphans),
            )
        if missing:
            log.warning(
                "model store: %d checkpoints are missing from %s", len(missing), self.blobs.root
            )

    # -- recording -------------------------------------------------------------------------------

    async def record_job(
        self,
        *,
        job_id: str,
        name: str | None = None,
        selection_metric: str = "accuracy",
        thresholds: Sequence[Threshold] = (),
        hyperparameters: Mapping[str, Any] | None = None,
        model_digest: str | None = None,
        participants: Sequence[str] = (),
        datasets: Sequence[str] | Mapping[str, str] = (),
        retention: RetentionPolicy | None = None,
    ) -> JobRecord:
        """Record (or update) what the download metadata says about a job; call at submit."""
        selection = Criteria(metric=parse_metric(selection_metric), thresholds=tuple(thresholds))
        hp = _json_or_none(dict(hyperparameters or {}), "hyperparameters")
        ds = _json_or_none(
            datasets if isinstance(datasets, Mapping) else list(datasets), "datasets"
        )
        values = (
            job_id,
            name,
            selection.metric,
            json.dumps([t.to_dict() for t in selection.thresholds]),
            hp,
            model_digest,
            json.dumps(list(participants)),
            ds,
            retention.describe() if retention else None,
            _now(),
        )

        def write(conn: sqlite3.Connection) -> JobRecord:
            with transaction(conn):
                conn.execute(_JOB_UPSERT, values)
                job = _get_job(conn, job_id)
            assert job is not None
            return job

        async with self._lock:
            return await self.store.run(write)

    async def record_round(
        self,
        *,
        job_id: str,
        round: int,
        metrics: Mapping[str, Any],
        per_class: Any = None,
        confusion_matrix: Sequence[Sequence[int]] | None = None,
        participants: Sequence[Mapping[str, Any]] | Mapping[str, int] = (),
        failures: Sequence[Mapping[str, Any]] = (),
        duration_s: float | None = None,
        weights: bytes | None = None,
    ) -> RoundRecord:
        """Record one round (call for each RoundMetrics); then enforce retention.

        `metrics` holds accuracy, loss, f1, recall, precision (other numeric entries are kept
        too); NaN or infinite values are stored as missing. `weights` are the global weights as
        a safetensors file. Recording the same round again replaces it (a redelivered message).
        """
        if round < 0:
            raise RegistryError(f"round {round}: rounds are numbered from 0")
        all_metrics: dict[str, float] = {}
        for key, value in metrics.items():
            number = _finite(value)
            if number is not None:
                all_metrics[_METRIC_ALIASES.get(key.lower(), key.lower())] = number
        five = {m: all_metrics.get(m) for m in METRICS}
        parts = _contributions(participants)
        failures_json = _json_or_none([dict(f) for f in failures], "failures") or "[]"
        confusion = (
            [[int(c) for c in row] for row in confusion_matrix]
            if confusion_matrix is not None
            else None
        )
        per_class_json = _json_or_none(per_class, "per-class figures")
        if weights is not None:
            try:
                safetensors_header(weights)
            except ValueError as exc:
                raise RegistryError(
                    f"job {job_id} round {round}: the weights are not a safetensors file ({exc})"
                ) from None

        async with self._lock:
            ref = await asyncio.to_thread(self.blobs.put, weights) if weights is not None else None
            try:
                record, replaced = await self.store.run(
                    self._insert_round,
                    job_id,
                    round,
                    five,
                    all_metrics,
                    per_class_json,
                    confusion,
                    parts,
                    failures_json,
                    duration_s,
                    ref,
                )
            except BaseException:
                if ref is not None:
                    await self._collect([ref.sha256])
                raise
            await self._collect(replaced)
            await self._enforce_locked(job_id)
            # Re-read: retention may have dropped this round's own checkpoint (global bound).
            rounds = await self.store.run(_get_rounds, job_id)
        log.info(
            "recorded job %s round %d (accuracy %s, loss %s, f1 %s)",
            job_id,
            round,
            _fmt(five["accuracy"]),
            _fmt(five["loss"]),
            _fmt(five["f1"]),
        )
        return next((r for r in rounds if r.round == round), record)

    async def record_round_message(
        self, message: RoundMetrics, *, weights: bytes | None
    ) -> RoundRecord:
        """Record a `RoundMetrics` from the aggregator, with the reassembled weights file (or None).

        The weights must match the message's `weights` reference (SHA-256 and size): a mismatch
        means the chunks were mixed up, and the round is recorded without a checkpoint rather
        than with the wrong one.
        """
        ref = message.weights
        got = None
        if weights is not None:
            got = (await asyncio.to_thread(sha256_hex, weights), len(weights))
        if got is not None and ref is not None and got != (ref.sha256, ref.size):
            log.warning(
                "job %s round %d: reassembled weights do not match their announced SHA-256; "
                "recording the round without a checkpoint",
                message.job_id,
                message.round,
            )
            weights = None
        metrics: dict[str, float] = {
            "accuracy": message.accuracy,
            "loss": message.loss,
            "f1": message.f1,
            "recall": message.recall,
            "precision": message.precision,
        }
        if message.train_loss is not None:
            metrics["train_loss"] = message.train_loss
        return await self.record_round(
            job_id=message.job_id,
            round=message.round,
            metrics=metrics,
            per_class=[c.model_dump(mode="json") for c in message.per_class],
            confusion_matrix=message.confusion_matrix,
            participants=[p.model_dump(mode="json") for p in message.participants],
            failures=[f.model_dump(mode="json") for f in message.failures],
            duration_s=message.duration_s,
            weights=weights,
        )

    def _insert_round(
        self,
        conn: sqlite3.Connection,
        job_id: str,
        round_no: int,
        five: dict[str, float | None],
        all_metrics: dict[str, float],
        per_class_json: str | None,
        confusion: list[list[int]] | None,
        participants: list[dict[str, Any]],
        failures_json: str,
        duration_s: float | None,
        ref: BlobRef | None,
    ) -> tuple[RoundRecord, list[str]]:
        now = _now()
        with transaction(conn):
            old = conn.execute(
                "SELECT weights_sha256 FROM registry_rounds WHERE job_id = ? AND round = ?",
                (job_id, round_no),
            ).fetchone()
            conn.execute(
                "INSERT OR IGNORE INTO registry_jobs(job_id, created_at) VALUES (?, ?)",
                (job_id, now),
            )
            seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM registry_rounds").fetchone()
            conn.execute(
                _ROUND_UPSERT,
                (
                    job_id,
                    round_no,
                    five["accuracy"],
                    five["loss"],
                    five["f1"],
                    five["recall"],
                    five["precision"],
                    json.dumps(all_metrics, sort_keys=True),
                    per_class_json,
                    None if confusion is None else json.dumps(confusion),
                    _json_or_none(participants, "participants"),
                    failures_json,
                    _finite(duration_s),
                    ref.sha256 if ref else None,
                    ref.size if ref else None,
                    now,
                    seq[0],
                ),
            )
            row = conn.execute(
                "SELECT * FROM registry_rounds WHERE job_id = ? AND round = ?", (job_id, round_no)
            ).fetchone()
        # A redelivered round with other weights leaves the old blob for collection.
        replaced = [old[0]] if old and old[0] and old[0] != row["weights_sha256"] else []
        return _round_from_row(row), replaced

    async def finish_job(self, *, job_id: str, status: str) -> None:
        """Record a job's end state (completed, failed, cancelled); enforce retention once more."""

        def write(conn: sqlite3.Connection) -> None:
            now = _now()
            conn.execute(
                "INSERT INTO registry_jobs(job_id, created_at, status, ended_at) "
                "VALUES (?, ?, ?, ?) ON CONFLICT(job_id) DO UPDATE SET "
                "status=excluded.status, ended_at=excluded.ended_at",
                (job_id, now, status, now),
            )

        async with self._lock:
            await self.store.run(write)
            await self._enforce_locked(job_id)

    async def delete_job(self, *, job_id: str) -> int:
        """Forget a job: its rounds and the checkpoints only it used. Returns rounds removed."""

        def write(conn: sqlite3.Connection) -> tuple[int, list[str]]:
            with transaction(conn):
                before = _referenced(conn)
                n = conn.execute("DELETE FROM registry_rounds WHERE job_id = ?", (job_id,)).rowcount
                conn.execute("DELETE FROM registry_jobs WHERE job_id = ?", (job_id,))
                gone = sorted(before - _referenced(conn))
            return n, gone

        async with self._lock:
            n, gone = await self.store.run(write)
            await asyncio.to_thread(self._delete_blobs, gone)
        return n

    async def pin(self, *, job_id: str, round: int, pinned: bool = True) -> RoundRecord:
        """Pin (or unpin) a round: a pinned checkpoint is never pruned."""

        def write(conn: sqlite3.Connection) -> RoundRecord:
            row = conn.execute(
                "SELECT * FROM registry_rounds WHERE job_id = ? AND round = ?", (job_id, round)
            ).fetchone()
            if row is None:
                raise NotFound(f"job {job_id} has no round {round}")
            if pinned and row["weights_sha256"] is None:
                raise RegistryError(
                    f"job {job_id} round {round} has no checkpoint left to pin (pruned)"
                )
            conn.execute(
                "UPDATE registry_rounds SET pinned = ? WHERE job_id = ? AND round = ?",
                (int(pinned), job_id, round),
            )
            return replace(_round_from_row(row), pinned=pinned)

        async with self._lock:
            record = await self.store.run(write)
            if not pinned:
                await self._enforce_locked(job_id)
        return record

    # -- retention -------------------------------------------------------------------------------

    async def enforce_retention(self, job_id: str) -> None:
        async with self._lock:
            await self._enforce_locked(job_id)

    async def _enforce_locked(self, job_id: str) -> None:
        gone = await self.store.run(self._prune, job_id)
        if gone:
            await asyncio.to_thread(self._delete_blobs, gone)

    async def _collect(self, shas: Sequence[str]) -> None:
        """Delete those of `shas` that no round refers to (call with the lock held)."""
        if not shas:
            return
        referenced = await self.store.run(_referenced)
        await asyncio.to_thread(self._delete_blobs, [s for s in shas if s not in referenced])

    def _delete_blobs(self, shas: Sequence[str]) -> None:
        for sha in shas:
            self.blobs.delete(sha)

    def _rows(self, conn: sqlite3.Connection, job_id: str | None) -> list[CheckpointRow]:
        sql = (
            "SELECT job_id, round, accuracy, loss, f1, recall, precision, weights_sha256, "
            "weights_size, pinned, seq FROM registry_rounds"
        )
        rows = (
            conn.execute(sql + " WHERE job_id = ?", (job_id,)).fetchall()
            if job_id
            else conn.execute(sql).fetchall()
        )
        return [
            CheckpointRow(
                summary=RoundSummary(r["job_id"], int(r["round"]), {m: r[m] for m in METRICS}),
                sha256=r["weights_sha256"],
                size=int(r["weights_size"] or 0),
                pinned=bool(r["pinned"]),
                order=int(r["seq"]),
            )
            for r in rows
        ]

    def _prune(self, conn: sqlite3.Connection, job_id: str) -> list[str]:
        """Apply the job's policy, then the store's bound; returns blobs no round refers to now."""
        with transaction(conn):
            job = _get_job(conn, job_id)
            selection = job.selection if job else Criteria()
            policy = (job.retention if job else None) or self.config.default_policy
            drops = [
                (job_id, r) for r in retention_drops(self._rows(conn, job_id), policy, selection)
            ]
            # The whole-store pass reads every row: only when the store may be over its bound.
            if self.config.max_bytes and _held_bytes(conn) > self.config.max_bytes:
                all_rows = self._rows(conn, None)
                drop_set = set(drops)
                remaining = [
                    r for r in all_rows if (r.summary.job_id, r.summary.round) not in drop_set
                ]
                protected: set[tuple[str, int]] = set()
                by_job: dict[str, list[CheckpointRow]] = {}
                for r in remaining:
                    by_job.setdefault(r.summary.job_id, []).append(r)
                for jid, rows in by_job.items():
                    other = _get_job(conn, jid)
                    sel = other.selection if other else Criteria()
                    protected |= {(jid, n) for n in protected_rounds(rows, sel)}
                evict = global_evictions(remaining, protected, self.config.max_bytes)
                evicted = set(evict)
                drops += evict
                held = {
                    r.sha256: r.size
                    for r in remaining
                    if r.sha256 and (r.summary.job_id, r.summary.round) not in evicted
                }
                if sum(held.values()) > self.config.max_bytes:
                    log.warning(
                        "model store holds %d bytes, above its bound of %d, in checkpoints "
                        "that are pinned or best for their job; unpin some or raise "
                        "[registry] max_bytes",
                        sum(held.values()),
                        self.config.max_bytes,
                    )
            if not drops:
                return []
            before = _referenced(conn)
            now = _now()
            conn.executemany(
                "UPDATE registry_rounds SET weights_sha256 = NULL, weights_size = NULL, "
                "weights_pruned_at = ? "
                "WHERE job_id = ? AND round = ?",
                [(now, jid, n) for jid, n in drops],
            )
            gone = sorted(before - _referenced(conn))
        log.info("retention dropped %d checkpoints (%d files)", len(drops), len(gone))
        return gone

    # -- queries ---------------------------------------------------------------------------------

    async def job(self, job_id: str) -> JobRecord:
        job = await self.store.run(_get_job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id} in the model registry")
        return job

    async def jobs(self) -> list[JobRecord]:
        def read(conn: sqlite3.Connection) -> list[JobRecord]:
            return [
                _job_from_row(r)
                for r in conn.execute("SELECT * FROM registry_jobs ORDER BY created_at, job_id")
            ]

        return await self.store.run(read)

    async def rounds(self, job_id: str) -> list[RoundRecord]:
        """Every recorded round of a job, in order (NotFound for an unknown job)."""
        await self.job(job_id)
        return await self.store.run(_get_rounds, job_id)

    async def round(self, job_id: str, round_no: int) -> RoundRecord:
        def read(conn: sqlite3.Connection) -> RoundRecord | None:
            row = conn.execute(
                "SELECT * FROM registry_rounds WHERE job_id = ? AND round = ?", (job_id, round_no)
            ).fetchone()
            return _round_from_row(row) if row else None

        record = await self.store.run(read)
        if record is None:
            await self.job(job_id)
            raise NotFound(f"job {job_id} has no round {round_no}")
        return record

    async def best(
        self,
        *,
        job_ids: Sequence[str] | None,
        criteria: Criteria | None = None,
        thresholds: Sequence[Threshold] = (),
        runners_up: int = 3,
    ) -> Recommendation:
        """Recommend among the rounds that still hold a checkpoint.

        `job_ids=None` means every job. Without `criteria`, one job's own selection metric is used
        (`thresholds`, when given, replace the job's own); across jobs `criteria` is required.
        """
        if criteria is None:
            if job_ids is None or len(job_ids) != 1:
                raise RegistryError("across jobs, name the metric or score to compare by")
            job = await self.job(job_ids[0])
            criteria = replace(
                job.selection, thresholds=tuple(thresholds) or job.selection.thresholds
            )
        if job_ids is None:
            records = await self.store.run(_get_rounds, None)
        else:
            records = []
            for jid in job_ids:
                records += await self.rounds(jid)
        held = [r.summary for r in records if r.has_checkpoint]
        rec = recommend(held, criteria, runners_up=runners_up)
        pruned = len(records) - len(held)
        if pruned:
            rec = replace(
                rec,
                notes=(
                    f"{pruned} of {len(records)} rounds have no checkpoint (pruned, or none "
                    "was recorded) and were not considered",
                ),
            )
        return rec

    async def usage(self) -> StoreUsage:
        def read(conn: sqlite3.Connection) -> tuple[int, int, int]:
            blobs = conn.execute(
                "SELECT COUNT(DISTINCT weights_sha256) FROM registry_rounds "
                "WHERE weights_sha256 IS NOT NULL"
            ).fetchone()[0]
            n = conn.execute(
                "SELECT COUNT(*) FROM registry_rounds WHERE weights_sha256 IS NOT NULL"
            ).fetchone()[0]
            return int(blobs), _held_bytes(conn), int(n)

        blobs, size, n = await self.store.run(read)
        return StoreUsage(blobs=blobs, bytes=size, max_bytes=self.config.max_bytes, checkpoints=n)

    # -- download --------------------------------------------------------------------------------

    async def weights(self, job_id: str, round_no: int) -> tuple[bytes, RoundRecord]:
        """A round's weights (safetensors bytes), checked against their SHA-256."""
        record = await self.round(job_id, round_no)
        if record.weights_sha256 is None:
            why = (
                f"pruned at {record.weights_pruned_at}"
                if record.weights_pruned_at
                else "none was recorded"
            )
            raise NotFound(f"job {job_id} round {round_no} has no checkpoint ({why})")
        data = await asyncio.to_thread(self.blobs.read, record.weights_sha256)
        return data, record

    async def signed_metadata(self, job_id: str, round_no: int) -> bytes:
        """The metadata file for a round's weights, signed with the controller's key."""
        record = await self.round(job_id, round_no)
        if record.weights_sha256 is None:
            raise NotFound(
                f"job {job_id} round {round_no} has no checkpoint (pruned or never recorded)"
            )
        job = await self.job(job_id)
        metadata = build_metadata(job, record)
        return await asyncio.to_thread(sign_metadata, metadata, self.signing_key)

    def public_key_pem(self) -> str:
        return public_key_pem(self.signing_key.public_key)


def build_metadata(job: JobRecord, record: RoundRecord) -> dict[str, Any]:
    """What the signed metadata file says about a downloaded model."""
    return {
        "job": {"id": job.job_id, "name": job.name, "status": job.status},
        "round": record.round,
        "metrics": record.metrics,
        "all_metrics": record.all_metrics,
        "per_class": record.per_class,
        "confusion_matrix": record.confusion_matrix,
        "hyperparameters": job.hyperparameters,
        "model_digest": job.model_digest,
        "participants": {"job": job.participants, "round": record.participants},
        "datasets": job.datasets,
        "selection_metric": job.selection.metric,
        "round_duration_s": record.duration_s,
        "recorded_at": record.recorded_at,
        "signed_at": _now(),
        "weights": {
            "format": WEIGHTS_FORMAT,
            "sha256": record.weights_sha256,
            "size": record.weights_size,
        },
    }


__all__ = [
    "LOWER_IS_BETTER",
    "METADATA_SUFFIX",
    "METRICS",
    "BlobStore",
    "CheckpointCorrupted",
    "CheckpointRow",
    "Criteria",
    "Infeasible",
    "JobRecord",
    "NotFound",
    "Ranked",
    "Recommendation",
    "Registry",
    "RegistryConfig",
    "RegistryError",
    "RetentionPolicy",
    "RoundRecord",
    "RoundSummary",
    "SigningKey",
    "Threshold",
    "ThresholdGap",
    "VerificationError",
    "VerifiedModel",
    "build_metadata",
    "canonical_json",
    "global_evictions",
    "load_public_key",
    "meets",
    "metadata_path_for",
    "nearest_round",
    "parse_metric",
    "parse_score",
    "parse_thresholds",
    "protected_rounds",
    "rank",
    "recommend",
    "retention_drops",
    "safetensors_header",
    "selection_ranking",
    "sign_metadata",
    "threshold_gaps",
    "verify_download",
]
