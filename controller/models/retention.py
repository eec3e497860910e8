"""Retention: which checkpoints of a job to keep, and what to evict when the store is full.

Plain functions over plain rows: the service reads the rows, calls these and drops what they
name. Every round's metrics stay; only weights are removed. The job's best round by its selection
metric and every pinned round are never dropped. The order is written out in docs/models.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fedsky.controller.models.criteria import Criteria, RoundSummary, meets, oriented, tie_key
from fedsky.shared.metrics import DEFAULT_SELECTION_METRIC

RetentionMode = Literal["all", "best", "last"]


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
    metric = selection.metric or DEFAULT_SELECTION_METRIC

    def key(r: RoundSummary) -> tuple[int, int, tuple[float, float, int, str]]:
        value = r.value(metric)
        infeasible = 0 if meets(r.metrics, selection.thresholds) else 1
        if value is None:
            return (infeasible, 1, (0.0, math.inf, r.round, r.job_id))
        return (infeasible, 0, tie_key(r, oriented(value, metric)))

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
