"""The systemd units in `systemd/`: valid (`systemd-analyze verify`, no warning), hardened
(`systemd-analyze security --offline=true`: at most 2.5 for the controller, 3.5 for the
agent), and running the daemons as their own users from their own venvs.

This machine has no systemd as PID 1; both commands work offline on the unit files."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

UNITS = Path(__file__).resolve().parents[1] / "systemd"
LIMITS = {"fedsky-controller.service": 2.5, "fedsky-agent.service": 3.5}
EXEC = {
    "fedsky-controller.service": ("fedsky", "/opt/fedsky-controller/venv/bin/fedsky-controller"),
    "fedsky-agent.service": ("fedsky-agent", "/opt/fedsky-agent/venv/bin/fedsky-agent"),
}


def _exposure(unit: Path) -> float:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1))


def test_every_unit_is_scored_within_its_limit() -> None:
    assert {p.name for p in UNITS.glob("*.service")} == set(LIMITS)
    for name, limit in LIMITS.items():
        assert _exposure(UNITS / name) <= limit, name


def test_a_weakened_unit_scores_worse(tmp_path: Path) -> None:
    """The score is read, not assumed: dropping the hardening raises it past the limit."""
    text = (UNITS / "fedsky-agent.service").read_text()
    loose = "\n".join(
        line
        for line in text.splitlines()
        if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))
    )
    path = tmp_path / "loose-agent.service"
    path.write_text(loose + "\n")
    assert _exposure(path) > LIMITS["fedsky-agent.service"]


def test_units_verify_without_warnings_and_run_as_their_users(tmp_path: Path) -> None:
    venv_bin = Path(sys.executable).parent
    for name, (user, command) in EXEC.items():
        text = (UNITS / name).read_text()
        assert f"\nUser={user}\n" in text
        assert f"\nExecStart={command} --config /etc/fedsky/" in text
        assert "Restart=on-failure" in text
        assert "StartLimitBurst=" in text
        # Verified with the commands where this checkout has them (the packages put them at
        # /opt/fedsky-*/venv).
        local = tmp_path / name
        local.write_text(text.replace(command, str(venv_bin / Path(command).name)))
        done = subprocess.run(
            ["systemd-analyze", "verify", str(local)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert done.stderr.strip() == "", done.stderr
