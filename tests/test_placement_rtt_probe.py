"""The agent's RTT probe against real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest
from fedsky.agent.rtt_probe import ProbeConfigError, parse_target, probe_rtt

from tests.support import eventually, free_port


@pytest.fixture
async def listener() -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP server on a free loopback port; the list counts connections it accepted."""
    accepted: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield port, accepted


async def test_measures_a_listening_socket_and_leaves_out_a_refused_one(
    listener: tuple[int, list[int]],
) -> None:
    port, accepted = listener
    rtt = await probe_rtt(
        targets={
            "aws:us-east-1": f"127.0.0.1:{port}",
            "gcp:us-east1": f"127.0.0.1:{free_port()}",  # nothing listens: refused
        },
        attempts=3,
        timeout_s=2.0,
    )
    assert set(rtt) == {"aws:us-east-1"}
    assert 0 < rtt["aws:us-east-1"] < 100.0  # loopback: well under a WAN round trip
    # One connect per attempt (the server counts each as its handler runs).
    await eventually(lambda: len(accepted) == 3, timeout=2, what="three accepted connects")


@pytest.fixture
async def blackhole() -> AsyncIterator[int]:
    """A port that never answers: a listening socket whose accept queue is full drops SYNs."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port: int = srv.getsockname()[1]
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            c.connect(("127.0.0.1", port))
        fillers.append(c)
    await asyncio.sleep(0.1)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        srv.close()


async def test_a_target_that_never_answers_times_out(blackhole: int) -> None:
    start = time.perf_counter()
    rtt = await probe_rtt(
        targets={"aws:eu-west-1": f"127.0.0.1:{blackhole}"}, attempts=2, timeout_s=0.3
    )
    elapsed = time.perf_counter() - start
    assert rtt == {}
    assert 0.55 < elapsed < 2.0  # two attempts of 0.3 s each, not the kernel's SYN retries


async def test_concurrency_is_bounded(blackhole: int) -> None:
    targets = {f"aws:r{i}": f"127.0.0.1:{blackhole}" for i in range(4)}
    start = time.perf_counter()
    await probe_rtt(targets=targets, attempts=1, timeout_s=0.5, concurrency=2)
    two_at_a_time = time.perf_counter() - start
    start = time.perf_counter()
    await probe_rtt(targets=targets, attempts=1, timeout_s=0.5, concurrency=4)
    all_at_once = time.perf_counter() - start
    assert 0.95 < two_at_a_time < 3.0  # two waves of 0.5 s
    assert all_at_once < 0.9  # one wave


async def test_many_targets_all_measured(listener: tuple[int, list[int]]) -> None:
    port, _ = listener
    targets = {f"aws:r{i}": f"127.0.0.1:{port}" for i in range(12)}
    rtt = await probe_rtt(targets=targets, attempts=1, concurrency=3)
    assert set(rtt) == set(targets)
    assert all(v > 0 for v in rtt.values())


@pytest.mark.parametrize(
    ("location", "address", "message"),
    [
        ("us-east-1", "127.0.0.1:443", "is invalid"),
        ("aws:us-east-1", "127.0.0.1", "is not host:port"),
        ("aws:us-east-1", "127.0.0.1:99999", "is not host:port"),
        ("aws:us-east-1", ":443", "is not host:port"),
    ],
)
def test_bad_targets_fail_before_any_connect(location: str, address: str, message: str) -> None:
    with pytest.raises(ProbeConfigError, match=message):
        parse_target(location, address)


def test_ipv6_literal() -> None:
    assert parse_target("aws:us-east-1", "[::1]:443") == ("::1", 443)


async def test_bad_options() -> None:
    with pytest.raises(ProbeConfigError, match="timeout must be > 0"):
        await probe_rtt(targets={}, timeout_s=0)
    with pytest.raises(ProbeConfigError, match="at least 1"):
        await probe_rtt(targets={}, concurrency=0)
