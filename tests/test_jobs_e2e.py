"""A federated job end to end: controller, broker, agents and real Flower processes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedsky.controller.onebox import Onebox
from fedsky.shared.modelfile import make_example

pytestmark = pytest.mark.e2e

HOSPITALS = {"hospital-us": "aws:us-east-1", "hospital-asia": "aws:ap-northeast-2"}


def _datasets(index: int, count: int) -> str:
    return (
        "[datasets.digits]\n"
        'kind = "digits"\n'
        f'partition = {{ index = {index}, count = {count}, scheme = "label-skew", seed = 7 }}\n'
    )


def write_job(directory: Path, *, participants: list[str], rounds: int, dataset: str = "digits", **extra: Any) -> Path:
    model = directory / "digits.safetensors"
    if not model.exists():
        make_example("digits", model)
    resources = extra.get("resources", 'vcpus = 2\nmemory_gib = 4\ndisk_gib = 20')
    spec = directory / f"job-{rounds}-{dataset}.toml"
    spec.write_text(
        f'name = "{extra.get("name", "digits-e2e")}"\n'
        f"participants = {json.dumps(participants)}\n"
        f'model = "{model.name}"\n'
        f'dataset = "{dataset}"\n'
        'selection_metric = "f1"\n'
        "[hyperparameters]\n"
        f"rounds = {rounds}\n"
        "local_epochs = 1\n"
        "batch_size = 32\n"
        "learning_rate = 0.05\n"
        f"round_timeout_s = {extra.get('round_timeout_s', 120)}\n"
        f"[resources]\n{resources}\n"
        "[placement]\n"
        'max_cost = "85000 KRW/month"\n'
        "max_latency_ms = 250\n"
        "cost_weight = 0.5\n"
    )
    return spec


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Onebox]:
    extra = {name: _datasets(i, len(HOSPITALS)) for i, name in enumerate(HOSPITALS)}
    onebox = Onebox(root=tmp_path / "box", report_interval_s=3.0, poll_interval_s=0.5, agent_extra=extra)
    try:
        onebox.start(HOSPITALS)
        yield onebox
    finally:
        onebox.stop()


def wait_job(box: Onebox, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = box.api.get(f"/v1/jobs/{job_id}")
        if job["state"] in states:
            return job
        time.sleep(0.5)
    logs = box.fedctl("job", "logs", job_id, check=False).stdout
    raise AssertionError(f"job {job_id} is {job.get('state')} after {timeout} s, not {states}\n{logs}")


def superlink_pids(box: Onebox) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-superlink" in c for c in cmd[:2]) and any(str(box.root).encode() in c for c in cmd):
            out.append(int(proc.name))
    return out


def test_two_round_job_completes_and_aggregator_is_gone(box: Onebox, tmp_path: Path) -> None:
    spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=2)
    done = box.fedctl("job", "submit", str(spec), "--follow", "--json", timeout=600)
    job = json.loads(done.stdout)
    assert job["state"] == "completed", box.fedctl("job", "logs", job["id"]).stdout
    assert job["rounds_done"] == 2
    rounds = box.api.get(f"/v1/jobs/{job['id']}/models")
    assert [r["round"] for r in rounds["rounds"]] == [1, 2] if isinstance(rounds, dict) else [r["round"] for r in rounds] == [1, 2]
    assert superlink_pids(box) == []
    tasks = {t["participant"]: t for t in job["tasks"]}
    assert set(tasks) == set(HOSPITALS)
    assert all(t["vm"] in ("vm-001", "vm-002") for t in tasks.values())
