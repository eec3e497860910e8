"""The agent against a real Mosquitto with mutual TLS: reports, status, commands, faults."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import aiomqtt
import pytest
from fedsky.agent import cli
from fedsky.agent.config import load_agent_config
from fedsky.agent.testnode import write_test_node
from fedsky.shared import exitcodes
from fedsky.shared.messages import (
    MAX_PAYLOAD_BYTES,
    AgentStatus,
    Event,
    PingCommand,
    Report,
    decode,
    make_ping,
    utcnow,
)
from fedsky.shared.topics import Topics

from tests.agent_support import enrol, fault, running_agent, write_config
from tests.support import MqttBroker, eventually

AGENT = "hospital-us"


@pytest.fixture
def agent_config(tmp_path: Path, mqtt_broker: MqttBroker) -> Path:
    """An agent enrolled with the test broker's CA, pointed at it, with the fault hook on."""
    uri = write_test_node(tmp_path / "node.xml", hospital=AGENT)
    enrol(
        pki=mqtt_broker.pki,
        state_dir=tmp_path / "state",
        agent_id=AGENT,
        broker_host=mqtt_broker.host,
        broker_port=mqtt_broker.port,
        topic_prefix=mqtt_broker.prefix,
    )
    # A long report interval: every report seen quickly below was triggered by a state change.
    return write_config(
        tmp_path / "agent.toml", uri=uri, report_interval_s=30.0, poll_interval_s=0.2
    )


@dataclass
class Observer:
    """The controller's view: everything the agent publishes, in order of arrival."""

    topics: Topics
    client: aiomqtt.Client
    messages: list[tuple[float, str, bytes]] = field(default_factory=list)

    def reports(self, since: float = 0.0) -> list[Report]:
        return [
            decode(Report, p)
            for t, topic, p in self.messages
            if t >= since and topic == self.topics.report(AGENT)
        ]

    def statuses(self) -> list[AgentStatus]:
        return [
            decode(AgentStatus, p)
            for _, topic, p in self.messages
            if topic == self.topics.status(AGENT) and p
        ]

    def events(self) -> list[Event]:
        return [
            decode(Event, p) for _, topic, p in self.messages if topic == self.topics.events(AGENT)
        ]

    async def send(self, payload: bytes) -> None:
        await self.client.publish(self.topics.cmd(AGENT), payload, qos=1)


@contextlib.asynccontextmanager
async def observing(broker: MqttBroker, *, session: str | None = None) -> AsyncIterator[Observer]:
    creds = broker.client_context_for("controller", kind="controller")
    kwargs: dict[str, object] = {}
    if session is not None:
        # A persistent session: the broker queues QoS 1 messages while this client is away.
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        kwargs = {"identifier": session, "clean_start": False, "properties": props}
    client = broker.client(creds, **kwargs)
    async with client:
        observer = Observer(broker.topics, client)
        await client.subscribe(broker.topics.all_agents_up, qos=1)

        async def collect() -> None:
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                observer.messages.append((time.monotonic(), str(message.topic), payload))

        task = asyncio.create_task(collect())
        try:
            yield observer
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await task


