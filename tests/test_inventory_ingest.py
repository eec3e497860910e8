"""The inventory's ingest service on a real SQLite store: what the bus consumer hands it."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fedsky.controller.inventory import store as inventory
from fedsky.controller.inventory.service import InventoryIngest, ReportQuota, UnknownAgent
from fedsky.controller.security import enrollment
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store
from fedsky.shared.messages import AgentStatus, Event, HostInfo, Report, VmInfo

AGENT = "hospital-a"
HOST = HostInfo(
    hostname="h",
    cpu_count=4,
    cpu_percent=5,
    load_1m=0.1,
    memory_total_mib=8192,
    memory_available_mib=4096,
    disk_total_gib=100,
    disk_free_gib=50,
)


# Reports are dated from a few minutes ago, a second apart by seq.
BASE = datetime.now(UTC) - timedelta(minutes=5)


def _report(
    seq: int,
    *,
    agent_id: str = AGENT,
    vms: tuple[str, ...] = ("vm-001",),
    sent_at: datetime | None = None,
) -> Report:
    return Report(
        agent_id=agent_id,
        seq=seq,
        sent_at=sent_at or BASE + timedelta(seconds=seq),
        host=HOST,
        vms=[
            VmInfo(
                name=name, uuid=f"{i:032x}", state="running", vcpus=2, memory_mib=2048, disk_gib=20
            )
            for i, name in enumerate(vms)
        ],
    )


@pytest.fixture
def store(tmp_path: Path, pki: Pki) -> Iterator[Store]:
    store = Store(tmp_path / "controller.db")
    inventory.ensure_schema(store)
    store.call(
        enrollment.enroll_agent,
        pki,
        agent_id=AGENT,
        location="aws:us-east-1",
        csr_pem=None,
        broker_host="127.0.0.1",
        broker_port=8883,
        topic_prefix="fedsky/v1",
    )
    yield store
    store.close()


async def test_a_report_from_the_future_is_refused_and_never_freezes_the_agent(
    store: Store,
) -> None:
    """Stored as the newest, a report dated a day ahead made every genuine one after it stale."""
    ingest = InventoryIngest(store=store, history_per_agent=5)
    now = datetime.now(UTC)
    ahead = _report(50, sent_at=now + timedelta(days=1), vms=("vm-009",))
    slightly_ahead = _report(51, sent_at=now + inventory.MAX_CLOCK_AHEAD / 2)
    outcomes = await ingest.reports([(ahead, now), (slightly_ahead, now)])
    assert [(o.accepted, o.reason) for o in outcomes] == [(False, "from_future"), (True, "")]
    # A newest time an earlier version stored from the future does not make reports stale.
    await store.run(
        lambda conn: conn.execute(
            "UPDATE agents SET last_report_sent_at = ? WHERE id = ?",
            ((now + timedelta(days=1)).isoformat(), AGENT),
        )
    )
    later = datetime.now(UTC)
    (outcome,) = await ingest.reports([(_report(52, sent_at=later), later)])
    assert (outcome.accepted, outcome.reason) == (True, "")
    agent = await store.run(inventory.get_agent, AGENT)
    assert agent is not None
    assert agent["last_seq"] == 52


async def test_a_batch_of_reports_gives_one_outcome_each(store: Store) -> None:
    ingest = InventoryIngest(store=store, history_per_agent=2)
    now = datetime.now(UTC)
    batch = [
        (_report(1), now),
        (_report(3, vms=("vm-001", "vm-002")), now),
        (_report(2), now),  # older than the one before it: a QoS 1 redelivery
        (_report(4, agent_id="hospital-x"), now),
    ]
    outcomes = await ingest.reports(batch)
    assert [(o.agent_id, o.accepted, o.came_online, o.reason) for o in outcomes] == [
        (AGENT, True, True, ""),
        (AGENT, True, False, ""),
        (AGENT, False, False, "stale"),
        ("hospital-x", False, False, "unknown_agent"),
    ]
    agent = await store.run(inventory.get_agent, AGENT)
    assert agent is not None
    assert (agent["state"], agent["last_seq"], agent["vms"]) == ("online", 3, 2)
    assert [h["seq"] for h in await store.run(inventory.history, AGENT)] == [3, 1]


async def test_status_and_events_of_an_enrolled_agent_are_kept(store: Store) -> None:
    ingest = InventoryIngest(store=store, history_per_agent=10)
    now = datetime.now(UTC)
    assert await ingest.status(AgentStatus(agent_id=AGENT, state="online"), received_at=now)
    assert not await ingest.status(AgentStatus(agent_id=AGENT, state="online"), received_at=now)
    await ingest.event(Event(agent_id=AGENT, kind="pong", detail="hi"), received_at=now)
    events = await store.run(inventory.recent_events, agent_id=AGENT)
    assert [(e["kind"], e["detail"]) for e in events] == [("pong", "hi")]


async def test_status_and_events_of_an_unknown_agent_are_refused(store: Store) -> None:
    ingest = InventoryIngest(store=store, history_per_agent=10)
    now = datetime.now(UTC)
    with pytest.raises(UnknownAgent):
        await ingest.status(AgentStatus(agent_id="hospital-x", state="online"), received_at=now)
    with pytest.raises(UnknownAgent):
        await ingest.event(Event(agent_id="hospital-x", kind="pong"), received_at=now)


def test_the_report_quota_allows_a_burst_then_its_rate() -> None:
    quota = ReportQuota(per_minute=60, burst=3)
    assert [quota.admit(AGENT, 100.0) for _ in range(4)] == [True, True, True, False]
    assert quota.admit("hospital-b", 100.0)  # each agent its own bucket
    assert not quota.admit(AGENT, 100.5)
    assert quota.admit(AGENT, 101.1)  # one a second
    assert not quota.admit(AGENT, 101.2)
    assert [quota.admit(AGENT, 1000.0) for _ in range(4)] == [True, True, True, False]


async def test_history_keeps_only_its_byte_budget_per_agent(store: Store) -> None:
    """A hospital sending reports of 4,096 VMs kept 200 of them (hundreds of MB)."""
    ingest = InventoryIngest(store=store, history_per_agent=200, history_bytes_per_agent=1 << 20)
    now = datetime.now(UTC)
    names = tuple(f"vm-{i:04d}" for i in range(2000))
    outcomes = await ingest.reports([(_report(seq, vms=names), now) for seq in range(1, 8)])
    assert all(o.accepted for o in outcomes)
    sizes = await store.run(
        lambda conn: [
            r[0]
            for r in conn.execute(
                "SELECT length(payload) FROM report_history WHERE agent_id = ? ORDER BY id",
                (AGENT,),
            )
        ]
    )
    assert sum(sizes) <= 1 << 20
    assert sizes  # the newest is kept
    history = await store.run(inventory.history, AGENT, 10)
    assert history[0]["seq"] == 7
