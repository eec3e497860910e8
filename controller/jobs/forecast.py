"""A job's forecast beside what was measured: the placement's predicted round time against each
round's measured duration, and the run's egress as the model counts it.

Plain functions over the job record and the Model Manager's rounds: the API shows them with the
job (`GET /v1/jobs/{id}`, `round_times`), so an operator can see how far the model is off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedsky.controller.models.records import RoundRecord


def predicted_round_s(placement: Mapping[str, Any] | None) -> float | None:
    """The round time placement predicted for its choice, if it placed the job."""
    choice = (placement or {}).get("choice") or {}
    value = choice.get("round_time_s")
    return float(value) if isinstance(value, int | float) else None


def round_times(
    placement: Mapping[str, Any] | None, rounds: Sequence[RoundRecord]
) -> list[dict[str, Any]]:
    """Per round: the prediction, the measured duration and the relative error
    (|predicted - measured| / measured), None where either is unknown."""
    predicted = predicted_round_s(placement)
    out = []
    for record in rounds:
        measured = record.duration_s
        error = (
            round(abs(predicted - measured) / measured, 4)
            if predicted is not None and measured
            else None
        )
        out.append(
            {
                "round": record.round,
                "predicted_s": None if predicted is None else round(predicted, 2),
                "measured_s": None if measured is None else round(measured, 2),
                "error": error,
            }
        )
    return out
