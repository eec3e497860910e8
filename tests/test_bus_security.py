"""The bus's security against a real Mosquitto rendered by the controller: who may say what.

Mosquitto acknowledges a denied publish and grants a forbidden subscription, so every denial
is shown by what never arrives: a forbidden message is sent first, then an allowed marker on
the same path; the marker arriving alone proves the first one was dropped (the broker delivers
one publisher's messages in order). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from fedsky.controller.bus.broker_config import DYNSEC_COMMANDS, DYNSEC_RESPONSES
from fedsky.controller.security.pki import CertKind, Pki

from tests.support import MqttBroker, eventually, receive_until, write_credentials

QOS = 1


def _payloads(messages: list[aiomqtt.Message]) -> list[bytes]:
    out = []
    for m in messages:
        assert isinstance(m.payload, bytes)
        out.append(m.payload)
    return out


async def _connect(broker: MqttBroker, ctx: ssl.SSLContext) -> None:
    async with asyncio.timeout(8), broker.client(ctx, timeout=5):
        pass


async def _refused(broker: MqttBroker, ctx: ssl.SSLContext) -> float:
    """Connect with `ctx`; assert the broker refuses; return how long the refusal took."""
    started = time.monotonic()
    with pytest.raises(aiomqtt.MqttError):
        await _connect(broker, ctx)
    return time.monotonic() - started


async def test_agent_cannot_publish_into_another_agents_topics(mqtt_broker: MqttBroker) -> None:
    t = mqtt_broker.topics
    ctl = mqtt_broker.client_context_for("controller", "controller")
    a = mqtt_broker.client_context_for("hospital-a")
    async with mqtt_broker.client(ctl) as controller, mqtt_broker.client(a) as agent_a:
        await controller.subscribe(t.all_agents_up, qos=QOS)
        await controller.subscribe(t.all_aggregators_up, qos=QOS)
        # Forged: a report, an offline status and an event in hospital-b's name, and a
        # metrics message in an aggregator's name.
        for topic in (
            t.report("hospital-b"),
            t.status("hospital-b"),
            t.events("hospital-b"),
            f"{t.prefix}/agents/hospital-b/up/report/extra",
            t.aggregator_metrics("agg-job1"),
        ):
            await agent_a.publish(topic, b"forged", qos=QOS)
        await agent_a.publish(t.report("hospital-a"), b"marker", qos=QOS)
        got = await receive_until(controller, lambda m: m.payload == b"marker", timeout=5)
    assert _payloads(got) == [b"marker"]
    assert [str(m.topic) for m in got] == [t.report("hospital-a")]
    assert "Denied PUBLISH" in mqtt_broker.log_text()


async def test_agent_cannot_forge_commands(mqtt_broker: MqttBroker) -> None:
    t = mqtt_broker.topics
    ctl = mqtt_broker.client_context_for("controller", "controller")
    a = mqtt_broker.client_context_for("hospital-a")
    b = mqtt_broker.client_context_for("hospital-b")
    async with (
        mqtt_broker.client(ctl) as controller,
        mqtt_broker.client(a) as agent_a,
        mqtt_broker.client(b) as agent_b,
    ):
        await agent_b.subscribe(f"{t.prefix}/agents/hospital-b/down/#", qos=QOS)
        await agent_a.subscribe(f"{t.prefix}/agents/hospital-a/down/#", qos=QOS)
        # A command to another agent, and one to itself (only the controller commands).
        await agent_a.publish(t.cmd("hospital-b"), b"forged", qos=QOS)
        await agent_a.publish(t.cmd("hospital-a"), b"forged", qos=QOS)
        await controller.publish(t.cmd("hospital-b"), b"marker-b", qos=QOS)
        await controller.publish(t.cmd("hospital-a"), b"marker-a", qos=QOS)
        got_b = await receive_until(agent_b, lambda m: m.payload == b"marker-b")
        got_a = await receive_until(agent_a, lambda m: m.payload == b"marker-a")
    assert _payloads(got_b) == [b"marker-b"]
    assert _payloads(got_a) == [b"marker-a"]


@pytest.mark.parametrize(
    ("victim", "kind"), [("hospital-b", "agent"), ("controller", "controller")]
)
async def test_a_certificate_cannot_take_over_another_clients_session(
    mqtt_broker: MqttBroker, victim: str, kind: CertKind
) -> None:
    """hospital-a connects three times asking for the victim's client id: the broker gives it
    its own name instead, so the victim's session is never closed (before, each attempt
    kicked it and published its will)."""
    t = mqtt_broker.topics
    victim_creds = mqtt_broker.client_context_for(victim, kind)
    a = mqtt_broker.client_context_for("hospital-a")
    async with mqtt_broker.client(victim_creds, identifier=victim) as held:
        for _ in range(3):
            async with mqtt_broker.client(a, identifier=victim) as intruder:
                await intruder.publish(t.report("hospital-a"), b"hello", qos=QOS)
        # The victim's connection is the one it opened: a QoS 1 publish still gets its PUBACK.
        topic = t.cmd("hospital-b") if kind == "controller" else t.report(victim)
        await held.publish(topic, b"still-here", qos=QOS, timeout=5)
    assert "already connected, closing old connection" not in mqtt_broker.log_text()


async def test_an_agent_writes_only_its_own_three_channels(mqtt_broker: MqttBroker) -> None:
    """Under its own `up/` an agent may write its report, status and events, nothing else: a
    hospital cannot park retained messages on topics of its choosing (a flood of 1 MB
    retained messages under `up/x/...` once grew the broker's memory and persistence file)."""
    t = mqtt_broker.topics
    ctl = mqtt_broker.client_context_for("controller", "controller")
    a = mqtt_broker.client_context_for("hospital-a")
    up = t.report("hospital-a").rsplit("/", 1)[0]
    async with mqtt_broker.client(ctl) as controller, mqtt_broker.client(a) as agent_a:
        await controller.subscribe(t.all_agents_up, qos=QOS)
        for n in range(20):
            await agent_a.publish(f"{up}/flood/{n}", b"x" * 1000, qos=QOS, retain=True)
        await agent_a.publish(f"{t.report('hospital-a')}/extra", b"x", qos=QOS, retain=True)
        await agent_a.publish(t.report("hospital-a"), b"marker", qos=QOS)
        got = await receive_until(controller, lambda m: m.payload == b"marker", timeout=5)
    assert [str(m.topic) for m in got] == [t.report("hospital-a")]
    # A new subscriber finds no retained message of the flood.
    async with mqtt_broker.client(ctl) as late:
        await late.subscribe(t.agent_up("hospital-a"), qos=QOS)
        retained = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.5):
                async for message in late.messages:
                    retained.append(str(message.topic))
    assert retained == []


