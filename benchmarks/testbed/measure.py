"""Measured RTT of the testbed's links, through their relays.

A small echo server listens in each destination's namespace; a probe in the source's namespace
dials the destination's address (so it goes through the relay, as every real connection does),
exchanges one byte N times and takes the median. A TCP connect time would say nothing: the
relay accepts locally.

Echo servers and probes run in one helper process in the bridge namespace, each socket created
in the namespace it speaks from (netns.socket_in).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from benchmarks.testbed.netns import Testbed, TestbedError, socket_in
from benchmarks.testbed.relay import child_env, module_command
from benchmarks.testbed.topology import Link, Plan

log = logging.getLogger(__name__)

ECHO_PORT = 7007
PROBES = 10
PROBE_TIMEOUT_S = 20.0


class MeasureError(TestbedError):
    """The measurement could not run."""


def tolerance_ms(target_ms: float) -> float:
    """Allowed deviation: 10% of the target or 2 ms, whichever is larger."""
    return max(0.1 * target_ms, 2.0)


def within_tolerance(target_ms: float, measured_ms: float) -> bool:
    return abs(measured_ms - target_ms) <= tolerance_ms(target_ms)


def echo_services(plan: Plan, port: int = ECHO_PORT) -> dict[str, list[int]]:
    """The relay services the probes need: the echo port on every link's destination."""
    return {link.b: [port] for link in plan.links}


@dataclass(frozen=True)
class Probe:
    key: str
    netns: str  # where the probe's socket lives (the link's source)
    address: str  # the destination's address
    port: int
    count: int


@dataclass(frozen=True)
class Echo:
    netns: str
    address: str
    port: int


# -- inside the helper process -----------------------------------------------------------------


async def _echo_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while data := await reader.read(4096):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.transport.abort()


async def start_echo(echo: Echo) -> asyncio.Server:
    sock = await asyncio.to_thread(socket_in, echo.netns)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((echo.address, echo.port))
    sock.listen(64)
    sock.setblocking(False)
    return await asyncio.start_server(_echo_client, sock=sock)


async def probe(p: Probe) -> float:
    """Median RTT in ms of `count` one-byte exchanges, after one warm-up exchange (which
    includes the relay's own connection to the destination)."""
    loop = asyncio.get_running_loop()
    sock = await asyncio.to_thread(socket_in, p.netns)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, (p.address, p.port))
        samples = []
        for i in range(p.count + 1):
            start = time.perf_counter()
            await loop.sock_sendall(sock, b"x")
            if not await loop.sock_recv(sock, 1):
                raise MeasureError(f"{p.key}: the echo connection closed")
            if i:
                samples.append((time.perf_counter() - start) * 1000.0)
        return statistics.median(samples)
    finally:
        sock.close()


async def run_measurement(echoes: Sequence[Echo], probes: Sequence[Probe]) -> dict[str, float]:
    servers = [await start_echo(e) for e in echoes]
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(probe(p) for p in probes)), PROBE_TIMEOUT_S
        )
        return {p.key: round(ms, 2) for p, ms in zip(probes, results, strict=True)}
    finally:
        for server in servers:
            server.close()


def _helper_main() -> int:
    request = json.load(sys.stdin)
    try:
        results = asyncio.run(
            run_measurement(
                [Echo(**e) for e in request["echoes"]], [Probe(**p) for p in request["probes"]]
            )
        )
        reply: dict[str, Any] = {"ok": True, "results": results}
    except (OSError, TimeoutError, TestbedError) as exc:
        reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    json.dump(reply, sys.stdout)
    return 0 if reply["ok"] else 1


# -- the parent's side -------------------------------------------------------------------------


def measure_links(
    testbed: Testbed,
    *,
    links: Iterable[Link] | None = None,
    port: int = ECHO_PORT,
    count: int = PROBES,
) -> list[dict[str, Any]]:
    """`[{"from","to","rtt_target_ms","rtt_measured_ms"}]` for the plan's links (or `links`),
    measured from each link's `a` to its `b`. Relays for `port` must be running
    (`routes_for(plan, echo_services(plan, port))`)."""
    plan = testbed.plan
    chosen = list(plan.links if links is None else links)
    echoes = {plan.host(link.b).netns: plan.host(link.b) for link in chosen}
    request = {
        "echoes": [asdict(Echo(h.netns, h.address, port)) for h in echoes.values()],
        "probes": [
            asdict(Probe(f"{i}", plan.host(link.a).netns, plan.host(link.b).address, port, count))
            for i, link in enumerate(chosen)
        ],
    }
    proc = testbed.popen(
        plan.bridge_netns,
        module_command("benchmarks.testbed.measure"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    try:
        out, err = proc.communicate(json.dumps(request), timeout=PROBE_TIMEOUT_S + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise MeasureError("the measurement did not finish") from None
    try:
        reply = json.loads(out)
    except ValueError:
        raise MeasureError(f"the measurement failed: {err.strip()[-2000:]}") from None
    if not reply.get("ok"):
        raise MeasureError(f"the measurement failed: {reply.get('error')}")
    results: dict[str, float] = reply["results"]
    return [
        {
            "from": plan.host(link.a).netns,
            "to": plan.host(link.b).netns,
            "rtt_target_ms": link.rtt_target_ms,
            "rtt_measured_ms": results[f"{i}"],
        }
        for i, link in enumerate(chosen)
    ]


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("TESTBED_LOG", "WARNING"), stream=sys.stderr)
    sys.exit(_helper_main())
