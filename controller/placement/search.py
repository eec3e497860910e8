"""Pareto fronts of (cost, round time): exact enumeration, NSGA-II, and their hypervolume.

Both objectives are minimised. A point is on the front when no other point is at least as
good in both and better in one; points with equal objectives are all kept (none dominates
the others).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

LOG = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# What NSGA-II runs with unless told otherwise (see docs/placement.md, "NSGA-II").
NSGA2_POP_SIZE = 64
NSGA2_GENERATIONS = 60
NSGA2_SEED = 1
NSGA2_PATIENCE = 25  # generations without a change to the archive's front before stopping
NSGA2_MATING_TRIES = 5


def pareto_mask(cost: FloatArray, time: FloatArray) -> BoolArray:
    """True where (cost, time) is non-dominated among all the given points. O(n log n)."""
    cost = np.asarray(cost, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    n = cost.shape[0]
    mask = np.zeros(n, dtype=np.bool_)
    if n == 0:
        return mask
    order = np.lexsort((time, cost))  # by cost, then time
    c, t = cost[order], time[order]
    # A point is dominated by one of strictly lower cost with time <= its time, or by one of
    # equal cost and strictly lower time. Within a cost group the first (lowest time) is kept
    # together with its exact ties.
    new_group = np.ones(n, dtype=np.bool_)
    new_group[1:] = c[1:] != c[:-1]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    group_min_t = t[group_start]
    running = np.minimum.accumulate(t)
    starts = np.flatnonzero(new_group)
    prev_min = np.full(starts.shape[0], np.inf)
    prev_min[1:] = running[starts[1:] - 1]
    best_before = prev_min[np.cumsum(new_group) - 1]  # lowest time among strictly cheaper points
    keep = (t == group_min_t) & (t < best_before)
    mask[order[keep]] = True
    return mask


def naive_pareto_mask(cost: FloatArray, time: FloatArray) -> BoolArray:
    """The definition, O(n^2): the oracle the fast version is tested against."""
    cost = np.asarray(cost, dtype=np.float64)
    time = np.asarray(time, dtype=np.float64)
    le = (cost[None, :] <= cost[:, None]) & (time[None, :] <= time[:, None])
    lt = (cost[None, :] < cost[:, None]) | (time[None, :] < time[:, None])
    dominated = np.any(le & lt, axis=1)
    out: BoolArray = ~dominated
    return out


def exact_front(cost: FloatArray, time: FloatArray, feasible: BoolArray) -> IntArray:
    """Indices of the feasible non-dominated points, by cost then time."""
    idx = np.flatnonzero(feasible)
    if idx.size == 0:
        return idx.astype(np.int64)
    keep = idx[pareto_mask(cost[idx], time[idx])]
    order = np.lexsort((keep, time[keep], cost[keep]))
    out: IntArray = keep[order].astype(np.int64)
    return out


# --- hypervolume --------------------------------------------------------------------------------


def hypervolume_2d(points: FloatArray, ref: tuple[float, float]) -> float:
    """Area dominated by `points` (k, 2) and bounded by `ref` (both objectives minimised)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    pts = pts[(pts[:, 0] < ref[0]) & (pts[:, 1] < ref[1])]
    if pts.shape[0] == 0:
        return 0.0
    pts = pts[pareto_mask(pts[:, 0], pts[:, 1])]
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    widths = np.diff(np.append(pts[:, 0], ref[0]))
    return float(np.sum(widths * (ref[1] - pts[:, 1])))


