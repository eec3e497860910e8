"""One choice from the feasible front, and why nothing is feasible when nothing is.

The choice minimises `w * cost_norm + (1 - w) * time_norm`, both min-max normalised over the
feasible front (a one-point front normalises to 0), `w` the cost weight: the original study's
cost:latency 9:1 is w = 0.9. Scores within `SCORE_TIE` of the best are ties; ties go to the
lower cost, then the lower round time, then cloud, region and instance type in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Scores are in [0, 1]; two that differ by less than this differ only by float rounding.
SCORE_TIE = 1e-12
CLOSEST = 3  # offers named in an infeasibility reason


def normalise(values: FloatArray) -> FloatArray:
    """Min-max normalise to [0, 1]; all-equal values give 0."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return v
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros_like(v)
    out: FloatArray = (v - lo) / (hi - lo)
    return out


def scores(cost: FloatArray, time: FloatArray, weight: float) -> FloatArray:
    out: FloatArray = weight * normalise(cost) + (1.0 - weight) * normalise(time)
    return out


def choose(
    cost: Sequence[float] | FloatArray,
    time: Sequence[float] | FloatArray,
    keys: Sequence[tuple[str, ...]],
    weight: float,
) -> int:
    """Index of the chosen point among the (feasible front) points given."""
    c = np.asarray(cost, dtype=np.float64)
    t = np.asarray(time, dtype=np.float64)
    if c.size == 0:
        raise ValueError("choose() needs at least one point")
    s = scores(c, t, weight)
    tied = np.flatnonzero(s <= s.min() + SCORE_TIE)
    best = min((int(i) for i in tied), key=lambda i: (c[i], t[i], keys[i]))
    return int(best)


@dataclass(frozen=True)
class Infeasibility:
    """Why no candidate is feasible: the limits that bind, a message, the closest candidates."""

    binding: tuple[str, ...]  # among max_cost, max_latency, memory, rtt_unknown, clouds
    message: str
    closest: tuple[int, ...]  # candidate indices, closest first


def explain(
    *,
    labels: Sequence[str],
    locations: Sequence[str],
    cost: FloatArray,
    max_rtt: FloatArray,
    farthest: Sequence[str],
    mem_ok: BoolArray,
    mem_needed_gib: float,
    memory_gib: FloatArray,
    max_cost: float,
    max_cost_text: str,
    max_latency_ms: float,
    currency: str,
    basis: str,
) -> Infeasibility:
    """Explain an empty feasible set over candidates described by the arrays given.

    `labels[i]` names candidate i for people, `locations[i]` is its `cloud:region`,
    `farthest[i]` the participant it is farthest from. When latency binds, the closest offers
    are the cheapest in each of the nearest locations (a bigger size there is no nearer). The first limit that leaves nothing, in the order memory, latency, cost, binds;
    when latency and cost each leave something but not together, cost binds within latency.
    """
    n = len(labels)
    cost = np.asarray(cost, dtype=np.float64)
    max_rtt = np.asarray(max_rtt, dtype=np.float64)

    def fmt_cost(v: float) -> str:
        return (
            f"{v:,.0f} {currency}/{basis}" if currency == "KRW" else f"{v:,.2f} {currency}/{basis}"
        )

    def name(i: int, *, rtt: bool = True, price: bool = True) -> str:
        parts = []
        if rtt:
            shown = "unknown" if not np.isfinite(max_rtt[i]) else f"{max_rtt[i]:.0f} ms"
            parts.append(f"max RTT {shown} (to {farthest[i]})")
        if price:
            parts.append(fmt_cost(float(cost[i])))
        return f"{labels[i]}: {', '.join(parts)}"

    def top(order: IntArray) -> tuple[int, ...]:
        return tuple(int(i) for i in order[:CLOSEST])

    if n == 0:
        return Infeasibility(
            ("clouds",), "no offers to place on: the catalog has none on the clouds allowed", ()
        )
    if not mem_ok.any():
        order = np.lexsort((cost, -np.asarray(memory_gib)))
        return Infeasibility(
            ("memory",),
            f"no offer has the {mem_needed_gib:.1f} GiB of memory the aggregation needs; the largest: "
            + "; ".join(f"{labels[i]} ({memory_gib[i]:g} GiB)" for i in top(order)),
            top(order),
        )
    known = np.isfinite(max_rtt)
    if not (known & mem_ok).any():
        return Infeasibility(
            ("rtt_unknown",),
            "no offer has a known RTT to every participant: add the participants' locations to "
            "the catalog's rtt.csv or measure them",
            (),
        )
    lat_ok = known & (max_rtt <= max_latency_ms) & mem_ok
    cost_ok = (cost <= max_cost) & mem_ok
    pool = np.flatnonzero(mem_ok & known)
    if not lat_ok.any():
        nearest: dict[str, int] = {}  # location -> its cheapest offer, nearest locations first
        for i in pool[np.lexsort((cost[pool], max_rtt[pool]))]:
            nearest.setdefault(locations[int(i)], int(i))
        order = np.fromiter(nearest.values(), dtype=np.int64)
        lowest = float(max_rtt[order[0]])
        msg = (
            f"max latency {max_latency_ms:g} ms binds: no offer is within it of every participant "
            f"(the lowest maximum RTT is {lowest:.0f} ms)"
        )
        binding: tuple[str, ...] = ("max_latency",)
        if not cost_ok.any():
            binding = ("max_latency", "max_cost")
            msg += f", and no offer costs {max_cost_text} or less"
        return Infeasibility(
            binding, msg + ". Closest: " + "; ".join(name(i) for i in top(order)), top(order)
        )
    within = np.flatnonzero(lat_ok)
    order = within[np.lexsort((max_rtt[within], cost[within]))]
    msg = (
        f"max cost {max_cost_text} binds: the cheapest offer within {max_latency_ms:g} ms of every "
        f"participant costs {fmt_cost(float(cost[order[0]]))}"
    )
    if cost_ok.any():
        affordable = pool[cost_ok[pool]]
        best = affordable[np.argmin(max_rtt[affordable])]
        msg += f" (offers within the cost are at least {max_rtt[best]:.0f} ms from a participant)"
    return Infeasibility(
        ("max_cost",), msg + ". Closest: " + "; ".join(name(i) for i in top(order)), top(order)
    )
