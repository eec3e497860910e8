"""MQTT topic names: the one place that spells them.

Agents write under `{prefix}/agents/{id}/up/` and read `{prefix}/agents/{id}/down/`.
A job's aggregator (identity `agg-<job id>`) writes under `{prefix}/aggregators/{id}/up/`.
The prefix is configurable so that several deployments (or tests) can share one broker.

The subtree functions (`agent_up`, `agent_down`, `aggregator_up`) take either an identity or
one of the stand-ins below, so the controller's subscriptions and the broker's ACL are spelled
by the same code as the topics clients publish to.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DEFAULT_PREFIX = "fedsky/v1"

# MQTT's single-level wildcard: any one identity (subscriptions, the controller's ACL lines).
ANY_ID = "+"
# In a Mosquitto ACL `pattern` line, the client's username: with `use_identity_as_username`,
# the CN of its certificate. A pattern built with it lets each identity reach only its own topics.
ACL_USERNAME = "%u"

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
        return f"{self._agent(agent_id, 'up')}/report"

    def status(self, agent_id: str) -> str:
        return f"{self._agent(agent_id, 'up')}/status"

    def events(self, agent_id: str) -> str:
        return f"{self._agent(agent_id, 'up')}/events"

    def cmd(self, agent_id: str) -> str:
        return f"{self._agent(agent_id, 'down')}/cmd"

    # Aggregator side.
    def aggregator_metrics(self, aggregator_id: str) -> str:
        return f"{self._aggregator(aggregator_id)}/metrics"

    def aggregator_status(self, aggregator_id: str) -> str:
        return f"{self._aggregator(aggregator_id)}/status"

    # Whole subtrees: an identity, `ANY_ID` or `ACL_USERNAME`.
    def agent_up(self, agent_id: str) -> str:
        """Everything an agent sends."""
        return f"{self._agent(agent_id, 'up')}/#"

    def agent_down(self, agent_id: str) -> str:
        """Everything an agent receives."""
        return f"{self._agent(agent_id, 'down')}/#"

    def aggregator_up(self, aggregator_id: str) -> str:
        """Everything an aggregator sends."""
        return f"{self._aggregator(aggregator_id)}/#"

    # What the controller subscribes to (and, for `down`, publishes under).
    @property
    def all_agents_up(self) -> str:
        return self.agent_up(ANY_ID)

    @property
    def all_aggregators_up(self) -> str:
        return self.aggregator_up(ANY_ID)

    @property
    def all_agents_down(self) -> str:
        return self.agent_down(ANY_ID)

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

    def _agent(self, agent_id: str, direction: Literal["up", "down"]) -> str:
        return f"{self.prefix}/agents/{agent_id}/{direction}"

    def _aggregator(self, aggregator_id: str) -> str:
        return f"{self.prefix}/aggregators/{aggregator_id}/up"
