"""The controller's consumer against a real broker: hostile payloads are counted and dropped,
each logged once with its sender, and the consumer keeps serving."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from fedsky.controller.bus.consumer import ControllerBus
from fedsky.controller.inventory import store as inventory
from fedsky.controller.inventory.service import InventoryIngest, ReportQuota
from fedsky.controller.security import enrollment
from fedsky.controller.store import Store
from fedsky.shared.messages import MAX_PAYLOAD_BYTES, HostInfo, Report, VmInfo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import MqttBroker, eventually

AGENT = "hospital-test"
_SEQS = itertools.count(1000)


def valid_report(seq: int, *, agent_id: str = AGENT) -> dict[str, Any]:
    report = Report(
        agent_id=agent_id,
        seq=seq,
        sent_at=datetime.now(UTC),
        host=HostInfo(
            hostname="h",
            cpu_count=4,
            cpu_percent=5,
            load_1m=0.1,
            memory_total_mib=8192,
            memory_available_mib=4096,
            disk_total_gib=100,
            disk_free_gib=50,
        ),
        vms=[
            VmInfo(
                name="vm-001",
                uuid="0" * 32,
                state="running",
                vcpus=4,
                memory_mib=8192,
                disk_gib=40,
            )
        ],
    )
    return json.loads(report.encode())


def _drop_key(key: str) -> Any:
    data = valid_report(0)
    data.pop(key)
    return json.dumps(data).encode()


def _bad_field(path: tuple[str, ...], value: Any) -> bytes:
    data = valid_report(0)
    target = data
    for part in path[:-1]:
        target = target[part] if not isinstance(target, list) else target[int(part)]
    target[path[-1]] = value
    return json.dumps(data).encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)

hostile_payloads = st.one_of(
    st.binary(max_size=200).filter(lambda b: not b.strip().startswith(b"{")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from(["agent_id", "seq", "sent_at", "host", "vms"]).map(_drop_key),
    st.text(alphabet="xyz", min_size=1, max_size=5).map(lambda t: _bad_field(("seq",), t)),
    st.integers(max_value=-1).map(lambda n: _bad_field(("vms", "0", "vcpus"), n)),
    st.sampled_from(["exploded", "", "RUNNING", "running; DROP TABLE vms"]).map(
        lambda s: _bad_field(("vms", "0", "state"), s)
    ),
    st.sampled_from(["2.0", "0.1", "99.0"]).map(lambda v: _bad_field(("schema",), v)),
    st.sampled_from(["someone-else", "controller", "../x"]).map(
        lambda n: _bad_field(("agent_id",), n)
    ),
)


async def _run_scenario(
    broker: MqttBroker, store: Store, payloads: list[bytes], seq: int
) -> ControllerBus:
    controller = broker.client_context_for("controller", "controller")
    bus = ControllerBus(
        host=broker.host,
        port=broker.port,
        tls_context=controller.context,
        topics=broker.topics,
        # A quota these scenarios' bursts of hostile payloads from one agent stay within.
        inventory=InventoryIngest(
            store=store, history_per_agent=10, quota=ReportQuota(per_minute=6000, burst=1000)
        ),
    )
    task = asyncio.create_task(bus.run())
    try:
        await bus.wait_connected(10)
        agent = broker.client_context_for(AGENT)
        async with broker.client(agent) as client:
            for payload in payloads:
                await client.publish(broker.topics.report(AGENT), payload, qos=1)
            await client.publish(
                broker.topics.report(AGENT), json.dumps(valid_report(seq)).encode(), qos=1
            )
            await eventually(
                lambda: store.run(inventory.list_agents),
                until=lambda agents: agents[0]["last_seq"] == seq,
                timeout=15,
                what=f"report {seq} in the inventory",
            )
        return bus
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def enrolled_store(tmp_path: Path, mqtt_broker: MqttBroker) -> Store:
    store = Store(tmp_path / "controller.db")
    inventory.ensure_schema(store)
    store.call(
        enrollment.enroll_agent,
        mqtt_broker.pki,
        agent_id=AGENT,
        location="aws:us-east-1",
        csr_pem=None,
        broker_host=mqtt_broker.host,
        broker_port=mqtt_broker.port,
        topic_prefix=mqtt_broker.prefix,
    )
    return store


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payloads=st.lists(hostile_payloads, min_size=10, max_size=30))
def test_hostile_payloads_are_counted_and_dropped(
    payloads: list[bytes], mqtt_broker: MqttBroker, enrolled_store: Store
) -> None:
    seq = next(_SEQS)  # unique per example: the store keeps the previous examples' reports
    bus = asyncio.run(_run_scenario(mqtt_broker, enrolled_store, payloads, seq))
    # Every hostile payload was rejected; the valid report after them was stored.
    assert bus.stats.rejects.total == len(payloads)
    assert bus.stats.reports_stored == 1
    vms = enrolled_store.call(inventory.list_vms)
    assert [v["name"] for v in vms] == ["vm-001"]


def test_rejections_are_logged_once_per_sender_and_reason(
    mqtt_broker: MqttBroker, enrolled_store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    payloads = (
        [b"not json"] * 5
        + [_bad_field(("schema",), "2.0")] * 3
        + [b"x" * (MAX_PAYLOAD_BYTES + 1)] * 2
    )
    payloads += [_bad_field(("agent_id",), "someone-else")] * 2
    with caplog.at_level(logging.WARNING, logger="fedsky.controller.bus.consumer"):
        bus = asyncio.run(_run_scenario(mqtt_broker, enrolled_store, payloads, 7))
    assert bus.stats.rejects.by_reason() == {
        "not_json": 5,
        "schema_version": 3,
        "too_large": 2,
        "sender_mismatch": 2,
    }
    lines = [r.getMessage() for r in caplog.records if "dropped payload" in r.getMessage()]
    assert len(lines) == 4
    assert all(AGENT in line for line in lines)
