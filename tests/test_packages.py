"""The Debian packages, as hospital IT and the operator use them, on this machine (as root):
built from the pinned wheelhouse, installed with `dpkg -i`, both daemons run from the installed
files as their units would (the unit's user, environment and command: this machine has no
systemd as PID 1), an agent enrolled from a bundle and seen by `agentctl status` and `fedctl
agents`, an upgrade to a rebuilt package that keeps config and state, and a purge that leaves
nothing (files, users, directories)."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import free_port
from tests.support.wait import eventually_blocking

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fedsky-agent", "fedsky-controller")
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LEFTOVERS = (
    "/opt/fedsky-agent",
    "/opt/fedsky-controller",
    "/var/lib/fedsky",
    "/var/lib/fedsky-agent",
    "/etc/fedsky",
    "/usr/bin/agentctl",
    "/usr/bin/fedctl",
    "/lib/systemd/system/fedsky-agent.service",
    "/lib/systemd/system/fedsky-controller.service",
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="installs packages: needs root"),
]


def _run(*argv: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {done.returncode}: {done.stderr[-3000:]}")
    return done


def _purge() -> None:
    for user in ("fedsky", "fedsky-agent"):  # a killed daemon's broker, say
        _run("pkill", "-KILL", "-u", user, check=False)
    installed = [p for p in PACKAGES if _run("dpkg", "-s", p, check=False).returncode == 0]
    if installed:
        _run("dpkg", "-P", *installed)


def _unit(name: str) -> tuple[str, list[str], list[str]]:
    """(User, Environment assignments, ExecStart argv) of an installed unit."""
    user, env, argv = "", [], []
    for line in Path(f"/lib/systemd/system/{name}").read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "User":
            user = value
        elif key == "Environment":
            env += shlex.split(value)
        elif key == "ExecStart":
            argv = shlex.split(value)
    return user, env, argv


def _start_as_unit(name: str, log: Path) -> subprocess.Popen[bytes]:
    user, env, argv = _unit(name)
    with log.open("ab") as out:
        return subprocess.Popen(
            ["runuser", "-u", user, "--", "env", "-i", f"PATH={SYSTEMD_PATH}", *env, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    """What `systemctl stop` does: SIGTERM to the unit's processes; they end within seconds,
    the daemon saying it stops, with no traceback (`runuser` itself dies of the signal)."""
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert re.search(r"INFO \S+: (stopping|stopped)", text), text[-3000:]


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    work = tmp_path_factory.mktemp("packages")
    python = sys.executable
    _run(
        python, str(REPO / "scripts" / "build_artifacts.py"),
        "--role", "agent", "--role", "controller", "--out", str(work / "wheelhouse"),
        timeout=1200,
    )  # fmt: skip
    built: dict[str, Path] = {}
    for version in ("0.1.0", "0.1.1"):
        rows = json.loads(
            _run(
                python, str(REPO / "packaging" / "build_debs.py"),
                "--wheelhouse", str(work / "wheelhouse"), "--out", str(work / "dist"),
                "--work", str(work / "stage"), "--version", version,
                "--package", "agent", "--package", "controller", "--json",
            ).stdout
        )  # fmt: skip
        built |= {f"{row['package']}_{version}": Path(row["file"]) for row in rows}
    _purge()  # what a killed earlier run may have left
    try:
        yield built
    finally:
        _purge()


def test_install_enrol_run_upgrade_and_purge(debs: dict[str, Path], tmp_path: Path) -> None:
    agent_deb, controller_deb = debs["fedsky-agent_0.1.0"], debs["fedsky-controller_0.1.0"]
    # This machine has no libvirt group; a hospital's hypervisor has one, and the agent's user
    # joins it (for qemu:///system).
    made_group = _run("getent", "group", "libvirt", check=False).returncode != 0
    if made_group:
        _run("groupadd", "--system", "libvirt")
    try:
        _run("dpkg", "-i", str(agent_deb), str(controller_deb))
        groups = _run("id", "-nG", "fedsky-agent").stdout.split()
        assert "libvirt" in groups, groups
    finally:
        if made_group:
            _run("groupdel", "libvirt", check=False)
    # The agent package is light: no torch, numpy or Flower in its environment.
    found = _run(
        "/opt/fedsky-agent/venv/bin/python", "-c",
        "import importlib.util as u; print([m for m in ('torch', 'numpy', 'flwr') if u.find_spec(m)])",
    ).stdout.strip()  # fmt: skip
    assert found == "[]"
    # The dashboard's built files ship in the controller's package: nothing to build on the host.
    shipped = _run(
        "/opt/fedsky-controller/venv/bin/python", "-c",
        "from fedsky.controller.dashboard import STATIC_DIR, VENDOR_DIR, VENDOR_FILES as V; "
        "print((STATIC_DIR / 'index.html').is_file() and all((VENDOR_DIR / n).is_file() for n in V))",
    ).stdout.strip()  # fmt: skip
    assert shipped == "True"
    for unit in ("fedsky-agent.service", "fedsky-controller.service"):
        verified = _run("systemd-analyze", "verify", f"/lib/systemd/system/{unit}")
        assert verified.stderr.strip() == "", verified.stderr
    assert pwd.getpwnam("fedsky-agent").pw_dir == "/var/lib/fedsky-agent"
    state = Path("/var/lib/fedsky")
    assert state.stat().st_uid == pwd.getpwnam("fedsky").pw_uid
    assert state.stat().st_mode & 0o777 == 0o700

    # The operator's config (a conffile, edited) and CA, the controller as its unit runs it.
    port = free_port()
    controller_toml = Path("/etc/fedsky/controller.toml")
    controller_toml.write_text(
        controller_toml.read_text().replace("port = 8883", f"port = {port}")
        + "\n# edited by the operator\n"
    )
    fedctl = ["runuser", "-u", "fedsky", "--", "fedctl", "--config", str(controller_toml)]
    _run(*fedctl, "ca", "init")
    controller = _start_as_unit("fedsky-controller.service", tmp_path / "controller.log")
    agent: subprocess.Popen[bytes] | None = None
    # A directory both the operator's user and IT (root) use to hand the bundle over.
    exchange = Path(tempfile.mkdtemp(prefix="fedsky-handover-"))
    os.chown(exchange, pwd.getpwnam("fedsky").pw_uid, -1)
    try:
        eventually_blocking(
            lambda: _run(*fedctl, "agents", check=False).returncode,
            until=lambda code: code == 0,
            timeout=60,
            what="the installed controller to answer",
        )
        bundle = exchange / "bundle.json"
        _run(
            *fedctl, "agents", "enroll", "hospital-x", "--location", "aws:us-east-1",
            "--with-key", "--out", str(bundle),
        )  # fmt: skip
        # Hospital IT installs the bundle as root; the files go to the agent's user.
        agent_toml = Path("/etc/fedsky/agent.toml")
        agent_toml.write_text(
            "# edited by hospital IT\n"
            'state_dir = "/var/lib/fedsky-agent"\nreport_interval_s = 2.0\n'
            '[libvirt]\nuri = "test:///default"\n'
            '[executor]\nkind = "ssh"\nuser = "fedsky"\n'
            'identity_file = "/var/lib/fedsky-agent/id_ed25519"\n'
        )
        _run(
            "agentctl", "--config", str(agent_toml), "enroll", str(bundle),
            "--key", str(bundle.parent / "hospital-x.key"),
        )  # fmt: skip
        # Enrolment recorded who the agent is in IT's file, which keeps its own lines.
        recorded = agent_toml.read_text()
        assert 'agent_id = "hospital-x"' in recorded
        assert recorded.startswith("# edited by hospital IT\n")
        key = Path("/var/lib/fedsky-agent/agent.key")
        assert key.stat().st_uid == pwd.getpwnam("fedsky-agent").pw_uid
        assert key.stat().st_mode & 0o777 == 0o600
        agent = _start_as_unit("fedsky-agent.service", tmp_path / "agent.log")
        status = eventually_blocking(
            lambda: _run("agentctl", "--config", str(agent_toml), "status", "--json", check=False),
            until=lambda done: done.returncode == 0,
            timeout=60,
            what="agentctl status to say running and connected",
        )
        assert json.loads(status.stdout)["running"] is True
        listed = eventually_blocking(
            lambda: json.loads(_run(*fedctl, "agents", "list", "--json").stdout),
            until=lambda agents: (
                [(a["id"], a["state"]) for a in agents] == [("hospital-x", "online")]
            ),
            timeout=60,
            what="fedctl agents to list hospital-x online",
        )
        assert listed[0]["location"] == "aws:us-east-1"
        # SIGTERM (what `systemctl stop` sends) ends both within seconds, cleanly.
        started = time.monotonic()
        _stop(agent, tmp_path / "agent.log")
        _stop(controller, tmp_path / "controller.log")
        assert time.monotonic() - started < 30
    finally:
        shutil.rmtree(exchange, ignore_errors=True)  # it held the agent's private key
        for proc in (agent, controller):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)

    # An upgrade to a rebuilt package keeps the edited config and the state.
    _run("dpkg", "-i", str(debs["fedsky-agent_0.1.1"]), str(debs["fedsky-controller_0.1.1"]))
    assert "# edited by the operator" in controller_toml.read_text()
    assert Path("/etc/fedsky/agent.toml").read_text().startswith("# edited by hospital IT")
    versions = _run("dpkg-query", "-W", "-f", "${Version} ", *PACKAGES).stdout.split()
    assert versions == ["0.1.1", "0.1.1"]
    controller = _start_as_unit("fedsky-controller.service", tmp_path / "controller.log")
    try:
        listed = eventually_blocking(
            lambda: _run(*fedctl, "agents", "list", "--json", check=False),
            until=lambda done: done.returncode == 0,
            timeout=60,
            what="the upgraded controller to answer",
        )
        assert [a["id"] for a in json.loads(listed.stdout)] == ["hospital-x"]
        _stop(controller, tmp_path / "controller.log")
    finally:
        if controller.poll() is None:
            os.killpg(controller.pid, signal.SIGKILL)

    # A purge leaves nothing: files, directories, users.
    _run("dpkg", "-P", *PACKAGES)
    assert [p for p in LEFTOVERS if Path(p).exists()] == []
    for user in ("fedsky", "fedsky-agent"):
        assert _run("getent", "passwd", user, check=False).returncode != 0
        assert _run("getent", "group", user, check=False).returncode != 0


def test_the_payload_packages_build_and_the_aggregators_installs(
    wheelhouse: Path, tmp_path: Path
) -> None:
    """The VMs' payloads, from the testbed's wheelhouse (client and aggregator roles): both
    build, and the aggregator's installs offline and runs its front's command."""
    rows = json.loads(
        _run(
            sys.executable, str(REPO / "packaging" / "build_debs.py"),
            "--wheelhouse", str(wheelhouse), "--out", str(tmp_path / "dist"),
            "--work", str(tmp_path / "stage"), "--package", "client", "--package", "aggregator",
            "--json",
        ).stdout
    )  # fmt: skip
    assert [r["package"] for r in rows] == ["fedsky-client", "fedsky-aggregator"]
    aggregator = Path(rows[1]["file"])
    _run("dpkg", "-P", "fedsky-aggregator", check=False)
    try:
        _run("dpkg", "-i", str(aggregator))
        usage = _run("/opt/fedsky-aggregator/venv/bin/fedsky-aggregator", "--help").stdout
        assert "--listen" in usage
        torch = _run(
            "/opt/fedsky-aggregator/venv/bin/python", "-c",
            "import importlib.util as u; print(u.find_spec('torch') is None)",
        ).stdout.strip()  # fmt: skip
        assert torch == "True"  # the aggregator needs no torch
    finally:
        _run("dpkg", "-P", "fedsky-aggregator")
    assert not Path("/opt/fedsky-aggregator").exists()
