"""What the Model Manager knows of a job and of each of its rounds, as the API shows it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fedsky.controller.models.criteria import Criteria, RoundSummary
from fedsky.controller.models.retention import RetentionPolicy


def timestamp() -> str:
    """Now, as records and metadata carry it: ISO 8601 in UTC to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


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
