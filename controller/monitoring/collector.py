"""Metrics for monitoring: a Prometheus endpoint on a listener of its own (`[metrics] listen`,
off by default; 127.0.0.1 is the address to give it unless a scraper elsewhere needs it).

It is the one route served without authentication (docs/security.md), so it says only what a
dashboard of the platform's health needs: counts and durations, no names of hospitals, jobs,
VMs or people. Everything is read when scraped, through `prometheus_client`'s collector API:
figures kept in the database (agents, VMs, jobs, rounds, placements, failovers) from it, the
bus consumer's counters (payloads received, reports stored, rejects by reason) from memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from fedsky.controller.bus.consumer import BusStats
from fedsky.controller.jobs.store import ACTIVE_STATES, END_STATES
from fedsky.controller.store import Store
from fedsky.shared.net import parse_listen
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

ROUND_BUCKETS_S = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def _rows(store: Store, sql: str) -> list[Any]:
    return store.call(lambda conn: conn.execute(sql).fetchall())


def _by_label(
    family: GaugeMetricFamily | CounterMetricFamily, rows: list[Any], known: tuple[str, ...]
) -> GaugeMetricFamily | CounterMetricFamily:
    """Every known label value present (0 when none), then any other the rows hold: a series
    that exists from the start is one a dashboard can graph and alert on."""
    counts = {str(label): n for label, n in rows}
    for label in (*known, *sorted(set(counts) - set(known))):
        family.add_metric([label], counts.get(label, 0))
    return family


class ControllerCollector(Collector):
    """The controller's figures, read at each scrape."""

    def __init__(self, *, store: Store, bus: BusStats | None) -> None:
        self.store = store
        self.bus = bus

    def collect(self) -> Iterator[Metric]:
        yield _by_label(
            GaugeMetricFamily("fedsky_agents", "Enrolled agents by state", labels=["state"]),
            _rows(
                self.store,
                "SELECT CASE WHEN revoked_at IS NOT NULL THEN 'revoked' WHEN online THEN "
                "'online' ELSE 'offline' END AS s, COUNT(*) FROM agents GROUP BY s",
            ),
            ("online", "offline", "revoked"),
        )
        yield _by_label(
            GaugeMetricFamily("fedsky_vms", "Hospital VMs by state", labels=["state"]),
            _rows(self.store, "SELECT state, COUNT(*) FROM vms GROUP BY state"),
            ("running",),
        )
        yield _by_label(
            GaugeMetricFamily("fedsky_jobs", "Jobs by state", labels=["state"]),
            _rows(self.store, "SELECT state, COUNT(*) FROM jobs GROUP BY state"),
            (*ACTIVE_STATES, *END_STATES),
        )

        (placed,) = _rows(self.store, "SELECT COUNT(*) FROM jobs WHERE placement_json IS NOT NULL")
        yield CounterMetricFamily(
            "fedsky_placements", "Jobs placed (an aggregator offer chosen)", value=placed[0]
        )
        yield _by_label(
            CounterMetricFamily(
                "fedsky_task_attempts",
                "Participants' attempts: the first on a VM, or a failover to another",
                labels=["kind"],
            ),
            _rows(
                self.store,
                "SELECT CASE WHEN number > 1 THEN 'failover' ELSE 'first' END AS k, COUNT(*) "
                "FROM orchestrator_attempt GROUP BY k",
            ),
            ("first", "failover"),
        )

        durations = [
            float(d)
            for (d,) in _rows(
                self.store, "SELECT duration_s FROM registry_rounds WHERE duration_s IS NOT NULL"
            )
        ]
        buckets = [(f"{le:g}", float(sum(d <= le for d in durations))) for le in ROUND_BUCKETS_S]
        buckets.append(("+Inf", float(len(durations))))
        yield HistogramMetricFamily(
            "fedsky_round_duration_seconds",
            "Training rounds' durations, as the ServerApp timed them",
            buckets=buckets,
            sum_value=sum(durations),
        )

        if self.bus is not None:
            yield CounterMetricFamily(
                "fedsky_bus_messages_received",
                "Messages received from agents and aggregators",
                value=self.bus.received,
            )
            yield CounterMetricFamily(
                "fedsky_reports_ingested", "Inventory reports stored", value=self.bus.reports_stored
            )
            rejected = CounterMetricFamily(
                "fedsky_payloads_rejected", "Payloads refused, by reason", labels=["reason"]
            )
            for reason, n in sorted(self.bus.rejects.by_reason().items()):
                rejected.add_metric([reason], n)
            yield rejected


def make_registry(*, store: Store, bus: BusStats | None) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(store=store, bus=bus))
    return registry


async def serve_metrics(*, listen: str, registry: CollectorRegistry) -> None:
    """Serve `GET /metrics` on `listen` until cancelled."""

    async def metrics(request: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = parse_listen(listen)
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("metrics on http://%s/metrics", listen)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
