"""What agents send, written to the inventory: the bus consumer's one way in.

The consumer decodes and checks each message, then hands it here; these methods run the
inventory's functions (`fedsky.controller.inventory.store`) in the store's thread. A batch of
reports is written in one transaction, which is what lets one controller hold thousands of
agents.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from fedsky.controller.inventory.store import (
    ReportOutcome,
    UnknownAgent,
    record_event,
    record_reports,
    record_status,
)
from fedsky.controller.store import Store
from fedsky.shared.messages import AgentStatus, Event, Report

__all__ = ["InventoryIngest", "ReportOutcome", "UnknownAgent"]


class ReportQuota:
    """Per agent, a token bucket: `burst` reports at once, then `per_minute`. Plain state (the
    caller gives the time), so the consumer asks it before it parses a report at all."""

    def __init__(self, *, per_minute: float, burst: int) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._tokens: dict[str, tuple[float, float]] = {}  # agent -> (tokens, at)

    def admit(self, agent_id: str, now: float) -> bool:
        tokens, at = self._tokens.get(agent_id, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        admitted = tokens >= 1.0
        self._tokens[agent_id] = (tokens - 1.0 if admitted else tokens, now)
        return admitted


class InventoryIngest:
    """Stores reports, statuses and events from enrolled agents.

    Messages from an id that is not enrolled (or was revoked) are refused: `reports` says so
    in the outcome of each, `status` and `event` raise `UnknownAgent`.
    """

    def __init__(
        self,
        *,
        store: Store,
        history_per_agent: int,
        history_bytes_per_agent: int = 4 << 20,
        quota: ReportQuota | None = None,
    ) -> None:
        self._store = store
        self._history = history_per_agent
        self._history_bytes = history_bytes_per_agent
        self.quota = quota or ReportQuota(per_minute=60.0, burst=10)

    async def reports(self, batch: Sequence[tuple[Report, datetime]]) -> list[ReportOutcome]:
        """Store a batch of (report, received at) in one transaction; one outcome per report."""
        return await self._store.run(
            record_reports,
            batch,
            history_limit=self._history,
            history_bytes=self._history_bytes,
        )

    async def status(self, status: AgentStatus, *, received_at: datetime) -> bool:
        """Apply an agent's online/offline status; True when its state changed."""
        return await self._store.run(record_status, status, received_at=received_at)

    async def event(self, event: Event, *, received_at: datetime) -> None:
        """Keep an agent's event (the newest `EVENTS_PER_AGENT` per agent are kept)."""
        await self._store.run(record_event, event, received_at=received_at)