async def test_reports_status_ping_and_bad_commands(
    agent_config: Path, mqtt_broker: MqttBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with observing(mqtt_broker) as obs, running_agent(agent_config) as agent:
        await eventually(lambda: obs.reports() and obs.statuses(), what="a report and the status")
        assert obs.statuses()[-1].state == "online"
        report = obs.reports()[0]
        assert report.agent_id == AGENT
        # The report says what libvirt says (read again here through the agent's seam).
        assert report.vms == await agent.blocking(agent.inventory.snapshot)
        assert {vm.name: vm.state for vm in report.vms} == {
            "vm-001": "running",
            "vm-002": "running",
            "vm-003": "shutoff",
            "vm-004": "shutoff",
            "vm-005": "running",
        }
        assert report.host.cpu_count >= 1
        await eventually(lambda: agent.state.last_report_seq is not None, what="report recorded")

        # agentctl: running and connected.
        code = await asyncio.to_thread(cli.main, ["--config", str(agent_config), "status"])
        assert code == exitcodes.OK

        # ping -> pong, echoing the command id.
        ping = make_ping()
        await obs.send(ping.encode())
        pong = await eventually(
            lambda: [e for e in obs.events() if e.command_id == ping.command_id], what="pong"
        )
        assert pong[0].kind == "pong"
        assert pong[0].agent_id == AGENT

        # An expired command is answered with a rejection, not acted on.
        now = utcnow()
        old = PingCommand(
            issued_at=now - timedelta(minutes=5), expires_at=now - timedelta(minutes=4)
        )
        await obs.send(old.encode())
        rejected = await eventually(
            lambda: [e for e in obs.events() if e.command_id == old.command_id], what="rejection"
        )
        assert rejected[0].kind == "command_rejected"
        assert "expired" in rejected[0].detail

        # Hostile and malformed commands: counted, each reason logged once, the link carries on.
        for payload in (
            b"\xff\xfe",
            b"{",
            b"[]",
            b'{"kind": "ping"}',
            b'{"kind": "rm -rf"}',
            b"x" * (MAX_PAYLOAD_BYTES + 1),
            json.dumps(
                {"kind": "ping", "schema": "9.0", "expires_at": "2999-01-01T00:00:00Z"}
            ).encode(),
        ):
            await obs.send(payload)
        again = make_ping()
        await obs.send(again.encode())
        await eventually(
            lambda: [e for e in obs.events() if e.command_id == again.command_id],
            what="pong after bad commands",
        )
        counts = agent.state.bad_commands
        assert sum(counts.values()) == 7
        assert (counts["not_json"], counts["too_large"]) == (2, 1)
        logged = [r for r in caplog.records if "dropped a bad command" in r.getMessage()]
        assert len(logged) == len(counts)  # once per reason
        # A redelivered command (same id) is not answered twice.
        await obs.send(again.encode())
        await asyncio.sleep(0.3)
        assert len([e for e in obs.events() if e.command_id == again.command_id]) == 1

    # A clean stop publishes offline itself (newer than the online status; a will would carry
    # the time of connecting).
    await eventually(lambda: obs.statuses()[-1].state == "offline", what="offline")


async def test_state_changes_are_reported_within_one_interval(
    agent_config: Path, mqtt_broker: MqttBroker
) -> None:
    config = load_agent_config(agent_config)
    assert config.test is not None
    assert config.test.fault_socket is not None
    hook = config.test.fault_socket
    async with observing(mqtt_broker) as obs, running_agent(agent_config):
        await eventually(lambda: obs.reports(), what="first report")
        for action, vm, expected in (
            ("destroy", "vm-001", "shutoff"),
            ("suspend", "vm-002", "paused"),
            ("resume", "vm-002", "running"),
        ):
            started = time.monotonic()
            reply = await asyncio.to_thread(fault, hook, action, vm)
            assert reply == {"ok": True, "state": expected}

            def changed(vm: str = vm, expected: str = expected, since: float = started) -> bool:
                return any(
                    v.name == vm and v.state == expected for r in obs.reports(since) for v in r.vms
                )

            await eventually(changed, timeout=config.report_interval_s, what=f"{vm} {expected}")
            # Far sooner than the 30 s report interval: the poller noticed the change.
            assert time.monotonic() - started < 10.0
        reply = await asyncio.to_thread(fault, hook, "destroy", "vm-404")
        assert reply["ok"] is False
        assert "vm-404" in reply["error"]


async def test_broker_killed_and_restarted_newest_report_arrives(
    agent_config: Path, mqtt_broker: MqttBroker
) -> None:
    config = load_agent_config(agent_config)
    assert config.test is not None
    assert config.test.fault_socket is not None
    session = "controller-observer"
    async with observing(mqtt_broker, session=session) as obs, running_agent(agent_config) as agent:
        await eventually(lambda: obs.reports() and agent.state.connected, what="connected")
    # Save the broker's state (the observer's persistent session among it) with a clean stop,
    # so that after the kill below it still queues the agent's reports for the observer.
    await mqtt_broker.arestart()

    async with running_agent(agent_config) as agent:
        await eventually(lambda: agent.state.connected, what="agent connected")
        mqtt_broker.kill()
        await eventually(lambda: not agent.state.connected, what="agent notices the broker is gone")
        log_offset = mqtt_broker.log_file.stat().st_size
        # Reports pile up while the broker is down: only the newest is kept.
        await asyncio.to_thread(fault, config.test.fault_socket, "destroy", "vm-005")
        for _ in range(3):
            before = agent.state.pending_report_seq
            agent.request_report()
            await eventually(
                lambda b=before: agent.state.pending_report_seq != b, what="new report"
            )
        newest = agent.state.pending_report_seq
        assert newest is not None
        assert newest >= 3

        await mqtt_broker.astart()
        await eventually(
            lambda: agent.state.connected and agent.state.last_report_seq == newest,
            timeout=15,
            what="reconnect and send the newest report",
        )
        assert agent.state.pending_report_seq is None

        async with observing(mqtt_broker, session=session) as obs:
            arrived = await eventually(
                lambda: [r for r in obs.reports() if r.seq == newest],
                what="the newest report at the observer",
            )
            assert {v.name: v.state for v in arrived[0].vms}["vm-005"] == "shutoff"
            assert [r.seq for r in obs.reports()] == [newest]
            assert obs.statuses()
            assert obs.statuses()[-1].state == "online"
        # The broker saw exactly one report from the agent after it came back.
        with mqtt_broker.log_file.open("rb") as fh:
            fh.seek(log_offset)
            after = fh.read().decode(errors="replace")
        received = [
            line
            for line in after.splitlines()
            if "Received PUBLISH from" in line and line.rstrip(")").find("/up/report") >= 0
        ]
        assert len(received) == 1, received


async def test_will_is_offline_when_the_agent_is_killed(
    agent_config: Path, mqtt_broker: MqttBroker, tmp_path: Path
) -> None:
    agent_bin = Path(sys.executable).parent / "fedsky-agent"
    log = (tmp_path / "agent.log").open("wb")
    async with observing(mqtt_broker) as obs:
        for sig in (signal.SIGKILL, signal.SIGTERM):
            before = len(obs.statuses())
            proc = subprocess.Popen(
                [str(agent_bin), "--config", str(agent_config)],
                stdout=log,
                stderr=log,
                env={**os.environ},
            )
            try:
                online = await eventually(
                    lambda b=before: [s for s in obs.statuses()[b:] if s.state == "online"],
                    timeout=20,
                    what="online",
                )
                proc.send_signal(sig)
                offline = await eventually(
                    lambda b=before: [s for s in obs.statuses()[b:] if s.state == "offline"],
                    timeout=20,
                    what="offline",
                )
                rc = await asyncio.to_thread(proc.wait, 20)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            assert online[0].at is not None
            assert offline[0].at is not None
            if sig == signal.SIGKILL:
                # The broker published the will, made when the agent connected.
                assert rc == -signal.SIGKILL
                assert offline[0].at <= online[0].at
            else:
                # A clean stop: exit 0, and the agent said goodbye itself.
                assert rc == 0
                assert offline[0].at > online[0].at
    # After SIGTERM the status says so; the killed run left a socket behind that was cleaned up.
    code = await asyncio.to_thread(cli.main, ["--config", str(agent_config), "status"])
    assert code == exitcodes.UNAVAILABLE
