"""The case study on the testbed (`python -m benchmarks.testbed --case-study`).

The full run (three rounds per row) is a benchmark (`make bench`); here it runs one round per
row and the JSON's shape and the facts behind it are checked: every row placed, run and
measured on the testbed (the aggregator's region host sent at least every copy of the weights
the model counts), the baseline pinned to the study's offer, errors and changes as fractions,
and nothing left behind. The rows' arithmetic is checked on fixed inputs.

Needs root (namespaces), as here and in CI; its own prefix and subnet.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from fedsky.controller.placement.defaults import BASELINE_OFFER
from fedsky.shared.flower.calibrate import Calibration

from benchmarks.testbed.casestudy import (
    ROWS,
    measure_row,
    row_limits,
    run_case_study,
    table,
    with_comparisons,
)
from benchmarks.testbed.netns import blackhole_present, list_netns
from benchmarks.testbed.smoke import SmokeError
from tests.support.testbed import clear_testbed_leftovers

SUBNET = "10.216.0.0/16"
PREFIX = f"c{os.getpid() % 100000}-"


@pytest.fixture(autouse=True)
def _clean_slate() -> None:
    clear_testbed_leftovers(PREFIX)


ROW_KEYS = {
    "label", "cloud", "region", "instance_type", "predicted_round_s", "measured_round_s",
    "error", "predicted_cost", "measured_cost", "currency", "cost_change_vs_baseline",
    "time_change_vs_baseline", "weight_cost", "time_error", "cost_error",
}  # fmt: skip


def _job(usd_h: float, round_s: float, measured: list[float]) -> dict[str, Any]:
    return {
        "id": "j",
        "spec": {"participants": ["a", "b", "c"]},
        "placement": {
            "choice": {
                "cloud": "aws", "region": "us-east-1", "instance_type": "m5.xlarge",
                "usd_per_hour": usd_h, "egress_usd_per_gb": 0.09, "round_time_s": round_s,
            }
        },
        "round_times": [{"round": i + 1, "measured_s": m} for i, m in enumerate(measured)],
    }  # fmt: skip


def test_a_rows_cost_is_the_catalogs_prices_with_measured_hours_and_bytes() -> None:
    row = measure_row(
        job=_job(0.192, 40.0, [36.0, 44.0]), egress_bytes=400_000_000, model_mb=26.0,
        krw_per_usd=1000.0,
    )  # fmt: skip
    assert (row["predicted_round_s"], row["measured_round_s"], row["rounds"]) == (40.0, 40.0, 2)
    # Predicted: 2 rounds x (40 s of the instance + 6 + 4/3 copies of 26 MB); measured: 2
    # rounds at the median 40 s + 0.4 GB.
    assert row["predicted_cost"] == pytest.approx(
        1000 * 2 * (40 / 3600 * 0.192 + (6 + 4 / 3) * 0.026 * 0.09), abs=0.01
    )
    assert row["measured_cost"] == pytest.approx(1000 * (80 / 3600 * 0.192 + 0.4 * 0.09), abs=0.01)
    rows = with_comparisons(
        [
            {"label": "baseline", **row},
            {"label": "0.9", **row, "measured_cost": row["measured_cost"] / 2,
             "measured_round_s": 50.0},
        ]
    )  # fmt: skip
    assert rows[0]["cost_change_vs_baseline"] == 0.0
    assert rows[1]["cost_change_vs_baseline"] == pytest.approx(-0.5, abs=1e-4)
    assert rows[1]["time_change_vs_baseline"] == pytest.approx(0.25, abs=1e-4)
    assert rows[1]["time_error"] == rows[1]["error"] == pytest.approx(0.2, abs=1e-4)
    with pytest.raises(SmokeError, match="no measured round"):
        measure_row(job=_job(0.1, 1.0, []), egress_bytes=1, model_mb=1.0)


def test_the_baseline_is_pinned_and_the_weightings_keep_the_demos_limits() -> None:
    calibration = Calibration(train_s=12.0, eval_s=3.0, concurrency=3)
    base = row_limits(None, calibration)
    assert base.offer == ":".join(BASELINE_OFFER)
    assert (base.max_cost, base.max_latency_ms, base.train_s, base.eval_s) == (None, None, 12, 3)
    cheap = row_limits(0.9, calibration)
    assert (cheap.cost_weight, cheap.offer, cheap.train_s) == (0.9, None, 12)
    assert cheap.max_cost is not None
    assert cheap.max_latency_ms is not None


@pytest.mark.e2e
@pytest.mark.timeout(1500)
def test_one_round_per_row_on_the_testbed_has_the_case_studys_shape(wheelhouse: Path) -> None:
    # The calibration's local run, the daemons, the first installs and four jobs on 2 cores.
    # Its files go under /tmp (the agents' status sockets need a short path), removed after.
    result = run_case_study(
        rounds=1,
        images_per_class=16,
        subnet=SUBNET,
        prefix=PREFIX,
        wheelhouse=wheelhouse,
        rebuild_wheelhouse=False,
        warm_up=False,
    )
    rows = result["rows"]
    assert [r["label"] for r in rows] == [label for label, _ in ROWS]
    for row, (_, weight) in zip(rows, ROWS, strict=True):
        assert set(row) >= ROW_KEYS, row
        assert row["weight_cost"] == weight
        assert row["currency"] == "KRW"
        assert row["rounds"] == 1
        assert row["predicted_round_s"] > 0
        assert row["measured_round_s"] > 0
        assert row["measured_cost"] > 0
        assert row["error"] == row["time_error"] >= 0
        assert row["cost_error"] >= 0
        # The round's phases, timed by the aggregator the start-up script installed.
        assert set(row["phases_s"]) == {"train", "aggregate", "evaluate"}, row
        assert sum(row["phases_s"].values()) <= row["measured_round_s"] + 0.05
        # The region host sent at least every copy of the weights (2 per participant and one
        # to the controller): the bytes are measured, not the model's count.
        assert row["egress_bytes"] >= 7 * result["job"]["model_mb"] * 1e6, row
    baseline = rows[0]
    assert (baseline["cloud"], baseline["region"], baseline["instance_type"]) == BASELINE_OFFER
    assert baseline["cost_change_vs_baseline"] == 0.0
    assert result["job"]["model_mb"] > 25
    assert result["calibration"]["train_s"] > 0
    printed = table(result)
    assert "study: -41% cost" in printed
    assert "baseline" in printed
    assert not [n for n in list_netns() if n.startswith(PREFIX)]
    assert not blackhole_present(SUBNET)