def hypervolume_ratio(approx: FloatArray, exact: FloatArray, *, margin: float = 0.1) -> float:
    """HV(approx) / HV(exact), both normalised by the exact front's ideal and nadir points.

    The reference point is the nadir plus `margin` of the range in each objective (1.1, 1.1 in
    normalised units), so the front's extreme points count. A one-point exact front gives 1.0
    when `approx` holds a point at least as good, else 0.0.
    """
    ex = np.asarray(exact, dtype=np.float64).reshape(-1, 2)
    ap = np.asarray(approx, dtype=np.float64).reshape(-1, 2)
    if ex.shape[0] == 0:
        return 1.0 if ap.shape[0] == 0 else 0.0
    lo, hi = ex.min(axis=0), ex.max(axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    ref = (1.0 + margin, 1.0 + margin)
    hv_exact = hypervolume_2d((ex - lo) / span, ref)
    hv_approx = hypervolume_2d((ap - lo) / span, ref)
    return hv_approx / hv_exact if hv_exact > 0 else 0.0


# --- NSGA-II ------------------------------------------------------------------------------------

Evaluate = Callable[[IntArray], tuple[FloatArray, FloatArray, FloatArray]]


def nsga2_integer(
    *,
    upper: IntArray,
    evaluate: Evaluate,
    pop_size: int = NSGA2_POP_SIZE,
    generations: int = NSGA2_GENERATIONS,
    seed: int = NSGA2_SEED,
    patience: int = NSGA2_PATIENCE,
) -> tuple[IntArray, FloatArray]:
    """NSGA-II (pymoo) over integer vectors x with 0 <= x[i] <= upper[i].

    `evaluate(X)` takes a (k, n_var) integer matrix and returns (cost, time, violation) per row;
    violation <= 0 means feasible. Returns every distinct vector NSGA-II evaluated and its
    objectives (cost, time, violation) as a (k, 3) array: the caller keeps the non-dominated
    feasible ones. Keeping the archive rather than the last population only means a front point
    NSGA-II met once is not lost to crowding later (a population never holds more points than
    its size).

    The run stops after `generations`, when it has evaluated the whole space, or when the
    archive's feasible front has not changed for `patience` generations.
    """
    # pymoo is imported here: it costs about a second and only NSGA-II needs it.
    from pymoo.algorithms.moo.nsga2 import NSGA2, binary_tournament
    from pymoo.config import Config
    from pymoo.core.duplicate import DefaultDuplicateElimination
    from pymoo.core.mating import Mating
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling
    from pymoo.operators.selection.tournament import TournamentSelection

    Config.warnings["not_compiled"] = False
    upper = np.asarray(upper, dtype=np.int64)
    space = int(np.prod((upper + 1).astype(np.float64)))
    archive: dict[tuple[int, ...], tuple[float, float, float]] = {}
    big = np.finfo(np.float64).max / 4

    class _Problem(Problem):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(
                n_var=int(upper.shape[0]),
                n_obj=2,
                n_ieq_constr=1,
                xl=np.zeros(upper.shape[0]),
                xu=upper.astype(np.float64),
                vtype=int,
            )

        def _evaluate(self, x: Any, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            xi = np.clip(np.rint(np.asarray(x)), 0, upper).astype(np.int64)
            cost, time, viol = evaluate(xi)
            for row, c, t, v in zip(xi, cost, time, viol, strict=True):
                archive[tuple(int(a) for a in row)] = (float(c), float(t), float(v))
            out["F"] = np.column_stack([np.minimum(cost, big), np.minimum(time, big)])
            out["G"] = np.minimum(viol, big).reshape(-1, 1)

    duplicates = DefaultDuplicateElimination()
    # pymoo retries mating up to 100 times per generation to find offspring that are not
    # duplicates; on a small space that is most of the run time and finds little new.
    mating = Mating(
        TournamentSelection(func_comp=binary_tournament),
        SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=duplicates,
        n_max_iterations=NSGA2_MATING_TRIES,
    )
    algorithm = NSGA2(
        pop_size=pop_size,
        sampling=IntegerRandomSampling(),
        mating=mating,
        eliminate_duplicates=duplicates,
    )
    problem = _Problem()
    algorithm.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
    front = np.zeros((0, 2))
    still = 0
    gen = 0
    while algorithm.has_next():
        before = len(archive)
        algorithm.next()
        gen += 1
        if len(archive) >= space:
            break
        if len(archive) > before:
            new = np.array(list(archive.values())[before:], dtype=np.float64).reshape(-1, 3)
            new = new[new[:, 2] <= 0, :2]
            merged = np.concatenate([front, new])
            keep = pareto_mask(merged[:, 0], merged[:, 1])
            changed = bool(keep[front.shape[0] :].any())
            front = merged[keep]
        else:
            changed = False
        still = 0 if changed else still + 1
        if still >= patience:
            break
    LOG.debug("NSGA-II: %s generations, %s distinct vectors of %s", gen, len(archive), space)
    keys = np.array(list(archive.keys()), dtype=np.int64).reshape(len(archive), upper.shape[0])
    vals = np.array(list(archive.values()), dtype=np.float64).reshape(len(archive), 3)
    return keys, vals


def archive_front(objectives: FloatArray) -> IntArray:
    """Rows of an NSGA-II archive (cost, time, violation) on the feasible front."""
    obj = np.asarray(objectives, dtype=np.float64).reshape(-1, 3)
    return exact_front(obj[:, 0], obj[:, 1], obj[:, 2] <= 0)
