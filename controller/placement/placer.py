"""Place one aggregator: evaluate every offer, take the feasible front, choose one point.

`place` is a plain function over plain data: the controller calls it when a job is placed and
`fedctl place` calls it from the command line.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from fedsky.controller.placement.catalog import Catalog, Offer
from fedsky.controller.placement.choice import Infeasibility, choose, explain
from fedsky.controller.placement.defaults import BASELINE_OFFER, METHODS, Method
from fedsky.controller.placement.model import (
    DEFAULT_KRW_PER_USD,
    DEFAULT_PARAMS,
    Currency,
    JobProfile,
    Limits,
    ModelParams,
    PlacementError,
    currency_rate,
    egress_usd,
    hours,
    memory_needed_gib,
    round_time_s,
)
from fedsky.controller.placement.search import (
    NSGA2_GENERATIONS,
    NSGA2_POP_SIZE,
    NSGA2_SEED,
    archive_front,
    exact_front,
    nsga2_integer,
)
from fedsky.shared.ids import InvalidIdError, check_location

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


# What an operator does without the tool: AWS's default region and a general-purpose
# 4 vCPU / 16 GiB instance, on demand.
BASELINE = BASELINE_OFFER


def _num(value: float) -> float | None:
    """JSON has no infinity: an unknown figure is null."""
    return round(value, 6) if math.isfinite(value) else None


@dataclass(frozen=True)
class Point:
    """One offer evaluated for one job."""

    offer: Offer
    cost: float  # in `currency`, per the limit's basis (month or job)
    currency: Currency
    cost_usd: float
    egress_usd: float
    round_time_s: float
    max_rtt_ms: float
    farthest: str  # the participant with the largest RTT
    memory_needed_gib: float
    feasible: bool
    violations: tuple[str, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        return self.offer.key

    @property
    def label(self) -> str:
        return f"{self.offer.location} {self.offer.instance_type}"

    def to_json(self) -> dict[str, Any]:
        o = self.offer
        return {
            "cloud": o.cloud,
            "region": o.region,
            "instance_type": o.instance_type,
            "vcpus": o.vcpus,
            "memory_gib": o.memory_gib,
            "usd_per_hour": o.usd_per_hour,
            "egress_usd_per_gb": o.egress_usd_per_gb,
            "cost": _num(self.cost),
            "currency": self.currency,
            "cost_usd": _num(self.cost_usd),
            "egress_usd": _num(self.egress_usd),
            "round_time_s": _num(self.round_time_s),
            "max_rtt_ms": _num(self.max_rtt_ms),
            "farthest_participant": self.farthest,
            "memory_needed_gib": round(self.memory_needed_gib, 3),
            "feasible": self.feasible,
            "violations": list(self.violations),
        }


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Every offer of the catalog evaluated for one job (arrays indexed like catalog.offers)."""

    catalog: Catalog
    participants: tuple[str, ...]
    rtt_ms: FloatArray  # (participants, offers), inf where unknown
    cost: FloatArray
    cost_usd: FloatArray
    egress_usd: FloatArray
    round_time_s: FloatArray
    max_rtt_ms: FloatArray
    farthest: IntArray  # index into participants
    memory_needed_gib: float
    in_scope: BoolArray  # the offer is on an allowed cloud
    rtt_known: BoolArray
    mem_ok: BoolArray
    lat_ok: BoolArray
    cost_ok: BoolArray
    currency: Currency

    @functools.cached_property
    def feasible(self) -> BoolArray:
        out: BoolArray = self.in_scope & self.rtt_known & self.mem_ok & self.lat_ok & self.cost_ok
        return out

    def point(self, i: int) -> Point:
        violations = tuple(
            name
            for name, ok in (
                ("rtt_unknown", self.rtt_known[i]),
                ("memory", self.mem_ok[i]),
                ("max_latency", self.lat_ok[i]),
                ("max_cost", self.cost_ok[i]),
                ("cloud_not_allowed", self.in_scope[i]),
            )
            if not ok
        )
        return Point(
            offer=self.catalog.offers[i],
            cost=float(self.cost[i]),
            currency=self.currency,
            cost_usd=float(self.cost_usd[i]),
            egress_usd=float(self.egress_usd[i]),
            round_time_s=float(self.round_time_s[i]),
            max_rtt_ms=float(self.max_rtt_ms[i]),
            farthest=self.participants[int(self.farthest[i])],
            memory_needed_gib=self.memory_needed_gib,
            feasible=not violations,
            violations=violations,
        )


