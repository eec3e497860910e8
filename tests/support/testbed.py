"""Starting the testbed tests on a clean slate."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def clear_testbed_leftovers(prefix: str) -> None:
    """Remove what dead runs left (their journals' namespaces and blackholes) and any namespace
    named with `prefix`, before a test builds its testbed.

    A run killed outright (SIGKILL, a machine's time limit) cannot take its testbed down; on a
    machine that starts the same steps the same way the next run's pid, and so its prefix, is
    often the same, and the testbed would rightly refuse to build over them. A live run of
    another process is left alone (`find_leftovers`)."""
    from benchmarks.testbed.netns import cleanup

    removed = cleanup(prefix=prefix)
    if removed:
        log.warning("removed testbed leftovers of an earlier run: %s", removed.describe())
