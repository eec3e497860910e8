"""Hierarchical placement, for planning: one aggregator per continent plus a global one.

Participants are grouped by the continent of their location. Each group gets a regional
aggregator on an offer in that continent (any allowed offer when the continent has none); the
regional aggregators exchange the model with one global aggregator. Per round::

    f_c(o, g) = max_{p in c} (2 t_xfer(S, r_{p,o}) + train_s) + t_agg(o, n_c) + 2 t_xfer(S, r_{o,g})
    t_round   = max_c f_c(o_c, g) + t_agg(g, k)

with k the number of groups, n_c the participants in group c, and t_xfer, t_agg as in
`model`. Each aggregator is billed like a single one (730 h per month, or the job's running
time), and pays egress for the models it sends: o_c to its n_c participants and to g, g to
the k regional aggregators, every round. Feasible: every participant within the max latency
of its regional aggregator, every regional aggregator within it of the global one, each
aggregator with the memory for its inputs, total cost within the max.

The space is the product of the groups' candidate lists and the global candidates: too large
to enumerate on a real catalog. Three searches:

- `exact`: a threshold sweep. For a global location l and a threshold T on max_c f_c, each
  group independently takes its cheapest candidate with f_c <= T (cost evaluated at round time
  T + t_agg(g)). Every Pareto-optimal point is weakly dominated by one such choice (prices are
  non-negative, so cost never falls as time rises), so sweeping T over the values f_c takes
  gives the exact front. Candidates dominated in (f_c, price, egress) are pruned first.
- `nsga2`: NSGA-II (pymoo) over the integer indices, keeping the archive of what it evaluated.
- `brute`: the product itself, for small instances: the oracle the other two are tested against.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from fedsky.controller.placement.catalog import Catalog, Offer
from fedsky.controller.placement.choice import choose
from fedsky.controller.placement.model import (
    DEFAULT_KRW_PER_USD,
    DEFAULT_PARAMS,
    HOURS_PER_MONTH,
    Currency,
    JobProfile,
    Limits,
    ModelParams,
    PlacementError,
    aggregation_s,
    currency_rate,
    memory_needed_gib,
    transfer_s,
)
from fedsky.controller.placement.placer import check_participants, participant_rtt
from fedsky.controller.placement.search import (
    NSGA2_SEED,
    archive_front,
    exact_front,
    nsga2_integer,
    pareto_mask,
)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

HierMethod = Literal["exact", "nsga2", "brute"]
BRUTE_LIMIT = 5_000_000  # combinations the brute-force oracle accepts
HIER_POP_SIZE = 80
HIER_GENERATIONS = 250
HIER_PATIENCE = 50


@dataclass(frozen=True)
class Layout:
    """One hierarchical placement: a regional aggregator per continent and a global one."""

    regional: tuple[tuple[str, Offer], ...]  # (continent, offer), by continent
    global_offer: Offer
    cost: float
    currency: Currency
    cost_usd: float
    round_time_s: float
    max_rtt_ms: float  # the largest RTT on any link of the layout
    feasible: bool

    @property
    def key(self) -> tuple[str, ...]:
        keys: list[str] = list(self.global_offer.key)
        for _, offer in self.regional:
            keys.extend(offer.key)
        return tuple(keys)

    def to_json(self) -> dict[str, Any]:
        def offer(o: Offer) -> dict[str, Any]:
            return {
                "cloud": o.cloud,
                "region": o.region,
                "instance_type": o.instance_type,
                "vcpus": o.vcpus,
                "memory_gib": o.memory_gib,
                "usd_per_hour": o.usd_per_hour,
            }

        return {
            "global": offer(self.global_offer),
            "regional": {cont: offer(o) for cont, o in self.regional},
            "cost": round(self.cost, 6),
            "currency": self.currency,
            "cost_usd": round(self.cost_usd, 6),
            "round_time_s": round(self.round_time_s, 6),
            "max_rtt_ms": round(self.max_rtt_ms, 6),
            "feasible": self.feasible,
        }


@dataclass(frozen=True, eq=False)
class HierarchicalResult:
    front: tuple[Layout, ...]
    choice: Layout | None
    groups: Mapping[str, tuple[str, ...]]  # continent -> participant names
    reason: str | None
    method: HierMethod
    space_size: int  # combinations in the search space
    evaluated: int  # combinations the method evaluated (exact: candidate points generated)
    objectives: FloatArray = field(repr=False)  # (front, 2) cost, time

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": self.method,
            "groups": {c: list(p) for c, p in self.groups.items()},
            "space_size": self.space_size,
            "front": [p.to_json() for p in self.front],
        }
        if self.choice is not None:
            out["choice"] = self.choice.to_json()
        else:
            out["reason"] = self.reason
        return out


@dataclass(frozen=True, eq=False)
class Instance:
    """The hierarchical search space for one job, with vectorised evaluation."""

    catalog: Catalog
    continents: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    cand: tuple[IntArray, ...]  # per group: candidate offer indices
    part_time: tuple[FloatArray, ...]  # per group: max_p (2 t_xfer + train) + t_agg(o, n_c)
    glob: IntArray  # global candidate offer indices
    glob_agg: FloatArray  # t_agg(g, k)
    link_s: FloatArray  # (L, L): 2 t_xfer between locations
    link_rtt: FloatArray  # (L, L): RTT between locations, inf unknown
    a: tuple[FloatArray, ...]  # per group: USD per second of round time
    b: tuple[FloatArray, ...]  # per group: USD fixed
    ga: FloatArray
    gb: FloatArray
    max_latency_ms: float
    max_cost_usd: float
    rate: float
    currency: Currency

    @property
    def space_size(self) -> int:
        return math.prod(len(c) for c in self.cand) * len(self.glob)

    def evaluate(self, x: IntArray) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
        """(cost in currency, round time, max link RTT, violation) per row of `x`.

        Row layout: one index into each group's candidates, then one into the global ones.
        """
        x = np.asarray(x, dtype=np.int64).reshape(-1, len(self.cand) + 1)
        g = self.glob[x[:, -1]]
        gloc = self.catalog.offer_location[g]
        time = np.zeros(x.shape[0])
        worst_rtt = np.zeros(x.shape[0])
        for c in range(len(self.cand)):
            o = self.cand[c][x[:, c]]
            oloc = self.catalog.offer_location[o]
            f = self.part_time[c][x[:, c]] + self.link_s[oloc, gloc]
            time = np.maximum(time, f)
            worst_rtt = np.maximum(worst_rtt, self.link_rtt[oloc, gloc])
        time = time + self.glob_agg[x[:, -1]]
        cost = self.ga[x[:, -1]] * time + self.gb[x[:, -1]]
        for c in range(len(self.cand)):
            cost = cost + self.a[c][x[:, c]] * time + self.b[c][x[:, c]]
        with np.errstate(invalid="ignore"):
            viol = np.maximum(
                np.where(np.isfinite(worst_rtt), worst_rtt / self.max_latency_ms - 1.0, 1e6),
                cost / self.max_cost_usd - 1.0,
            )
        return cost * self.rate, time, worst_rtt, viol


def build_instance(
    *,
    participants: Mapping[str, str],
    job: JobProfile,
    limits: Limits,
    catalog: Catalog,
    measured_rtt: Mapping[str, Mapping[str, float]] | None = None,
    clouds: Collection[str] | None = None,
    krw_per_usd: float = DEFAULT_KRW_PER_USD,
    params: ModelParams = DEFAULT_PARAMS,
) -> Instance | str:
    """The search space, or a reason why it is empty."""
    check_participants(participants, catalog, measured_rtt)
    rate = currency_rate(limits.max_cost.currency, krw_per_usd)
    basis = limits.max_cost.basis
    names = list(participants)
    by_cont: dict[str, list[int]] = {}
    for p, name in enumerate(names):
        cont = catalog.continent(participants[name])
        if cont is None:
            raise PlacementError(
                f"participant {name!r}: the continent of {participants[name]!r} is unknown: "
                "name it in the catalog's locations.csv"
            )
        by_cont.setdefault(cont, []).append(p)
    continents = tuple(sorted(by_cont))
    k = len(continents)
    rtt_all = participant_rtt(participants, catalog, measured_rtt)[:, catalog.offer_location]
    scope = (
        np.ones(len(catalog), dtype=np.bool_)
        if clouds is None
        else np.fromiter(
            (o.cloud in clouds for o in catalog.offers), dtype=np.bool_, count=len(catalog)
        )
    )
    offer_cont = [catalog.continent(o.location) for o in catalog.offers]
    s = job.model_mb

    def billing(idx: IntArray, receivers: int) -> tuple[FloatArray, FloatArray]:
        price = catalog.usd_per_hour[idx]
        egress = job.rounds * receivers * s / 1000.0 * catalog.egress_usd_per_gb[idx]
        if basis == "month":
            return np.zeros(idx.shape[0]), price * HOURS_PER_MONTH + egress
        return price * job.rounds / 3600.0, egress

    cand: list[IntArray] = []
    part_time: list[FloatArray] = []
    a: list[FloatArray] = []
    b: list[FloatArray] = []
    for cont in continents:
        members = by_cont[cont]
        need = memory_needed_gib(s, len(members), params)
        here = scope & np.array([oc == cont for oc in offer_cont], dtype=np.bool_)
        if not here.any():
            here = scope.copy()  # no offer on this continent: any allowed offer may serve it
        rtt = rtt_all[members]
        ok = here & (catalog.memory_gib >= need) & np.all(rtt <= limits.max_latency_ms, axis=0)
        idx = np.flatnonzero(ok).astype(np.int64)
        if idx.size == 0:
            return (
                f"no offer can serve the participants in {cont} ({', '.join(names[m] for m in members)}): "
                f"none within {limits.max_latency_ms:g} ms of all of them with {need:.1f} GiB of memory"
            )
        leg = transfer_s(s, rtt[:, idx], params)
        pt = np.max(2.0 * leg + job.train_s, axis=0) + aggregation_s(
            s, len(members), catalog.vcpus[idx], params
        )
        ca, cb = billing(idx, len(members) + 1)
        cand.append(idx)
        part_time.append(pt)
        a.append(ca)
        b.append(cb)
    gneed = memory_needed_gib(s, k, params)
    glob = np.flatnonzero(scope & (catalog.memory_gib >= gneed)).astype(np.int64)
    if glob.size == 0:
        return f"no offer has the {gneed:.1f} GiB of memory the global aggregator needs"
    ga, gb = billing(glob, k)
    link_rtt = np.where(np.isnan(catalog.rtt_ms), np.inf, catalog.rtt_ms)
    link_s = 2.0 * transfer_s(s, link_rtt, params)
    return Instance(
        catalog=catalog,
        continents=continents,
        groups=tuple(tuple(names[m] for m in by_cont[c]) for c in continents),
        cand=tuple(cand),
        part_time=tuple(part_time),
        glob=glob,
        glob_agg=aggregation_s(s, k, catalog.vcpus[glob], params),
        link_s=link_s,
        link_rtt=link_rtt,
        a=tuple(a),
        b=tuple(b),
        ga=ga,
        gb=gb,
        max_latency_ms=limits.max_latency_ms,
        max_cost_usd=limits.max_cost.amount / rate,
        rate=rate,
        currency=limits.max_cost.currency,
    )


# --- searches: each returns decision rows whose objectives include the whole feasible front ----


def _prune(f: FloatArray, a: FloatArray, b: FloatArray) -> IntArray:
    """Indices not dominated in (f, a, b); of exact duplicates the first is kept."""
    le = (f[None, :] <= f[:, None]) & (a[None, :] <= a[:, None]) & (b[None, :] <= b[:, None])
    lt = (f[None, :] < f[:, None]) | (a[None, :] < a[:, None]) | (b[None, :] < b[:, None])
    n = f.shape[0]
    earlier_equal = le & ~lt & (np.arange(n)[None, :] < np.arange(n)[:, None])
    dominated = np.any(le & lt, axis=1) | np.any(earlier_equal, axis=1)
    return np.flatnonzero(~dominated).astype(np.int64)


def sweep_rows(inst: Instance) -> IntArray:
    """The threshold sweep (see the module docstring): rows covering the exact front."""
    cat = inst.catalog
    gloc_all = cat.offer_location[inst.glob]
    rows: list[IntArray] = []
    for loc in np.unique(gloc_all):
        gsel = np.flatnonzero(gloc_all == loc)
        per_group: list[tuple[IntArray, FloatArray]] = []
        for c in range(len(inst.cand)):
            oloc = cat.offer_location[inst.cand[c]]
            ok = inst.link_rtt[oloc, loc] <= inst.max_latency_ms
            idx = np.flatnonzero(ok)
            if idx.size == 0:
                break
            f = inst.part_time[c][idx] + inst.link_s[oloc[idx], loc]
            keep = _prune(f, inst.a[c][idx], inst.b[c][idx])
            per_group.append((idx[keep], f[keep]))
        else:
            floor = max(float(f.min()) for _, f in per_group)
            thresholds = np.unique(np.concatenate([f for _, f in per_group]))
            thresholds = thresholds[thresholds >= floor]
            # round time at each (threshold, global offer)
            t = thresholds[:, None] + inst.glob_agg[gsel][None, :]
            chosen = []
            for c, (idx, f) in enumerate(per_group):
                cost = inst.a[c][idx][None, None, :] * t[:, :, None] + inst.b[c][idx][None, None, :]
                cost = np.where(f[None, None, :] <= thresholds[:, None, None], cost, np.inf)
                chosen.append(idx[np.argmin(cost, axis=2)])  # (thresholds, globals)
            grid = np.stack([*chosen, np.broadcast_to(gsel[None, :], t.shape)], axis=-1).reshape(
                -1, len(per_group) + 1
            )
            cost_v, time_v, _, _ = inst.evaluate(grid)
            rows.append(grid[pareto_mask(cost_v, time_v)])
    if not rows:
        return np.zeros((0, len(inst.cand) + 1), dtype=np.int64)
    return np.unique(np.concatenate(rows), axis=0)


def brute_rows(inst: Instance) -> IntArray:
    """Every combination (small instances only)."""
    if inst.space_size > BRUTE_LIMIT:
        raise PlacementError(
            f"brute force over {inst.space_size:,} combinations is more than {BRUTE_LIMIT:,}: use exact"
        )
    sizes = [len(c) for c in inst.cand] + [len(inst.glob)]
    grids = np.meshgrid(*[np.arange(n) for n in sizes], indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1).astype(np.int64)


def place_hierarchical(
    *,
    participants: Mapping[str, str],
    job: JobProfile,
    limits: Limits,
    catalog: Catalog,
    measured_rtt: Mapping[str, Mapping[str, float]] | None = None,
    clouds: Collection[str] | None = None,
    method: HierMethod = "exact",
    krw_per_usd: float = DEFAULT_KRW_PER_USD,
    params: ModelParams = DEFAULT_PARAMS,
    seed: int = NSGA2_SEED,
    pop_size: int = HIER_POP_SIZE,
    generations: int = HIER_GENERATIONS,
    patience: int = HIER_PATIENCE,
) -> HierarchicalResult:
    """The front of hierarchical layouts for a job and one choice on it (see module docstring)."""
    if method not in ("exact", "nsga2", "brute"):
        raise PlacementError(f"method {method!r} is not one of exact, nsga2, brute")
    inst = build_instance(
        participants=participants,
        job=job,
        limits=limits,
        catalog=catalog,
        measured_rtt=measured_rtt,
        clouds=clouds,
        krw_per_usd=krw_per_usd,
        params=params,
    )
    if isinstance(inst, str):
        return HierarchicalResult((), None, {}, inst, method, 0, 0, np.zeros((0, 2)))
    if method == "nsga2":
        upper = np.array([len(c) - 1 for c in inst.cand] + [len(inst.glob) - 1], dtype=np.int64)

        def objectives(x: IntArray) -> tuple[FloatArray, FloatArray, FloatArray]:
            cost, time, _, viol = inst.evaluate(x)
            return cost, time, viol

        rows, vals = nsga2_integer(
            upper=upper,
            evaluate=objectives,
            pop_size=pop_size,
            generations=generations,
            seed=seed,
            patience=patience,
        )
        evaluated = rows.shape[0]
        rows = rows[archive_front(vals)]
    else:
        rows = sweep_rows(inst) if method == "exact" else brute_rows(inst)
        evaluated = rows.shape[0]
    cost, time, worst, viol = inst.evaluate(rows)
    front_idx = exact_front(cost, time, viol <= 0)
    layouts = tuple(
        Layout(
            regional=tuple(
                (inst.continents[c], catalog.offers[int(inst.cand[c][rows[i, c]])])
                for c in range(len(inst.cand))
            ),
            global_offer=catalog.offers[int(inst.glob[rows[i, -1]])],
            cost=float(cost[i]),
            currency=inst.currency,
            cost_usd=float(cost[i] / inst.rate),
            round_time_s=float(time[i]),
            max_rtt_ms=float(worst[i]),
            feasible=True,
        )
        for i in front_idx
    )
    groups = dict(zip(inst.continents, inst.groups, strict=True))
    if not layouts:
        reason = (
            f"no hierarchical layout meets max latency {limits.max_latency_ms:g} ms between "
            f"aggregators and max cost {limits.max_cost}"
        )
        return HierarchicalResult(
            (), None, groups, reason, method, inst.space_size, evaluated, np.zeros((0, 2))
        )
    k = choose(
        [p.cost for p in layouts],
        [p.round_time_s for p in layouts],
        [p.key for p in layouts],
        limits.cost_weight,
    )
    return HierarchicalResult(
        front=layouts,
        choice=layouts[k],
        groups=groups,
        reason=None,
        method=method,
        space_size=inst.space_size,
        evaluated=evaluated,
        objectives=np.column_stack([cost[front_idx], time[front_idx]]),
    )


__all__ = [
    "HierarchicalResult",
    "Instance",
    "Layout",
    "brute_rows",
    "build_instance",
    "place_hierarchical",
    "sweep_rows",
]
