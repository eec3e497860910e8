"""What the cloud providers (`aws`, `gcp`) share: names, allowed sources, waiting."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from fedsky.controller.clouds.base import ProviderError

T = TypeVar("T")

# Cloud resource names are "fedsky-agg-<job id>": GCE names allow 63 characters, must start with
# a letter and end with a letter or digit; labels allow lower-case letters, digits and '-'.
_JOB_ID_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,50}[a-z0-9])?$")
RESOURCE_PREFIX = "fedsky-agg-"


def check_job_id(job_id: str) -> str:
    if not _JOB_ID_RE.fullmatch(job_id):
        raise ProviderError(
            f"job id {job_id!r} cannot name cloud resources: use 1-52 characters from a-z, 0-9 and '-', "
            "not starting or ending with '-'"
        )
    return job_id


def resource_name(job_id: str) -> str:
    return f"{RESOURCE_PREFIX}{job_id}"


def check_sources(sources: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """The CIDRs allowed to reach the SuperLink; never empty and never the whole internet."""
    if not sources:
        raise ProviderError(
            "no allowed sources for the aggregator: list the job's sites and the controller "
            "(AggregatorSpec.allowed_sources)"
        )
    networks = []
    for source in sources:
        try:
            network = ipaddress.ip_network(source.strip(), strict=False)
        except ValueError:
            raise ProviderError(f"allowed source {source!r} is not an address or CIDR") from None
        if network.prefixlen == 0:
            raise ProviderError(
                f"allowed source {source!r} would open the SuperLink to the whole internet; "
                "list the job's sites and the controller instead"
            )
        networks.append(network)
    return sorted(set(networks), key=lambda n: (n.version, str(n)))


async def wait_until(
    check: Callable[[], Awaitable[T | None]], *, timeout_s: float, interval_s: float, what: str
) -> T:
    """Poll `check` until it returns a value (not None); ProviderError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            raise ProviderError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(interval_s)


async def wait_superlink_answers(
    *,
    health_check: Callable[[str], Awaitable[bool]],
    address: str,
    timeout_s: float,
    interval_s: float,
    ref: str,
    console_hint: str,
) -> None:
    """Wait until the aggregator VM's SuperLink answers at `address`; `console_hint` tells the
    operator where the VM's start-up log is when it does not."""

    async def answers() -> bool | None:
        return True if await health_check(address) else None

    await wait_until(
        answers,
        timeout_s=timeout_s,
        interval_s=interval_s,
        what=f"the SuperLink of {ref} to answer on {address} (see `{console_hint}`)",
    )