async def test_agent_cannot_read_another_agents_commands_or_reports(
    mqtt_broker: MqttBroker,
) -> None:
    t = mqtt_broker.topics
    ctl = mqtt_broker.client_context_for("controller", "controller")
    a = mqtt_broker.client_context_for("hospital-a")
    b = mqtt_broker.client_context_for("hospital-b")
    async with (
        mqtt_broker.client(ctl) as controller,
        mqtt_broker.client(a) as agent_a,
        mqtt_broker.client(b) as agent_b,
    ):
        # Forbidden subscriptions are granted by Mosquitto and simply deliver nothing.
        for pattern in (
            t.cmd("hospital-b"),
            f"{t.prefix}/agents/+/down/#",
            f"{t.prefix}/agents/+/up/#",
            f"{t.prefix}/#",
            "#",
        ):
            await agent_a.subscribe(pattern, qos=QOS)
        await agent_b.publish(t.report("hospital-b"), b"secret-report", qos=QOS)
        await controller.publish(t.cmd("hospital-b"), b"secret-cmd", qos=QOS)
        await controller.publish(t.cmd("hospital-a"), b"marker", qos=QOS)
        got = await receive_until(agent_a, lambda m: m.payload == b"marker")
    # Its own command arrives (once per matching subscription), nothing of hospital-b's.
    assert set(_payloads(got)) == {b"marker"}


