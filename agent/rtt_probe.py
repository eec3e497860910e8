"""Measure this site's round-trip time to candidate cloud regions: the TCP connect time.

A TCP connect takes one round trip (SYN, SYN-ACK), so its duration is an RTT measured without
privileges or ICMP. Each target is probed a few times and the smallest figure kept (the others
carry queueing delay). The agent reports the result (`Report.rtt_ms`) and the optimizer uses a
measured figure instead of its table's.

Targets come from the agent's config as `cloud:region -> host:port` (an endpoint in that region
that accepts TCP connections, e.g. a regional API endpoint on port 443).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping

from fedsky.shared.ids import InvalidIdError, check_location

LOG = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 3.0
DEFAULT_ATTEMPTS = 3
DEFAULT_CONCURRENCY = 8


class ProbeConfigError(ValueError):
    """A probe target that is not `cloud:region -> host:port`."""


def parse_target(location: str, address: str) -> tuple[str, int]:
    """(host, port) from `host:port` or `[v6 address]:port`; raises ProbeConfigError."""
    try:
        check_location(location)
    except InvalidIdError as exc:
        raise ProbeConfigError(f"rtt probe target {location!r}: {exc}") from None
    host, sep, port_text = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ProbeConfigError(
            f"rtt probe target {location!r}: address {address!r} is not host:port (port 1-65535)"
        )
    return host, int(port_text)


async def _connect_ms(host: str, port: int, timeout_s: float) -> float:
    start = time.perf_counter()
    async with asyncio.timeout(timeout_s):
        _reader, writer = await asyncio.open_connection(host, port)
    elapsed = (time.perf_counter() - start) * 1000.0
    writer.close()
    with contextlib.suppress(OSError):  # a reset on close says nothing about the connect time
        await writer.wait_closed()
    return elapsed


async def probe_rtt(
    *,
    targets: Mapping[str, str],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    attempts: int = DEFAULT_ATTEMPTS,
    concurrency: int = DEFAULT_CONCURRENCY,
) -> dict[str, float]:
    """RTT in ms per `cloud:region`, the minimum TCP connect time over `attempts`.

    `targets` maps `cloud:region` to `host:port`. Targets that never connect within `timeout_s`
    (refused, unreachable, unresolvable) are left out of the result and logged; at most
    `concurrency` connects run at once, so a probe never floods the site's uplink. Raises
    ProbeConfigError before any connect if a target is malformed.
    """
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ProbeConfigError(f"rtt probe timeout must be > 0 s, got {timeout_s}")
    if attempts < 1 or concurrency < 1:
        raise ProbeConfigError("rtt probe attempts and concurrency must be at least 1")
    parsed = {loc: parse_target(loc, addr) for loc, addr in targets.items()}
    gate = asyncio.Semaphore(concurrency)

    async def one(location: str, host: str, port: int) -> tuple[str, float | None]:
        best: float | None = None
        last_error = ""
        for _ in range(attempts):
            async with gate:
                try:
                    ms = await _connect_ms(host, port, timeout_s)
                except TimeoutError:
                    last_error = f"no answer within {timeout_s:g} s"
                    continue
                except OSError as exc:
                    last_error = exc.strerror or type(exc).__name__
                    continue
            best = ms if best is None else min(best, ms)
        if best is None:
            LOG.warning("rtt probe to %s (%s:%s) failed: %s", location, host, port, last_error)
        return location, best

    results = await asyncio.gather(*(one(loc, h, p) for loc, (h, p) in parsed.items()))
    # A loopback connect can take microseconds; an RTT of 0 would read as "no network at all".
    return {loc: max(round(ms, 3), 0.001) for loc, ms in results if ms is not None}
