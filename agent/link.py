"""The agent's MQTT link: mutual TLS, MQTT 5, one connection at a time, reconnecting for ever.

- The will is the retained `offline` status; on connect the agent subscribes to its command
  topic, then publishes the retained `online` status. A clean stop publishes `offline` itself
  (a normal DISCONNECT does not fire the will).
- Reports go out with QoS 1. While the broker is unreachable only the newest report is kept (a
  one-slot mailbox): an older one would only be overwritten by the controller anyway. Events
  (pong, rejections, and the task runner's events later) wait in a bounded queue, oldest
  dropped first, because each of them says something the next one does not.
- Commands: undecodable payloads are counted per reason and logged once per reason; expired
  commands are answered with a `command_rejected` event; redelivered duplicates (QoS 1) are
  ignored; valid ones go to the daemon's handler. Nothing a payload holds can stop the link.
- Reconnect: exponential backoff with full jitter (`Backoff`), reset after each successful
  connection. Each connection uses a fresh client, so nothing stale is resent from a previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Literal

import aiomqtt
from fedsky.shared.messages import (
    AgentStatus,
    Command,
    Event,
    PayloadError,
    Report,
    decode_command,
    utcnow,
)
from fedsky.shared.retry import Backoff
from fedsky.shared.topics import Topics
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from .status import AgentState

log = logging.getLogger(__name__)

CommandHandler = Callable[[Command], Awaitable[None]]
# Builds the TLS context; it reads the key and certificates, so it runs in a worker thread.
TlsFactory = Callable[[], ssl.SSLContext]

_SEEN_COMMANDS = 512  # redelivered QoS 1 commands are recognised among this many recent ids
_INCOMING_QUEUE = 256  # commands waiting to be handled; the broker holds back the rest
_CLOSE_TIMEOUT_S = 3.0


class _Reconnect(Exception):
    """The session ends because `reconnect()` asked for a new one."""


class AgentLink:
    """One agent's connection to the broker.

    Call `run()` in a task; `close()` before cancelling it, so that it says goodbye.
    """

    def __init__(
        self,
        *,
        agent_id: str,
        host: str,
        port: int,
        topics: Topics,
        tls: TlsFactory,
        state: AgentState,
        on_command: CommandHandler,
        backoff: Backoff | None = None,
        keepalive_s: int = 30,
        timeout_s: float = 10.0,
        session_expiry_s: int = 600,
        version: str = "",
        max_events: int = 1000,
    ) -> None:
        self._agent_id = agent_id
        self._host = host
        self._port = port
        self._topics = topics
        self._tls = tls
        self._state = state
        self._on_command = on_command
        self._backoff = backoff or Backoff(base_s=0.5, cap_s=30.0)
        self._keepalive_s = keepalive_s
        self._timeout_s = timeout_s
        self._session_expiry_s = session_expiry_s
        self._version = version
        self._report: Report | None = None
        self._events: deque[Event] = deque()
        self._max_events = max_events
        self._events_dropped = 0
        self._wake = asyncio.Event()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._logged_reasons: set[str] = set()
        self._client: aiomqtt.Client | None = None
        self._closing = False
        self._reconnect = asyncio.Event()
        self.reports_sent = 0

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    # --- what the daemon hands over -----------------------------------------------------------

    def offer_report(self, report: Report) -> None:
        """Send `report` as soon as connected; it replaces any report not yet sent."""
        self._report = report
        self._state.pending_report_seq = report.seq
        self._state.touch()
        self._wake.set()

    def emit(self, event: Event) -> None:
        """Queue `event` for the events topic (QoS 1, in order; oldest dropped when full)."""
        if len(self._events) >= self._max_events:
            self._events.popleft()
            self._events_dropped += 1
            if self._events_dropped == 1 or self._events_dropped % 100 == 0:
                log.warning(
                    "event queue full while disconnected: %d events dropped so far",
                    self._events_dropped,
                )
        self._events.append(event)
        self._state.events_queued = len(self._events)
        self._wake.set()

    def reconnect(self) -> None:
        """End the current session and connect again at once (with a fresh TLS context: after
        the certificate was renewed)."""
        self._reconnect.set()

    # --- payloads -----------------------------------------------------------------------------

    def _status(self, state: Literal["online", "offline"]) -> bytes:
        return AgentStatus(
            agent_id=self._agent_id, state=state, at=utcnow(), version=self._version
        ).encode()

    def _client_for_attempt(self, tls: ssl.SSLContext) -> aiomqtt.Client:
        connect_props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        connect_props.SessionExpiryInterval = self._session_expiry_s
        return aiomqtt.Client(
            self._host,
            self._port,
            identifier=self._agent_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            tls_context=tls,
            will=aiomqtt.Will(
                topic=self._topics.status(self._agent_id),
                payload=self._status("offline"),
                qos=1,
                retain=True,
            ),
            # Keep the session (and the commands queued in it) across reconnects and restarts:
            # commands carry their own expiry, so nothing stale is acted on.
            clean_start=False,
            properties=connect_props,
            keepalive=self._keepalive_s,
            timeout=self._timeout_s,
            max_queued_incoming_messages=_INCOMING_QUEUE,
            logger=logging.getLogger(f"{__name__}.mqtt"),
        )

    # --- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect with backoff; returns only after `close()` or cancellation."""
        delays = self._backoff.delays()
        last_error: str | None = None
        while not self._closing:
            error: str | None = None
            try:
                tls = await asyncio.to_thread(self._tls)
                client = self._client_for_attempt(tls)
                async with client:
                    # Accepted by the broker: from here a stop must publish `offline` itself,
                    # even before `online` has been acknowledged (a clean DISCONNECT does
                    # not fire the will).
                    self._client = client
                    delays = self._backoff.delays()
                    last_error = None
                    await self._session(client)
            except _Reconnect:
                log.info("reconnecting to broker %s as asked", self.address)
                delays = self._backoff.delays()
                continue
            except aiomqtt.MqttError as exc:
                error = str(exc) or type(exc).__name__
            except (ssl.SSLError, OSError) as exc:
                # Loading the certificate or key failed: say which, without their contents.
                error = f"TLS set-up failed: {exc}"
            finally:
                self._client = None
            if self._closing:
                break
            error = error or "connection closed"
            self._state.link_down(error)
            if error != last_error:
                log.warning("broker %s: %s; retrying with backoff", self.address, error)
                last_error = error
            else:
                log.debug("broker %s: %s", self.address, error)
            await asyncio.sleep(next(delays, self._backoff.cap_s))

    async def _session(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self._topics.cmd(self._agent_id), qos=1)
        await client.publish(
            self._topics.status(self._agent_id), self._status("online"), qos=1, retain=True
        )
        self._state.link_up()
        log.info("connected to broker %s as %s", self.address, self._agent_id)
        self._reconnect.clear()
        receiving = asyncio.create_task(self._receive(client), name="link-receive")
        sending = asyncio.create_task(self._send(client), name="link-send")
        asked = asyncio.create_task(self._reconnect.wait(), name="link-reconnect")
        tasks: set[asyncio.Task[Any]] = {receiving, sending, asked}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiving, sending, asked):
                task.cancel()
            await asyncio.gather(receiving, sending, asked, return_exceptions=True)
        if asked in done:
            raise _Reconnect
        for task in done:
            task.result()  # raises the MqttError that ended the session

    async def _send(self, client: aiomqtt.Client) -> None:
        events_topic = self._topics.events(self._agent_id)
        report_topic = self._topics.report(self._agent_id)
        while True:
            self._wake.clear()
            while self._events:
                event = self._events[0]
                await client.publish(events_topic, event.encode(), qos=1)
                # Removed only once acknowledged: after a disconnect it is sent again.
                if self._events and self._events[0] is event:
                    self._events.popleft()
                self._state.events_queued = len(self._events)
            report = self._report
            if report is not None:
                await client.publish(report_topic, report.encode(), qos=1)
                if self._report is report:
                    self._report = None
                self.reports_sent += 1
                self._state.report_sent(report.seq, utcnow())
                log.debug("report %d sent", report.seq)
            if not self._wake.is_set():
                await self._wake.wait()

    async def _receive(self, client: aiomqtt.Client) -> None:
        cmd_topic = self._topics.cmd(self._agent_id)
        async for message in client.messages:
            if not message.topic.matches(cmd_topic):
                continue
            payload = message.payload
            if not isinstance(payload, bytes | bytearray):
                self._bad("invalid", "payload is not bytes")
                continue
            await self._handle(bytes(payload))

    async def _handle(self, payload: bytes) -> None:
        try:
            command = decode_command(payload)
        except PayloadError as exc:
            self._bad(exc.reason, exc.detail)
            return
        if command.command_id in self._seen:
            log.debug("command %s received again; ignored", command.command_id)
            return
        self._seen[command.command_id] = None
        while len(self._seen) > _SEEN_COMMANDS:
            self._seen.popitem(last=False)
        now = utcnow()
        if command.expired(now):
            log.info(
                "command %s expired at %s; rejected",
                command.command_id,
                command.expires_at.isoformat(),
            )
            self.emit(self.rejection(command, f"expired at {_iso(command.expires_at)}"))
            return
        try:
            await self._on_command(command)
        except Exception:
            log.exception("handling command %s failed", command.command_id)
            self.emit(self.rejection(command, "the agent failed to handle this command"))

    def rejection(self, command: Command, detail: str) -> Event:
        return Event(
            agent_id=self._agent_id,
            kind="command_rejected",
            command_id=command.command_id,
            detail=detail,
        )

    def _bad(self, reason: str, detail: str) -> None:
        counts = self._state.bad_commands
        counts[reason] = counts.get(reason, 0) + 1
        self._state.touch()
        if reason not in self._logged_reasons:
            self._logged_reasons.add(reason)
            # Only the controller may write this topic; the detail is pydantic's, not the payload.
            log.warning(
                "dropped a bad command from the controller (%s: %s); further ones with "
                "this reason are only counted",
                reason,
                detail[:200],
            )

    # --- stopping -----------------------------------------------------------------------------

    async def close(self, *, timeout_s: float = _CLOSE_TIMEOUT_S) -> None:
        """Stop reconnecting and publish the retained offline status if connected."""
        self._closing = True
        client = self._client
        if client is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await client.publish(
                    self._topics.status(self._agent_id), self._status("offline"), qos=1, retain=True
                )
            log.info("published offline status")
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.warning("could not publish the offline status (%s); the broker sends the will", exc)
        with contextlib.suppress(Exception):
            self._state.link_down(None)


def _iso(value: datetime) -> str:
    return value.isoformat()
