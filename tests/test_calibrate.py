"""Calibration: a participant's training and evaluation seconds per round, measured by running
the ClientApp's work in fresh processes on a real model and real data (digits)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fedsky.shared.datasets import BundledDatasetSpec, Partition, write_catalog
from fedsky.shared.flower.calibrate import CalibrationError, Workload, calibrate
from fedsky.shared.modelfile import make_example


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    root = tmp_path_factory.mktemp("calibrate")
    model = root / "digits.safetensors"
    make_example("digits", model)
    spec = BundledDatasetSpec(kind="digits", partition=Partition(index=0, count=2))
    catalog = write_catalog(root / "datasets.json", {"digits": spec})
    return Workload(model=model, datasets=catalog, dataset="digits", site="hospital-us", epochs=2)


def test_two_participants_at_once_give_positive_phase_times(workload: Workload) -> None:
    result = calibrate(workloads=[workload, workload])
    assert result.concurrency == 2
    # A fresh interpreter that imports torch alone takes well over 0.1 s.
    assert result.train_s > 0.1
    assert result.eval_s > 0.1
    assert (
        result.job_spec_lines() == f"train_s = {result.train_s:.1f}\neval_s = {result.eval_s:.1f}\n"
    )


def test_a_failing_phase_names_itself_and_why(workload: Workload) -> None:
    missing = Workload(
        model=workload.model, datasets=workload.datasets, dataset="xray", site="hospital-us"
    )
    with pytest.raises(CalibrationError, match=r"train process failed: .*'xray' is not configured"):
        calibrate(workloads=[missing])
    with pytest.raises(CalibrationError, match="no workload"):
        calibrate(workloads=[])


def test_the_command_prints_the_job_spec_lines_or_json(workload: Workload, tmp_path: Path) -> None:
    base = [sys.executable, "-m", "fedsky.shared.flower.calibrate"]
    args = ["--model", str(workload.model), "--datasets", str(workload.datasets)]
    done = subprocess.run(
        [*base, *args, "--dataset", "digits", "--json"], capture_output=True, text=True, check=True
    )
    figures = json.loads(done.stdout)
    assert set(figures) == {"train_s", "eval_s", "concurrency"}
    assert figures["train_s"] > 0
    absent = subprocess.run(
        [*base, "--model", str(tmp_path / "nope"), "--datasets", str(workload.datasets),
         "--dataset", "digits"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert absent.returncode == 2
    assert "nope is not a file" in absent.stderr
    failing = subprocess.run(
        [*base, *args, "--dataset", "xray"], capture_output=True, text=True, check=False
    )
    assert failing.returncode == 1
    assert "not configured" in failing.stderr
