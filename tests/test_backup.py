"""`fedctl backup create` on a running controller and `fedctl backup restore` on a fresh host:
the same CA, users, enrolled agents and an audit log that still verifies; a tampered backup, a
restore over live state or under a running controller are refused.

Real controllers (their own processes, managed brokers), two state directories standing for
two hosts. Also here, on the same controller: `fedctl agents enroll` checks it can keep the
bundle and key before it asks for them (they are made once)."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fedsky.controller.onebox import Onebox

pytestmark = pytest.mark.e2e


@pytest.fixture
def old_host(tmp_path: Path) -> Iterator[Onebox]:
    box = Onebox(root=tmp_path / "old")
    try:
        box.init_ca()
        box.start_controller()
        yield box
    finally:
        box.stop()


def test_a_backup_restores_the_controller_on_a_fresh_host(old_host: Onebox, tmp_path: Path) -> None:
    old_host.fedctl("users", "add", "vera", "--role", "viewer")
    old_host.fedctl(
        "agents",
        "enroll",
        "hospital-x",
        "--location",
        "aws:us-east-1",
        "--with-key",
        "--out",
        str(tmp_path / "bundle.json"),
    )
    backup = tmp_path / "fedsky.backup"
    made = old_host.fedctl("backup", "create", str(backup), "--json")  # while it runs
    names = {e["name"] for e in json.loads(made.stdout)["files"]}
    assert {"controller.db", "pki/ca.key", "pki/ca.crt", "audit-head.json"} <= names
    assert backup.stat().st_mode & 0o777 == 0o600
    refused = old_host.fedctl("backup", "create", str(backup), check=False)
    assert refused.returncode == 1
    assert "never written over" in refused.stderr
    # Restoring over the running controller's state is refused (its lock), and over any state
    # without --force.
    busy = old_host.fedctl("backup", "restore", str(backup), "--force", check=False)
    assert busy.returncode == 69, busy.stderr
    old_ca = (old_host.controller_dir / "state" / "pki" / "ca.crt").read_bytes()
    old_host.stop()

    new_host = Onebox(root=tmp_path / "new")
    try:
        new_host.write_controller_config()
        # A tampered backup is refused before anything is written.
        tampered = tmp_path / "tampered.backup"
        _tamper(backup, tampered, "pki/ca.crt")
        bad = new_host.fedctl("backup", "restore", str(tampered), check=False)
        assert bad.returncode == 1
        assert "does not have the digest" in bad.stderr
        assert not (new_host.controller_dir / "state" / "controller.db").exists()
        new_host.fedctl("backup", "restore", str(backup))
        key = new_host.controller_dir / "state" / "pki" / "ca.key"
        assert key.stat().st_mode & 0o777 == 0o600
        again = new_host.fedctl("backup", "restore", str(backup), check=False)
        assert again.returncode == 1
        assert "--force" in again.stderr
        new_host.start_controller()
        assert (new_host.controller_dir / "state" / "pki" / "ca.crt").read_bytes() == old_ca
        users = json.loads(new_host.fedctl("users", "list", "--json").stdout)
        assert [u["name"] for u in users] == ["vera"]
        agents = json.loads(new_host.fedctl("agents", "list", "--json").stdout)
        assert [a["id"] for a in agents] == ["hospital-x"]
        verdict = json.loads(new_host.fedctl("audit", "verify", "--json").stdout)
        assert verdict["ok"] is True, verdict
    finally:
        new_host.stop()


def _tamper(source: Path, out: Path, name: str) -> None:
    with tarfile.open(source, "r:gz") as tar, tarfile.open(out, "w:gz") as copy:
        for member in tar.getmembers():
            handle = tar.extractfile(member)
            assert handle is not None
            data = handle.read()
            if member.name == name:
                data = data.replace(b"A", b"B", 1)
                member.size = len(data)
            copy.addfile(member, io.BytesIO(data))


def test_enrolling_into_a_place_that_cannot_be_written_is_refused_before_enrolling(
    old_host: Onebox, tmp_path: Path
) -> None:
    """The bundle (and key) are made once: fedctl checks it can keep them before asking."""
    out = tmp_path / "no-such-dir" / "bundle.json"
    done = old_host.fedctl(
        "agents", "enroll", "hospital-y", "--location", "aws:us-east-1", "--with-key",
        "--out", str(out), check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert "cannot write" in done.stderr
    assert "Traceback" not in done.stderr
    agents = json.loads(old_host.fedctl("agents", "list", "--json").stdout)
    assert agents == []  # nothing was enrolled