@dataclass(frozen=True, eq=False)
class PlacementResult:
    """The feasible front, the choice on it, the baseline and (lazily) every candidate."""

    front: tuple[Point, ...]
    choice: Point | None
    baseline: Point | None
    reason: str | None
    binding: tuple[str, ...]
    closest: tuple[Point, ...]
    method: Method
    participants: Mapping[str, str]
    job: JobProfile
    limits: Limits
    krw_per_usd: float
    evaluation: Evaluation = field(repr=False)

    @functools.cached_property
    def candidates(self) -> tuple[Point, ...]:
        """Every offer evaluated on the allowed clouds, feasible or not, in catalog order."""
        ev = self.evaluation
        return tuple(ev.point(int(i)) for i in np.flatnonzero(ev.in_scope))

    @property
    def feasible(self) -> bool:
        return self.choice is not None

    def change_vs_baseline(self, point: Point) -> tuple[float, float] | None:
        """(cost change %, round-time change %) of `point` against the baseline."""
        b = self.baseline
        if b is None or not (b.cost > 0 and b.round_time_s > 0 and math.isfinite(b.round_time_s)):
            return None
        return (
            100.0 * (point.cost - b.cost) / b.cost,
            100.0 * (point.round_time_s - b.round_time_s) / b.round_time_s,
        )

    def to_json(self, *, include_candidates: bool = False) -> dict[str, Any]:
        limit = self.limits.max_cost
        out: dict[str, Any] = {
            "method": self.method,
            "currency": limit.currency,
            "basis": limit.basis,
            "krw_per_usd": self.krw_per_usd,
            "participants": dict(self.participants),
            "job": {
                "model_mb": self.job.model_mb,
                "rounds": self.job.rounds,
                "train_s": self.job.train_s,
                "eval_s": self.job.evaluation_s,
            },
            "limits": {
                "max_cost": limit.amount,
                "currency": limit.currency,
                "basis": limit.basis,
                "max_latency_ms": self.limits.max_latency_ms,
                "cost_weight": self.limits.cost_weight,
            },
            "front": [p.to_json() for p in self.front],
            "baseline": None if self.baseline is None else self.baseline.to_json(),
        }
        if self.choice is not None:
            choice = self.choice.to_json()
            change = self.change_vs_baseline(self.choice)
            if change is not None:
                choice["cost_change_pct"] = round(change[0], 2)
                choice["round_time_change_pct"] = round(change[1], 2)
            out["choice"] = choice
        else:
            out["reason"] = self.reason
            out["binding"] = list(self.binding)
            out["closest"] = [p.to_json() for p in self.closest]
        if include_candidates:
            out["candidates"] = [p.to_json() for p in self.candidates]
        return out


def check_participants(
    participants: Mapping[str, str],
    catalog: Catalog,
    measured_rtt: Mapping[str, Mapping[str, float]] | None,
) -> None:
    """Raise PlacementError for no participants, bad locations or ones nothing knows an RTT for."""
    if not participants:
        raise PlacementError("no participants: give at least one NAME=cloud:region")
    for name, loc in participants.items():
        if not name:
            raise PlacementError("a participant has an empty name")
        try:
            check_location(loc)
        except InvalidIdError as exc:
            raise PlacementError(f"participant {name!r}: {exc}") from None
        measured = (measured_rtt or {}).get(name) or {}
        if loc not in catalog.location_index and not measured:
            raise PlacementError(
                f"participant {name!r}: unknown location {loc!r}: the catalog ({catalog.source}) "
                f"has no RTT from it and none was measured; known locations include "
                f"{', '.join(catalog.locations[:6])}, ..."
            )
    for name, row in (measured_rtt or {}).items():
        for loc, value in row.items():
            if not (math.isfinite(value) and value > 0):
                raise PlacementError(
                    f"measured RTT of {name!r} to {loc!r} must be > 0 ms, got {value}"
                )


