"""MQTT topic names: the one place that spells them.

Agents write under `{prefix}/agents/{id}/up/` and read `{prefix}/agents/{id}/down/`.
A job's aggregator (identity `agg-<job id>`) writes under `{prefix}/aggregators/{id}/up/`.
The prefix is configurable so that several deployments (or tests) can share one broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_PREFIX = "fedsky/v1"

UpChannel = Literal["report", "status", "events", "metrics"]
UP_CHANNELS: tuple[UpChannel, ...] = ("report", "status", "events", "metrics")


@dataclass(frozen=True)
class ParsedTopic:
    role: Literal["agents", "aggregators"]
    sender: str
    channel: UpChannel


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    # Agent side.
    def report(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{agent_id}/up/report"

    def status(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{agent_id}/up/status"

    def events(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{agent_id}/up/events"

    def cmd(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{agent_id}/down/cmd"

    # Aggregator side.
    def aggregator_metrics(self, aggregator_id: str) -> str:
        return f"{self.prefix}/aggregators/{aggregator_id}/up/metrics"

    def aggregator_status(self, aggregator_id: str) -> str:
        return f"{self.prefix}/aggregators/{aggregator_id}/up/status"

    # What the controller subscribes to.
    @property
    def all_agents_up(self) -> str:
        return f"{self.prefix}/agents/+/up/#"

    @property
    def all_aggregators_up(self) -> str:
        return f"{self.prefix}/aggregators/+/up/#"

    def parse_up(self, topic: str) -> ParsedTopic | None:
        """Split an upward topic into role, sender and channel; None if it is not one of ours."""
        head = f"{self.prefix}/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if len(parts) != 4 or parts[2] != "up":
            return None
        role, sender, _, channel = parts
        if role not in ("agents", "aggregators") or channel not in UP_CHANNELS or not sender:
            return None
        return ParsedTopic(role=role, sender=sender, channel=channel)  # type: ignore[arg-type]
