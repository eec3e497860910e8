"""The agent's optional metrics endpoint (`[metrics] listen` in agent.toml, off by default):
`GET /metrics` in Prometheus's format (`prometheus_client`), plain HTTP without
authentication, so keep it on 127.0.0.1 or the hospital's monitoring network. What the status
socket says, as numbers: the broker connection, reports sent, VMs by state, the task running,
commands refused, the certificate's expiry. No names of VMs or datasets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterator

from fedsky.shared.net import parse_listen
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from .status import AgentState

log = logging.getLogger(__name__)
_MAX_REQUEST = 8192


class AgentCollector(Collector):
    def __init__(self, state: AgentState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state
        yield GaugeMetricFamily(
            "fedsky_agent_broker_connected", "1 when connected to the broker", value=s.connected
        )
        yield CounterMetricFamily(
            "fedsky_agent_broker_connects", "Connections made to the broker", value=s.connects
        )
        yield CounterMetricFamily(
            "fedsky_agent_reports_sent", "Inventory reports sent", value=s.last_report_seq or 0
        )
        vms = GaugeMetricFamily("fedsky_agent_vms", "VMs by state", labels=["state"])
        for state, n in sorted(Counter(vm.state for vm in s.vms).items()):
            vms.add_metric([state], n)
        yield vms
        yield GaugeMetricFamily(
            "fedsky_agent_tasks_running", "fedsky tasks running here", value=int(s.task is not None)
        )
        refused = CounterMetricFamily(
            "fedsky_agent_commands_refused", "Commands refused, by reason", labels=["reason"]
        )
        for reason, n in sorted(s.bad_commands.items()):
            refused.add_metric([reason], n)
        yield refused
        yield GaugeMetricFamily(
            "fedsky_agent_certificate_expiry_timestamp_seconds",
            "When the agent's certificate expires (renewed 30 days ahead)",
            value=s.cert_not_after.timestamp(),
        )


async def serve_metrics(*, listen: str, state: AgentState) -> None:
    """Serve `GET /metrics` until cancelled (anything else: 404)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(state))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            request_line = head[:_MAX_REQUEST].split(b"\r\n", 1)[0].split()
            if request_line[:2] == [b"GET", b"/metrics"]:
                status, kind, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
            else:
                status, kind, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    host, port = parse_listen(listen)
    server = await asyncio.start_server(answer, host, port, limit=_MAX_REQUEST)
    log.info("metrics on http://%s/metrics", listen)
    async with server:
        await server.serve_forever()