async def test_controller_reads_every_up_and_writes_every_down(mqtt_broker: MqttBroker) -> None:
    t = mqtt_broker.topics
    ctl = mqtt_broker.client_context_for("controller", "controller")
    agents = {name: mqtt_broker.client_context_for(name) for name in ("hospital-us", "hospital-eu")}
    agg = mqtt_broker.client_context_for("agg-job1", "aggregator")
    async with (
        mqtt_broker.client(ctl) as controller,
        mqtt_broker.client(agents["hospital-us"]) as us,
        mqtt_broker.client(agents["hospital-eu"]) as eu,
        mqtt_broker.client(agg) as aggregator,
    ):
        await controller.subscribe(t.all_agents_up, qos=QOS)
        await controller.subscribe(t.all_aggregators_up, qos=QOS)
        await us.subscribe(f"{t.prefix}/agents/hospital-us/down/#", qos=QOS)
        await eu.subscribe(f"{t.prefix}/agents/hospital-eu/down/#", qos=QOS)

        sent = {
            t.report("hospital-us"): us,
            t.status("hospital-us"): us,
            t.events("hospital-eu"): eu,
            t.aggregator_metrics("agg-job1"): aggregator,
            t.aggregator_status("agg-job1"): aggregator,
        }
        for topic, client in sent.items():
            await client.publish(topic, topic.encode(), qos=QOS)
        last = t.aggregator_status("agg-job1")  # each publish is acked after it was routed
        got = await receive_until(controller, lambda m: str(m.topic) == last)
        assert {str(m.topic) for m in got} == set(sent)

        await controller.publish(t.cmd("hospital-us"), b"cmd-us", qos=QOS)
        await controller.publish(t.cmd("hospital-eu"), b"cmd-eu", qos=QOS)
        assert _payloads(await receive_until(us, lambda m: True)) == [b"cmd-us"]
        assert _payloads(await receive_until(eu, lambda m: True)) == [b"cmd-eu"]


async def test_aggregator_writes_only_its_own_subtree(mqtt_broker: MqttBroker) -> None:
    t = mqtt_broker.topics
    ctl = mqtt_broker.client_context_for("controller", "controller")
    agg = mqtt_broker.client_context_for("agg-job1", "aggregator")
    async with mqtt_broker.client(ctl) as controller, mqtt_broker.client(agg) as aggregator:
        await controller.subscribe(t.all_agents_up, qos=QOS)
        await controller.subscribe(t.all_aggregators_up, qos=QOS)
        await aggregator.publish(t.aggregator_metrics("agg-job2"), b"forged", qos=QOS)
        await aggregator.publish(t.report("hospital-a"), b"forged", qos=QOS)
        await aggregator.publish(t.aggregator_metrics("agg-job1"), b"marker", qos=QOS)
        got = await receive_until(controller, lambda m: m.payload == b"marker")
    assert _payloads(got) == [b"marker"]


async def test_client_without_certificate_is_refused_at_once(mqtt_broker: MqttBroker) -> None:
    ctx = ssl.create_default_context(cafile=str(mqtt_broker.pki.ca_cert_path))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    assert await _refused(mqtt_broker, ctx) < 2.0


