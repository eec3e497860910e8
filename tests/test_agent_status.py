"""`agentctl status`: the running agent's socket, the state file fallback, and the exit codes."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
from pathlib import Path

import psutil
import pytest
from fedsky.agent import cli
from fedsky.agent.config import load_agent_config, resolve_identity
from fedsky.agent.daemon import AgentDaemon
from fedsky.agent.status import AgentState, StatusError, write_status_file
from fedsky.agent.testnode import write_test_node
from fedsky.controller.security.pki import Pki
from fedsky.shared import exitcodes
from fedsky.shared.messages import utcnow

from tests.agent_support import enrol, running_agent, write_config
from tests.support import eventually, free_port


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    """An enrolled agent whose broker is not there (nothing listens on its port)."""
    uri = write_test_node(tmp_path / "node.xml", hospital="hospital-us")
    enrol(
        pki=Pki.init(tmp_path / "ca"),
        state_dir=tmp_path / "state",
        agent_id="hospital-us",
        broker_port=free_port(),
    )
    return write_config(tmp_path / "agent.toml", uri=uri)


async def _status(config_path: Path, *extra: str) -> int:
    # agentctl blocks; the agent under test runs on this event loop.
    return await asyncio.to_thread(cli.main, ["--config", str(config_path), "status", *extra])


async def test_not_running_exits_69(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path / "agent.toml", uri="test:///default")
    assert await _status(cfg) == exitcodes.UNAVAILABLE
    assert "NOT RUNNING" in capsys.readouterr().out
    assert await _status(cfg, "--json") == exitcodes.UNAVAILABLE
    assert json.loads(capsys.readouterr().out)["running"] is False


async def test_running_without_broker_exits_1_and_shows_everything(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_agent_config(config_path)
    async with running_agent(config_path) as agent:
        await eventually(
            lambda: len(agent.state.vms) == 5 and agent.state.last_error,
            what="first inventory and a failed connection",
        )
        assert await _status(config_path, "--json") == exitcodes.FAILED
        data = json.loads(capsys.readouterr().out)
        assert (data["running"], data["connected"], data["source"]) == (True, False, "socket")
        status = data["status"]
        assert status["identity"]["agent_id"] == "hospital-us"
        assert status["identity"]["location"] == "aws:us-east-1"
        assert "refused" in status["broker"]["last_error"].lower()
        assert status["pending_report_seq"] is not None  # the newest report waits for the broker
        assert status["last_report"] is None
        vms = {vm["name"]: vm for vm in status["inventory"]["vms"]}
        assert (vms["vm-001"]["vcpus"], vms["vm-001"]["memory_mib"], vms["vm-001"]["disk_gib"]) == (
            4,
            8192,
            40.0,
        )
        assert vms["vm-003"]["state"] == "shutoff"
        assert status["task"] is None

        assert await _status(config_path) == exitcodes.FAILED
        out = capsys.readouterr().out
        assert "NOT CONNECTED" in out
        assert "certificate  expires" in out
        assert "vm-005" in out
        assert "shutoff" in out

        for path in (config.status_socket, config.status_file):
            assert stat.S_IMODE(path.stat().st_mode) == 0o660
        await eventually(
            lambda: json.loads(config.status_file.read_text())["inventory"]["vms"],
            what="the status file",
        )

        # A second agent on the same state directory is refused.
        second = AgentDaemon(config=config, identity=resolve_identity(config))
        with pytest.raises(StatusError, match="another agent is running"):
            await second.run(stop=asyncio.Event())

    assert not config.status_socket.exists()
    assert json.loads(config.status_file.read_text())["running"] is False
    assert await _status(config_path) == exitcodes.UNAVAILABLE
    assert "NOT RUNNING" in capsys.readouterr().out


def _file_status(config_path: Path, *, pid: int, started: float | None) -> None:
    config = load_agent_config(config_path)
    ident = resolve_identity(config)
    state = AgentState(
        agent_id=ident.agent_id,
        location=ident.location,
        cert_not_after=ident.cert_not_after,
        broker_address="127.0.0.1:1",
        libvirt_uri="test:///default",
        pid=pid,
        pid_started_at=started,
    )
    state.link_up()
    state.report_sent(7, utcnow())
    config.state_dir.mkdir(parents=True, exist_ok=True)
    write_status_file(config.status_file, state.doc(), mode=0o640, gid=None)


async def test_state_file_of_a_killed_agent_means_not_running(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    _file_status(config_path, pid=proc.pid, started=None)
    assert await _status(config_path) == exitcodes.UNAVAILABLE
    assert "stopped without cleaning up" in capsys.readouterr().out

    # A live process that is not the agent (other start time) is no agent either.
    _file_status(config_path, pid=1, started=12345.0)
    assert await _status(config_path) == exitcodes.UNAVAILABLE


async def test_state_file_fallback_when_the_socket_is_silent(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    me = psutil.Process()
    _file_status(config_path, pid=me.pid, started=me.create_time())
    assert await _status(config_path, "--json") == exitcodes.OK
    data = json.loads(capsys.readouterr().out)
    assert (data["running"], data["connected"], data["source"]) == (True, True, "file")
    assert data["status"]["last_report"]["seq"] == 7
