"""Process groups: fedsky's children (SuperLinks, SuperNodes) each lead their own."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path


def group_alive(pgid: int) -> bool:
    """Whether any member of process group `pgid` still runs (zombies count as gone)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


async def wait_group_gone(pgid: int, *, timeout_s: float = 5.0) -> bool:
    """After a SIGKILL, wait until the group's members are gone; False if some outlive it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await asyncio.to_thread(group_alive, pgid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.05)
    return True