def participant_rtt(
    participants: Mapping[str, str],
    catalog: Catalog,
    measured_rtt: Mapping[str, Mapping[str, float]] | None,
) -> FloatArray:
    """(participants, locations) RTT in ms, measured figures replacing the table's; inf unknown."""
    names = list(participants)
    out = np.full((len(names), len(catalog.locations)), np.inf)
    for p, name in enumerate(names):
        i = catalog.location_index.get(participants[name])
        if i is not None:
            out[p] = np.where(np.isnan(catalog.rtt_ms[i]), np.inf, catalog.rtt_ms[i])
        for loc, value in ((measured_rtt or {}).get(name) or {}).items():
            j = catalog.location_index.get(loc)
            if j is not None:  # a measurement to a region the catalog has no offer in is moot
                out[p, j] = float(value)
    return out


def evaluate(
    *,
    participants: Mapping[str, str],
    job: JobProfile,
    limits: Limits,
    catalog: Catalog,
    measured_rtt: Mapping[str, Mapping[str, float]] | None = None,
    clouds: Collection[str] | None = None,
    krw_per_usd: float = DEFAULT_KRW_PER_USD,
    params: ModelParams = DEFAULT_PARAMS,
) -> Evaluation:
    """Round time, cost and feasibility of every offer in the catalog for this job."""
    check_participants(participants, catalog, measured_rtt)
    rate = currency_rate(limits.max_cost.currency, krw_per_usd)
    names = tuple(participants)
    n = len(names)
    rtt = participant_rtt(participants, catalog, measured_rtt)[:, catalog.offer_location]
    time = round_time_s(job, rtt, catalog.vcpus, params)
    egress = egress_usd(job, n, catalog.egress_usd_per_gb)
    cost_usd = catalog.usd_per_hour * hours(job, limits.max_cost.basis, time) + egress
    cost = cost_usd * rate
    max_rtt = rtt.max(axis=0)
    need = memory_needed_gib(job.model_mb, n, params)
    in_scope = (
        np.ones(len(catalog), dtype=np.bool_)
        if clouds is None
        else np.fromiter(
            (o.cloud in clouds for o in catalog.offers), dtype=np.bool_, count=len(catalog)
        )
    )
    known = np.isfinite(max_rtt)
    return Evaluation(
        catalog=catalog,
        participants=names,
        rtt_ms=rtt,
        cost=cost,
        cost_usd=cost_usd,
        egress_usd=egress,
        round_time_s=time,
        max_rtt_ms=max_rtt,
        farthest=np.argmax(rtt, axis=0).astype(np.int64),
        memory_needed_gib=need,
        in_scope=in_scope,
        rtt_known=known,
        mem_ok=catalog.memory_gib >= need,
        lat_ok=known & (max_rtt <= limits.max_latency_ms),
        cost_ok=np.isfinite(cost) & (cost <= limits.max_cost.amount),
        currency=limits.max_cost.currency,
    )


def _violation(ev: Evaluation, limits: Limits) -> FloatArray:
    """NSGA-II's constraint value per offer: <= 0 feasible, else the largest relative excess."""
    big = 1e6
    with np.errstate(invalid="ignore"):
        lat = np.where(ev.rtt_known, ev.max_rtt_ms / limits.max_latency_ms - 1.0, big)
        cost = np.where(np.isfinite(ev.cost), ev.cost / limits.max_cost.amount - 1.0, big)
        mem = ev.memory_needed_gib / ev.catalog.memory_gib - 1.0
    v = np.maximum(np.maximum(lat, cost), mem)
    out: FloatArray = np.where(ev.in_scope, v, big)
    return out


