"""Waiting in tests: poll until something holds, or fail saying what was seen last.

A test that waits for the code under test (a report to arrive, a process to exit, a job to reach
a state) polls with one of two helpers instead of a loop of its own:

- `await eventually(probe, ...)` in async tests: the event loop runs between polls, so code under
  test in the same loop makes progress. `probe` may be a plain or an async function.
- `eventually_blocking(probe, ...)` in synchronous tests and fixtures (the end-to-end tests that
  drive processes): the thread sleeps between polls.

Both return the first value of `probe()` that passes `until` (by default: the value is truthy),
so a wait can also fetch: `job = await eventually(lambda: jobs.get(job_id))`. An
`AssertionError` raised by the probe counts as "not yet" (a probe may assert), as do the
exception types in `ignoring`; any other exception fails the test at once rather than after the
timeout. On timeout the `AssertionError` names what was awaited and shows the last value or
exception seen, followed by `details()` if given (a job's log, say), computed only then.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")

TIMEOUT_S = 10.0
INTERVAL_S = 0.05
_SHOWN_CHARS = 2000  # of the last value's repr in a failure message


class _Polls(Generic[T]):
    """What both helpers keep between polls: the deadline, the test, the last outcome."""

    def __init__(
        self,
        *,
        timeout: float,
        interval: float,
        what: str,
        details: Callable[[], str] | None,
        until: Callable[[T], object],
        ignoring: tuple[type[BaseException], ...],
    ) -> None:
        if timeout <= 0 or interval <= 0:
            raise ValueError(f"timeout ({timeout}) and interval ({interval}) must be positive")
        self.timeout = timeout
        self.interval = interval
        self.deadline = time.monotonic() + timeout
        self.what = what
        self.details = details
        self.until = until
        self.retried: tuple[type[BaseException], ...] = (AssertionError, *ignoring)
        self.polls = 0
        self.last_value: T | None = None
        self.last_error: BaseException | None = None

    def passes(self, value: T) -> bool:
        self.polls += 1
        self.last_value, self.last_error = value, None
        return bool(self.until(value))

    def refused(self, error: BaseException) -> None:
        self.polls += 1
        self.last_value, self.last_error = None, error

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def pause(self) -> float | None:
        """Seconds to sleep before the next poll; None once the time is up."""
        remaining = self.remaining()
        return None if remaining <= 0 else min(self.interval, remaining)

    def timed_out(self) -> AssertionError:
        if self.last_error is not None:
            last = f"last error: {self.last_error!r}"
        else:
            shown = repr(self.last_value)
            if len(shown) > _SHOWN_CHARS:
                shown = shown[:_SHOWN_CHARS] + " ..."
            last = f"last value: {shown}"
        message = (
            f"timed out after {self.timeout:g} s ({self.polls} polls) waiting for {self.what}; "
            f"{last}"
        )
        if self.details is not None:
            message += "\n" + self.details()
        return AssertionError(message)


class _NoAnswer(Exception):
    """An async probe still running when the wait's time was up."""


async def _answer(pending: Awaitable[T], *, within: float) -> T:
    limit = asyncio.timeout(within)
    try:
        async with limit:
            return await pending
    except TimeoutError:
        if limit.expired():
            raise _NoAnswer(f"the probe did not answer within {within:.3g} s") from None
        raise


@overload
async def eventually(
    probe: Callable[[], Awaitable[T]],
    *,
    until: Callable[[T], object] = bool,
    timeout: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
    what: str = "the condition",
    details: Callable[[], str] | None = None,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T: ...


@overload
async def eventually(
    probe: Callable[[], T],
    *,
    until: Callable[[T], object] = bool,
    timeout: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
    what: str = "the condition",
    details: Callable[[], str] | None = None,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T: ...


async def eventually(
    probe: Callable[[], object],
    *,
    until: Callable[[Any], object] = bool,
    timeout: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
    what: str = "the condition",
    details: Callable[[], str] | None = None,
    ignoring: tuple[type[BaseException], ...] = (),
) -> object:
    """Poll `probe` every `interval` s until its value passes `until`; return that value.

    An async probe that has not answered when the time is up (it gets at least one interval)
    fails the wait like a probe that never passed.
    """
    polls: _Polls[object] = _Polls(
        timeout=timeout,
        interval=interval,
        what=what,
        details=details,
        until=until,
        ignoring=ignoring,
    )
    while True:
        try:
            value = probe()
            if inspect.isawaitable(value):
                value = await _answer(value, within=max(polls.remaining(), interval))
        except _NoAnswer as exc:
            polls.refused(exc)
            raise polls.timed_out() from None
        except polls.retried as exc:
            polls.refused(exc)
        else:
            if polls.passes(value):
                return value
        pause = polls.pause()
        if pause is None:
            raise polls.timed_out() from polls.last_error
        await asyncio.sleep(pause)


def eventually_blocking(
    probe: Callable[[], T],
    *,
    until: Callable[[T], object] = bool,
    timeout: float = TIMEOUT_S,
    interval: float = INTERVAL_S,
    what: str = "the condition",
    details: Callable[[], str] | None = None,
    ignoring: tuple[type[BaseException], ...] = (),
) -> T:
    """`eventually` for synchronous code: sleeps the thread between polls.

    A probe that blocks is not interrupted: give it a timeout of its own.
    """
    polls: _Polls[T] = _Polls(
        timeout=timeout,
        interval=interval,
        what=what,
        details=details,
        until=until,
        ignoring=ignoring,
    )
    while True:
        try:
            value = probe()
        except polls.retried as exc:
            polls.refused(exc)
        else:
            if polls.passes(value):
                return value
        pause = polls.pause()
        if pause is None:
            raise polls.timed_out() from polls.last_error
        time.sleep(pause)
