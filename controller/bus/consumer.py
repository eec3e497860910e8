"""The controller's side of the bus: consume what agents and aggregators send, send commands.

The transport is thin: it parses the topic, decodes the payload into its model and hands it to
the inventory's ingest service (`fedsky.controller.inventory.service`). Reports are batched: the
consumer puts them on a bounded queue and one ingest task hands each batch to the service, which
writes it in a single transaction; that is what lets one controller hold thousands of agents.

A payload that fails validation is counted and logged once per sender and reason, then dropped;
it never stops the consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import aiomqtt
from fedsky.controller.bus.broker_config import DYNSEC_COMMANDS, DYNSEC_RESPONSES
from fedsky.controller.inventory.service import InventoryIngest, UnknownAgent
from fedsky.shared.ids import CONTROLLER_ID, is_agent_id, is_aggregator_id
from fedsky.shared.messages import (
    AgentStatus,
    Command,
    Event,
    PayloadError,
    Report,
    decode,
)
from fedsky.shared.retry import Backoff
from fedsky.shared.topics import Topics
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

INGEST_QUEUE = 20_000
INGEST_BATCH = 500

# Why the inventory refused a report, as the rejection log says it.
REPORT_REFUSALS = {
    "unknown_agent": "not enrolled or revoked",
    "stale": "older than the newest report stored",
    "from_future": "sent_at is ahead of the controller's clock",
}

EventListener = Callable[[Event], Awaitable[None]]
AggregatorHandler = Callable[[str, str, bytes], Awaitable[None]]


class BusUnavailable(Exception):
    """The broker cannot be reached right now."""


class RejectLog:
    """Counts rejected payloads; logs each (sender, reason) pair once."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def reject(self, sender: str, reason: str, detail: str) -> None:
        key = (sender, reason)
        self.counts[key] += 1
        if self.counts[key] == 1:
            log.warning(
                "dropped payload from %s: %s (%s); further ones are only counted",
                sender,
                reason,
                detail,
            )

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_reason(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for (_, reason), n in self.counts.items():
            out[reason] += n
        return dict(out)


@dataclass
class BusStats:
    received: int = 0
    reports_stored: int = 0
    connected_since: datetime | None = None
    last_error: str | None = None
    rejects: RejectLog = field(default_factory=RejectLog)


class ControllerBus:
    def __init__(
        self,
        *,
        host: str,
        port: int,
        tls_context: ssl.SSLContext,
        topics: Topics,
        inventory: InventoryIngest,
        backoff: Backoff | None = None,
        dynsec: bool = False,
    ) -> None:
        self._host = host
        # The broker's dynamic-security plugin answers the controller's commands (cut_session).
        self._dynsec = dynsec
        self._dynsec_lock = asyncio.Lock()
        self._dynsec_answer: asyncio.Future[bytes] | None = None
        self._port = port
        self._tls = tls_context
        self.topics = topics
        self._inventory = inventory
        self._backoff = backoff or Backoff(base_s=0.5, cap_s=10.0)
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._ingest: asyncio.Queue[tuple[Report, datetime]] = asyncio.Queue(INGEST_QUEUE)
        self._event_listeners: list[EventListener] = []
        self.aggregator_handler: AggregatorHandler | None = None
        self.stats = BusStats()

    # -- public --------------------------------------------------------------------------------

    def add_event_listener(self, listener: EventListener) -> None:
        self._event_listeners.append(listener)

    def remove_event_listener(self, listener: EventListener) -> None:
        with contextlib.suppress(ValueError):
            self._event_listeners.remove(listener)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def send_command(self, agent_id: str, command: Command) -> None:
        """Publish a command (QoS 1) with an MQTT message expiry matching the command's own."""
        client = self._client
        if client is None or not self._connected.is_set():
            raise BusUnavailable("the broker is not reachable; the command was not sent")
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        ttl = int((command.expires_at - datetime.now(UTC)).total_seconds())
        props.MessageExpiryInterval = max(1, ttl)
        try:
            await client.publish(
                self.topics.cmd(agent_id), command.encode(), qos=1, properties=props, timeout=10
            )
        except aiomqtt.MqttError as exc:
            raise BusUnavailable(f"publishing the command failed: {exc}") from None

    async def cut_session(self, username: str, *, timeout: float = 5.0) -> None:
        """Close every connection of `username` now, through the broker's dynamic-security
        plugin: the client is created there and deleted at once (deleting a client closes its
        sessions; the plugin holds no clients otherwise). BusUnavailable if it did not answer
        or refused."""
        client = self._client
        if not self._dynsec:
            raise BusUnavailable("the broker has no dynamic-security plugin")
        if client is None or not self._connected.is_set():
            raise BusUnavailable("the broker is not reachable")
        commands = {
            "commands": [
                {"command": "createClient", "username": username},
                {"command": "deleteClient", "username": username},
            ]
        }
        async with self._dynsec_lock:
            answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
            self._dynsec_answer = answer
            try:
                await client.publish(DYNSEC_COMMANDS, json.dumps(commands), qos=1, timeout=10)
                async with asyncio.timeout(timeout):
                    raw = await answer
            except (aiomqtt.MqttError, TimeoutError) as exc:
                raise BusUnavailable(f"the broker did not cut the session: {exc}") from None
            finally:
                self._dynsec_answer = None
        try:
            responses = json.loads(raw)["responses"]
            deleted = next(r for r in responses if r.get("command") == "deleteClient")
        except (ValueError, KeyError, TypeError, StopIteration):
            raise BusUnavailable("the broker's answer to the session cut is unreadable") from None
        if deleted.get("error"):
            raise BusUnavailable(f"the broker refused to cut the session: {deleted['error']}")

    async def run(self) -> None:
        """Consume until cancelled, reconnecting with backoff and full jitter."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._ingest_loop(), name="bus-ingest")
            tg.create_task(self._connection_loop(), name="bus-connection")

    # -- connection ----------------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        delays = self._backoff.delays()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        # Keep the session for an hour so QoS 1 messages sent while the controller restarts wait
        # for it at the broker.
        props.SessionExpiryInterval = 3600
        while True:
            try:
                async with aiomqtt.Client(
                    self._host,
                    self._port,
                    identifier=f"{CONTROLLER_ID}-{self.topics.prefix}".replace("/", "-"),
                    tls_context=self._tls,
                    protocol=aiomqtt.ProtocolVersion.V5,
                    clean_start=False,
                    properties=props,
                    keepalive=30,
                    timeout=10,
                    max_queued_incoming_messages=INGEST_QUEUE,
                ) as client:
                    await client.subscribe(self.topics.all_agents_up, qos=1)
                    await client.subscribe(self.topics.all_aggregators_up, qos=1)
                    if self._dynsec:
                        await client.subscribe(DYNSEC_RESPONSES, qos=1)
                    self._client = client
                    self._connected.set()
                    self.stats.connected_since = datetime.now(UTC)
                    self.stats.last_error = None
                    delays = self._backoff.delays()
                    log.info("connected to the broker at %s:%d", self._host, self._port)
                    async for message in client.messages:
                        await self._dispatch(message)
            except aiomqtt.MqttError as exc:
                self.stats.last_error = str(exc)
                log.warning("broker connection lost or refused: %s", exc)
            finally:
                self._client = None
                self._connected.clear()
                self.stats.connected_since = None
            await asyncio.sleep(next(delays, self._backoff.cap_s))

    # -- dispatch ------------------------------------------------------------------------------

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        if message.topic.value == DYNSEC_RESPONSES:
            answer = self._dynsec_answer
            if answer is not None and not answer.done() and isinstance(message.payload, bytes):
                answer.set_result(message.payload)
            return
        self.stats.received += 1
        topic = self.topics.parse_up(message.topic.value)
        if topic is None:
            self.stats.rejects.reject("?", "bad_topic", message.topic.value[:120])
            return
        payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
        if topic.role == "agents" and not is_agent_id(topic.sender):
            # The ACL ties a subtree to the certificate's name, not to its role: an aggregator
            # or the controller could write under agents/<its own id>/.
            self.stats.rejects.reject(topic.sender, "bad_sender", "not an agent identity")
            return
        now = datetime.now(UTC)
        try:
            if topic.role == "aggregators":
                await self._dispatch_aggregator(topic.sender, topic.channel, bytes(payload))
            elif topic.channel == "report":
                if not self._inventory.quota.admit(topic.sender, time.monotonic()):
                    raise PayloadError("rate_limited", "more reports than its quota allows")
                report = decode(Report, payload)
                self._check_sender(topic.sender, report.agent_id)
                await self._ingest.put((report, now))
            elif topic.channel == "status":
                if not payload:  # a cleared retained message
                    return
                status = decode(AgentStatus, payload)
                self._check_sender(topic.sender, status.agent_id)
                if await self._inventory.status(status, received_at=now):
                    log.info("agent %s is %s", status.agent_id, status.state)
            elif topic.channel == "events":
                event = decode(Event, payload)
                self._check_sender(topic.sender, event.agent_id)
                await self._inventory.event(event, received_at=now)
                for listener in list(self._event_listeners):
                    try:
                        await listener(event)
                    except PayloadError as exc:  # e.g. an event about another agent's task
                        self.stats.rejects.reject(topic.sender, exc.reason, exc.detail)
                    except Exception:
                        log.exception(
                            "event listener failed on %s from %s", event.kind, event.agent_id
                        )
            else:
                raise PayloadError("bad_channel", topic.channel)
        except PayloadError as exc:
            self.stats.rejects.reject(topic.sender, exc.reason, exc.detail)
        except UnknownAgent:
            self.stats.rejects.reject(topic.sender, "unknown_agent", "not enrolled or revoked")

    async def _dispatch_aggregator(self, sender: str, channel: str, payload: bytes) -> None:
        if not is_aggregator_id(sender):
            raise PayloadError("bad_sender", "aggregator topics are for agg-* identities")
        handler = self.aggregator_handler
        if handler is None:
            raise PayloadError("no_job", "no job is listening for aggregators")
        await handler(sender, channel, payload)

    @staticmethod
    def _check_sender(topic_sender: str, claimed: str) -> None:
        # The broker's ACL ties the topic to the certificate; the payload must agree with it.
        if topic_sender != claimed:
            raise PayloadError("sender_mismatch", f"payload claims {claimed!r}")

    async def _ingest_loop(self) -> None:
        while True:
            batch = [await self._ingest.get()]
            while len(batch) < INGEST_BATCH and not self._ingest.empty():
                batch.append(self._ingest.get_nowait())
            try:
                outcomes = await self._inventory.reports(batch)
            except Exception:
                log.exception("storing %d reports failed", len(batch))
                continue
            for outcome in outcomes:
                if outcome.accepted:
                    self.stats.reports_stored += 1
                    if outcome.came_online:
                        log.info("agent %s is online", outcome.agent_id)
                else:
                    self.stats.rejects.reject(
                        outcome.agent_id, outcome.reason, REPORT_REFUSALS.get(outcome.reason, "")
                    )

    @property
    def ingest_backlog(self) -> int:
        return self._ingest.qsize()
