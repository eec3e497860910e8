"""Exponential backoff with full jitter, bounded by tries and by time."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    base_s: float = 0.5
    cap_s: float = 30.0
    max_tries: int | None = None  # None: unbounded (a daemon's reconnect loop)
    max_total_s: float | None = None

    def delays(self, rng: random.Random | None = None) -> Iterator[float]:
        """Delays before each retry: uniform in [0, min(cap, base * 2**n)] (full jitter)."""
        rng = rng or random.Random()
        total = 0.0
        attempt = 0
        while self.max_tries is None or attempt < self.max_tries:
            delay = rng.uniform(0.0, min(self.cap_s, self.base_s * (2**attempt)))
            if self.max_total_s is not None and total + delay > self.max_total_s:
                return
            total += delay
            attempt += 1
            yield delay
