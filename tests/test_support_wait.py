"""The tests' wait helpers: what they return, what they retry, and what a timeout says."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from tests.support import eventually, eventually_blocking, free_port


async def test_returns_the_first_truthy_value_of_a_plain_probe() -> None:
    calls: list[int] = []

    def probe() -> list[int]:
        calls.append(1)
        return calls[2:]

    assert await eventually(probe, interval=0.001) == [1]
    assert len(calls) == 3


async def test_awaits_an_async_probe_and_lets_the_loop_run() -> None:
    flag = asyncio.Event()
    asyncio.get_running_loop().call_later(0.02, flag.set)

    async def probe() -> str:
        await asyncio.sleep(0)
        return "set" if flag.is_set() else ""

    assert await eventually(probe, interval=0.005) == "set"


async def test_until_tests_the_value_and_the_passing_value_is_returned() -> None:
    values = iter(["starting", "running", "finished:completed", "never read"])
    status = await eventually(lambda: next(values), until=lambda s: s.startswith("finished"))
    assert status == "finished:completed"


async def test_a_probe_that_asserts_is_retried() -> None:
    calls: list[int] = []

    def probe() -> bool:
        calls.append(1)
        assert len(calls) > 2, "not yet"
        return True

    assert await eventually(probe, interval=0.001) is True
    assert len(calls) == 3


async def test_any_other_error_fails_at_once_unless_ignored() -> None:
    started = time.monotonic()
    jobs: dict[str, str] = {}
    with pytest.raises(KeyError):
        await eventually(lambda: jobs["missing"], timeout=5)
    assert time.monotonic() - started < 1
    calls: list[int] = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("not up yet")
        return len(calls)

    assert await eventually(flaky, interval=0.001, ignoring=(OSError,)) == 3


async def test_timeout_names_the_wait_and_shows_the_last_value_and_details() -> None:
    with pytest.raises(AssertionError) as caught:
        await eventually(
            lambda: {"state": "placing"},
            until=lambda job: job["state"] == "training",
            timeout=0.05,
            interval=0.01,
            what="the job to train",
            details=lambda: "log: placing forever",
        )
    message = str(caught.value)
    assert message.startswith("timed out after 0.05 s (")
    assert "waiting for the job to train; last value: {'state': 'placing'}" in message
    assert message.endswith("\nlog: placing forever")


async def test_timeout_shows_the_last_error_and_chains_it() -> None:
    def probe() -> bool:
        raise AssertionError("vm-001 is still running")

    with pytest.raises(AssertionError, match=r"last error: AssertionError\('vm-001") as caught:
        await eventually(probe, timeout=0.03, interval=0.01, what="vm-001 to stop")
    assert isinstance(caught.value.__cause__, AssertionError)


async def test_a_long_last_value_is_cut_in_the_message() -> None:
    with pytest.raises(AssertionError) as caught:
        await eventually(lambda: "x" * 10_000, until=lambda v: False, timeout=0.02)
    assert str(caught.value).endswith("x ...")
    assert len(str(caught.value)) < 2200


async def test_an_async_probe_that_hangs_fails_the_wait_when_the_time_is_up() -> None:
    async def hangs() -> bool:
        await asyncio.sleep(60)
        return True

    started = time.monotonic()
    with pytest.raises(AssertionError, match="did not answer within"):
        await eventually(hangs, timeout=0.1, what="an answer")
    assert time.monotonic() - started < 2


async def test_a_timeout_raised_by_the_probe_itself_is_its_own_error() -> None:
    async def times_out() -> bool:
        raise TimeoutError("socket timed out")

    with pytest.raises(TimeoutError, match="socket timed out"):
        await eventually(times_out, timeout=5)


def test_blocking_version_polls_sleeps_and_times_out() -> None:
    calls: list[int] = []

    def probe() -> list[int]:
        calls.append(len(calls))
        return calls[2:]

    assert eventually_blocking(probe, interval=0.001) == [2]
    with pytest.raises(AssertionError, match=r"waiting for nothing; last value: 0"):
        eventually_blocking(lambda: 0, timeout=0.02, interval=0.005, what="nothing")


def test_timeout_and_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        eventually_blocking(lambda: True, timeout=0)


def test_free_port_can_be_bound_and_refuses_connections_until_then() -> None:
    port = free_port()
    with socket.socket() as client:
        assert client.connect_ex(("127.0.0.1", port)) != 0
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