def place(
    *,
    participants: Mapping[str, str],
    job: JobProfile,
    limits: Limits,
    catalog: Catalog,
    measured_rtt: Mapping[str, Mapping[str, float]] | None = None,
    clouds: Collection[str] | None = None,
    method: Method = "exact",
    krw_per_usd: float = DEFAULT_KRW_PER_USD,
    params: ModelParams = DEFAULT_PARAMS,
    seed: int = NSGA2_SEED,
    baseline_offer: tuple[str, str, str] = BASELINE_OFFER,
    offer: tuple[str, str, str] | None = None,
) -> PlacementResult:
    """Place one aggregator for a job.

    participants: name -> `cloud:region` (the region nearest the participant).
    measured_rtt: name -> {`cloud:region`: ms} measured by the participant's agent; a
        measurement replaces the catalog's figure for that pair.
    clouds: only offers on these clouds are candidates (None: every cloud in the catalog).
    method: "exact" enumerates the front; "nsga2" runs NSGA-II (pymoo) over the same space.
    baseline_offer: (cloud, region, instance type) every choice is compared with.
    offer: (cloud, region, instance type) the job runs on instead of the search's choice; it
        must be in the catalog, on an allowed cloud and within the limits (PlacementError).

    Raises PlacementError for unusable inputs. An infeasible job is not an error: the result
    has an empty front, no choice and a `reason`.
    """
    if method not in METHODS:
        raise PlacementError(f"method {method!r} is not one of {', '.join(METHODS)}")
    ev = evaluate(
        participants=participants,
        job=job,
        limits=limits,
        catalog=catalog,
        measured_rtt=measured_rtt,
        clouds=clouds,
        krw_per_usd=krw_per_usd,
        params=params,
    )
    if method == "exact":
        front_idx = exact_front(ev.cost, ev.round_time_s, ev.feasible)
    else:
        violation = _violation(ev, limits)

        def objectives(x: IntArray) -> tuple[FloatArray, FloatArray, FloatArray]:
            i = x[:, 0]
            return ev.cost[i], ev.round_time_s[i], violation[i]

        keys, vals = nsga2_integer(
            upper=np.array([len(catalog) - 1]),
            evaluate=objectives,
            pop_size=NSGA2_POP_SIZE,
            generations=NSGA2_GENERATIONS,
            seed=seed,
        )
        found = keys[archive_front(vals), 0]
        front_idx = found[np.lexsort((found, ev.round_time_s[found], ev.cost[found]))]
    front = tuple(ev.point(int(i)) for i in front_idx)

    b = catalog.find(*baseline_offer)
    baseline = ev.point(b) if b is not None else None
    choice: Point | None = None
    reason: str | None = None
    binding: tuple[str, ...] = ()
    closest: tuple[Point, ...] = ()
    if offer is not None:
        choice = _pinned(ev, offer, clouds)
    elif front:
        k = choose(
            [p.cost for p in front],
            [p.round_time_s for p in front],
            [p.key for p in front],
            limits.cost_weight,
        )
        choice = front[k]
    else:
        why = _explain(ev, limits)
        reason, binding = why.message, why.binding
        scope = np.flatnonzero(ev.in_scope)
        closest = tuple(ev.point(int(scope[i])) for i in why.closest)
    return PlacementResult(
        front=front,
        choice=choice,
        baseline=baseline,
        reason=reason,
        binding=binding,
        closest=closest,
        method=method,
        participants=dict(participants),
        job=job,
        limits=limits,
        krw_per_usd=krw_per_usd,
        evaluation=ev,
    )


def _pinned(ev: Evaluation, offer: tuple[str, str, str], clouds: Collection[str] | None) -> Point:
    """The job's own offer, evaluated as any candidate; refused unless it could be chosen."""
    label = ":".join(offer)
    i = ev.catalog.find(*offer)
    if i is None:
        raise PlacementError(f"offer {label} is not in the catalog")
    if not ev.in_scope[i]:
        allowed = ", ".join(sorted(clouds or ())) or "none"
        raise PlacementError(f"offer {label} is not on a cloud the job may use ({allowed})")
    point = ev.point(i)
    if not point.feasible:
        raise PlacementError(
            f"offer {label} breaks the job's limits: {'; '.join(point.violations)}"
        )
    return point


def _explain(ev: Evaluation, limits: Limits) -> Infeasibility:
    scope = np.flatnonzero(ev.in_scope)
    offers = ev.catalog.offers
    return explain(
        labels=[f"{offers[i].location} {offers[i].instance_type}" for i in scope],
        locations=[offers[i].location for i in scope],
        cost=ev.cost[scope],
        max_rtt=ev.max_rtt_ms[scope],
        farthest=[ev.participants[int(ev.farthest[i])] for i in scope],
        mem_ok=ev.mem_ok[scope],
        mem_needed_gib=ev.memory_needed_gib,
        memory_gib=ev.catalog.memory_gib[scope],
        max_cost=limits.max_cost.amount,
        max_cost_text=str(limits.max_cost),
        max_latency_ms=limits.max_latency_ms,
        currency=limits.max_cost.currency,
        basis=limits.max_cost.basis,
    )
