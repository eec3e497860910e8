"""A job's forecast beside what was measured: the placement's predicted round time against each
round's measured duration and phases, and the forecast the measured rounds refine.

Plain functions over the job record and the Model Manager's rounds: the API shows them with the
job (`GET /v1/jobs/{id}`, `round_times`), so an operator can see how far the model is off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fedsky.controller.models.records import RoundRecord
from fedsky.shared.messages import PHASE_NAMES


def predicted_round_s(placement: Mapping[str, Any] | None) -> float | None:
    """The round time placement predicted for its choice, if it placed the job."""
    choice = (placement or {}).get("choice") or {}
    value = choice.get("round_time_s")
    return float(value) if isinstance(value, int | float) else None


def round_times(
    placement: Mapping[str, Any] | None, rounds: Sequence[RoundRecord]
) -> list[dict[str, Any]]:
    """Per round: the placement's prediction, the measured duration and its phases (train,
    aggregate, evaluate, as the ServerApp timed them), the relative error (|predicted -
    measured| / measured), and the forecast refined by what was measured: before the first
    round the placement's prediction, after it the mean of the rounds measured so far (the
    participants' real training speed on their real VMs, which the placement could only
    estimate). None where a figure is unknown."""
    predicted = predicted_round_s(placement)
    out = []
    measured_so_far: list[float] = []
    for record in sorted(rounds, key=lambda r: r.round):
        measured = record.duration_s
        forecast = sum(measured_so_far) / len(measured_so_far) if measured_so_far else predicted
        phases = {name: record.all_metrics.get(f"{name}_phase_s") for name in PHASE_NAMES}
        out.append(
            {
                "round": record.round,
                "predicted_s": _rounded(predicted),
                "measured_s": _rounded(measured),
                "error": _error(predicted, measured),
                "phases_s": (
                    {k: round(v, 2) for k, v in phases.items() if v is not None}
                    if all(v is not None for v in phases.values())
                    else None
                ),
                "forecast_s": _rounded(forecast),
                "forecast_error": _error(forecast, measured),
            }
        )
        if measured:
            measured_so_far.append(measured)
    return out


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return round(abs(predicted - measured) / measured, 4)