async def test_client_from_a_foreign_ca_is_refused(mqtt_broker: MqttBroker, tmp_path: Path) -> None:
    foreign = Pki.init(tmp_path / "foreign", common_name="fedsky CA")  # same name, other key
    issued = foreign.issue(common_name="hospital-a", kind="agent")
    # The client trusts the real CA (so it accepts the broker) but shows the foreign certificate.
    creds = write_credentials(
        tmp_path / "foreign-client", issued, ca_pem=mqtt_broker.pki.ca_cert_pem
    )
    assert await _refused(mqtt_broker, creds.context) < 2.0
    # The broker writes its reason a moment after closing the connection.
    await eventually(
        lambda: "certificate verify failed" in mqtt_broker.log_text(),
        timeout=5,
        interval=0.1,
        what="the broker to log why it refused",
        details=mqtt_broker.log_text,
    )


async def test_server_certificate_cannot_log_in_as_a_client(mqtt_broker: MqttBroker) -> None:
    # Its name would be taken as an MQTT username (and an agent subtree) if the broker let it in.
    creds = mqtt_broker.client_context_for("hospital-x", "server")
    assert await _refused(mqtt_broker, creds.context) < 2.0


async def test_revoked_certificate_is_refused_after_crl_and_restart(
    mqtt_broker: MqttBroker,
) -> None:
    doomed = mqtt_broker.client_context_for("hospital-a")
    other = mqtt_broker.client_context_for("hospital-b")
    async with mqtt_broker.client(doomed):
        pass
    await asyncio.to_thread(mqtt_broker.revoke, doomed.serial)  # write_crl + restart
    assert doomed.serial in mqtt_broker.pki.revoked_serials()
    assert await _refused(mqtt_broker, doomed.context) < 2.0
    # The same name with a new certificate, and everyone else, still get in.
    renewed = mqtt_broker.client_context_for("hospital-a")
    async with mqtt_broker.client(other), mqtt_broker.client(renewed):
        pass


async def test_expired_crl_refuses_everyone(mqtt_broker: MqttBroker) -> None:
    # Why the controller must rewrite the CRL before its next_update: OpenSSL then refuses all.
    agent = mqtt_broker.client_context_for("hospital-a")
    async with mqtt_broker.client(agent):
        pass
    mqtt_broker.pki.write_crl([], days=1)
    crl = mqtt_broker.pki.crl_path
    # Make it look a day and a half old: rewrite with a clock in the past.
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = serialization.load_pem_private_key(
        (mqtt_broker.pki.directory / "ca.key").read_bytes(), password=None
    )
    ca = x509.load_pem_x509_certificate(mqtt_broker.pki.ca_cert_pem)
    past = datetime.now(UTC) - timedelta(days=2)
    stale = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(past)
        .next_update(past + timedelta(days=1))
        .sign(key, hashes.SHA384())  # type: ignore[arg-type]
    )
    crl.write_bytes(stale.public_bytes(serialization.Encoding.PEM))
    await mqtt_broker.arestart()
    assert await _refused(mqtt_broker, agent.context) < 2.0
    # A fresh CRL and a restart bring everyone back.
    mqtt_broker.pki.write_crl([])
    await mqtt_broker.arestart()
    async with mqtt_broker.client(agent):
        pass


async def _cut(client: aiomqtt.Client, username: str) -> dict[str, object]:
    """Send the dynamic-security plugin the controller's session cut; its answer."""
    commands = {
        "commands": [
            {"command": "createClient", "username": username},
            {"command": "deleteClient", "username": username},
        ]
    }
    await client.subscribe(DYNSEC_RESPONSES, qos=QOS)
    await client.publish(DYNSEC_COMMANDS, json.dumps(commands), qos=QOS)
    got = await receive_until(client, lambda m: m.topic.value == DYNSEC_RESPONSES)
    answer: dict[str, object] = json.loads(bytes(got[-1].payload))  # type: ignore[arg-type]
    return answer


