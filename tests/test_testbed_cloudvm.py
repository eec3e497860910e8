"""The testbed's cloud (`benchmarks/testbed/cloudvm.py`): what it refuses before booting
anything, and that its `systemctl` knows every directive of the unit fedsky's start-up script
writes (a directive added to the unit fails here rather than being silently ignored)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fedsky.controller.security.startup_script import render_startup_script

from benchmarks.testbed import cloudvm


def _unit_text() -> str:
    script = render_startup_script(
        job_id="job-u1",
        token="fsk1_" + "x" * 43,
        enroll_url="https://192.0.2.1:8443/v1/aggregators/enroll",
        ca_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        port=9092,
        artifacts=None,
        preinstalled=True,
    )
    body = script.split("<<'FEDSKY_UNIT'\n", 1)[1]
    return body.split("\nFEDSKY_UNIT\n", 1)[0]


def test_the_stand_in_knows_every_directive_of_the_superlink_unit(tmp_path: Path) -> None:
    unit = tmp_path / "fedsky-superlink.service"
    unit.write_text(_unit_text())
    keys = cloudvm._read_unit(unit)
    assert set(keys) <= cloudvm._HANDLED | cloudvm._SANDBOXING, set(keys) - cloudvm._HANDLED
    assert len(keys["LoadCredential"]) == 2
    assert keys["DynamicUser"] == ["yes"]
    assert "${CREDENTIALS_DIRECTORY}/key" in keys["ExecStart"][0]


@pytest.fixture
def state(tmp_path: Path) -> Path:
    path = tmp_path / "testbed.json"
    path.write_text(
        json.dumps(
            {
                "root": str(tmp_path / "cloud"),
                "regions": {"aws:eu-west-2": {"netns": "r-aws-eu-west-2", "address": "10.9.4.1"}},
            }
        )
    )
    return path


def _launch(
    state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], **args: str
) -> tuple[int, str]:
    user_data = args.pop("user_data", "#!/bin/bash\ntrue\n")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(user_data.encode())))
    argv = ["--testbed", str(state), "launch", "--instance-type", "t3.medium"]
    for key, value in {"job": "job-1", "cloud": "aws", "region": "eu-west-2", **args}.items():
        argv += [f"--{key}", value]
    code = cloudvm.main(argv)
    return code, capsys.readouterr().err


def test_launch_refuses_what_it_cannot_boot(
    state: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _launch(state, monkeypatch, capsys, region="ap-south-1")
    assert code == 1
    assert "no host for aws:ap-south-1 (its regions: aws:eu-west-2)" in err
    code, err = _launch(state, monkeypatch, capsys, job="../../etc")
    assert code == 1
    assert "is not one the testbed names machines after" in err
    code, err = _launch(state, monkeypatch, capsys, user_data="MZ\x90 not a script")
    assert code == 1
    assert "not a script" in err
    assert not (state.parent / "cloud" / "job-1").exists()


def test_terminate_and_list_know_nothing_of_an_unknown_machine(
    state: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cloudvm.main(["--testbed", str(state), "list"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cloudvm.main(["--testbed", str(state), "terminate", "--job", "j", "--ref", "x/j"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "gone"


def test_mount_points_made_for_a_machine_are_removed_only_when_empty(tmp_path: Path) -> None:
    record = tmp_path / cloudvm.CREATED
    made = tmp_path / "fs" / "etc" / "fedsky" / "aggregator"
    cloudvm.ensure_mountpoint(made, record=record)
    kept = tmp_path / "fs" / "opt" / "fedsky"
    cloudvm.ensure_mountpoint(kept, record=record)
    (kept / "something").write_text("not ours to delete")
    removed = cloudvm.remove_mountpoints(tmp_path)
    assert str(made) in removed
    assert not (tmp_path / "fs" / "etc").exists()
    assert (kept / "something").exists()