async def test_the_dynamic_security_plugin_cuts_one_session_and_nobody_else(
    mqtt_broker: MqttBroker,
) -> None:
    """Revocation without a restart: the CRL reloaded (SIGHUP) refuses new connections, and
    the plugin's deleteClient closes the live one; the others never notice. An agent cannot
    send the plugin commands."""
    assert mqtt_broker.files.dynsec
    t = mqtt_broker.topics
    ctl = mqtt_broker.client_context_for("controller", "controller")
    doomed = mqtt_broker.client_context_for("hospital-a")
    other = mqtt_broker.client_context_for("hospital-b")
    async with (
        mqtt_broker.client(ctl) as controller,
        mqtt_broker.client(doomed) as live,
        mqtt_broker.client(other) as bystander,
    ):
        # A hostile agent's try at cutting its neighbour is denied by the ACL.
        await bystander.publish(
            DYNSEC_COMMANDS,
            json.dumps({"commands": [{"command": "deleteClient", "username": "hospital-a"}]}),
            qos=QOS,
        )
        await controller.subscribe(t.all_agents_up, qos=QOS)
        await live.publish(t.report("hospital-a"), b"still-here", qos=QOS)
        assert _payloads(await receive_until(controller, lambda m: True)) == [b"still-here"]

        mqtt_broker.revoke(doomed.serial, restart=False)
        mqtt_broker.files.install_crl()
        assert mqtt_broker.pid is not None
        os.kill(mqtt_broker.pid, signal.SIGHUP)
        started = time.monotonic()
        answer = await _cut(controller, "hospital-a")
        assert answer == {"responses": [{"command": "createClient"}, {"command": "deleteClient"}]}

        async def cut_off() -> bool:
            try:
                await live.publish(t.report("hospital-a"), b"after-cut", qos=QOS, timeout=1)
            except aiomqtt.MqttError:
                return True
            return False

        await eventually(cut_off, timeout=2.0, interval=0.05, what="the live session to be cut")
        assert time.monotonic() - started < 2.0
        # Everyone else is still connected: the same sessions carry on.
        await bystander.publish(t.report("hospital-b"), b"bystander", qos=QOS)
        got = await receive_until(controller, lambda m: m.payload == b"bystander")
        assert b"after-cut" not in _payloads(got)
    assert await _refused(mqtt_broker, doomed.context) < 2.0
    assert "hospital-b been disconnected" not in mqtt_broker.log_text()
    assert "Denied PUBLISH from hospital-b" in mqtt_broker.log_text()


async def test_a_reload_leaves_a_revoked_live_connection_a_restart_cuts_it(
    mqtt_broker: MqttBroker,
) -> None:
    # Why a reload alone is not enough: the live session must be cut (plugin, or restart).
    t = mqtt_broker.topics
    ctl = mqtt_broker.client_context_for("controller", "controller")
    doomed = mqtt_broker.client_context_for("hospital-a")
    # Probes with a certificate of their own: one of `doomed`'s would take over its session.
    probe = mqtt_broker.client_context_for("hospital-z")
    async with mqtt_broker.client(ctl) as controller, mqtt_broker.client(doomed) as live:
        await controller.subscribe(t.all_agents_up, qos=QOS)
        mqtt_broker.revoke(doomed.serial, probe.serial, restart=False)
        mqtt_broker.files.install_crl()
        assert mqtt_broker.pid is not None
        os.kill(mqtt_broker.pid, signal.SIGHUP)

        # The reload refuses new connections of the revoked certificate...
        async def refused() -> bool:
            try:
                async with mqtt_broker.client(probe.context, timeout=2):
                    pass
            except aiomqtt.MqttError:
                return True
            return False

        await eventually(refused, timeout=7, what="SIGHUP to apply the new CRL")
        # ...but the open one still speaks for the revoked identity.
        await live.publish(t.report("hospital-a"), b"after-reload", qos=QOS)
        got = await receive_until(controller, lambda m: True)
        assert _payloads(got) == [b"after-reload"]
    await mqtt_broker.arestart()
    assert await _refused(mqtt_broker, doomed.context) < 2.0
