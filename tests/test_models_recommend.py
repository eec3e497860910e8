"""Recommendation and retention decisions on recorded rounds with known answers (no store)."""

from __future__ import annotations

import math

import pytest
from fedsky.controller.models.criteria import (
    Criteria,
    RoundSummary,
    Threshold,
    parse_metric,
    parse_score,
    parse_thresholds,
)
from fedsky.controller.models.recommend import rank, recommend, threshold_gaps
from fedsky.controller.models.retention import (
    CheckpointRow,
    RetentionPolicy,
    global_evictions,
    protected_rounds,
    retention_drops,
    selection_ranking,
)
from hypothesis import given, settings
from hypothesis import strategies as st

# job j1, rounds 1..6: (accuracy, loss, f1, recall, precision)
TABLE = {
    1: (0.80, 0.50, 0.78, 0.79, 0.77),
    2: (0.88, 0.35, 0.86, 0.85, 0.87),
    3: (0.91, 0.31, 0.90, 0.90, 0.90),
    4: (0.93, 0.28, 0.89, 0.90, 0.88),
    5: (0.92, 0.25, 0.91, 0.92, 0.90),
    6: (0.93, 0.29, 0.88, 0.87, 0.89),
}
NAMES = ("accuracy", "loss", "f1", "recall", "precision")


def summary(job: str, rnd: int, values: tuple[float | None, ...]) -> RoundSummary:
    return RoundSummary(job, rnd, dict(zip(NAMES, values, strict=True)))


ROUNDS = [summary("j1", r, v) for r, v in TABLE.items()]


def crit(
    metric: str | None = "accuracy", *, score: str | None = None, mins=(), maxs=()
) -> Criteria:
    thresholds = parse_thresholds(mins, maxs)
    if score:
        return Criteria(metric=None, weights=parse_score(score), thresholds=thresholds)
    return Criteria(metric=metric, thresholds=thresholds)


# --- known answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("criteria", "best", "runners"),
    [
        (crit("f1"), 5, [3, 4, 6]),
        (crit("loss"), 5, [4, 6, 3]),
        (crit("recall"), 5, [4, 3, 6]),  # 3 and 4 tie on 0.90: 4 has the lower loss
        (crit("f1", mins=["accuracy=0.93"]), 4, [6]),
        (crit("f1", mins=["accuracy=0.925"], maxs=["loss=0.3"]), 4, [6]),
        (crit("accuracy", maxs=["loss=0.3"]), 4, [6, 5]),
        (crit("precision", mins=["recall=0.9"]), 5, [3, 4]),  # 5 ties 3 on 0.90, lower loss
    ],
)
def test_known_best_and_runners_up(criteria: Criteria, best: int, runners: list[int]) -> None:
    rec = recommend(ROUNDS, criteria, runners_up=3)
    assert rec.best is not None
    assert rec.best.round == best
    assert [r.round for r in rec.runners_up] == runners
    assert all(meets_all(r.metrics, criteria.thresholds) for r in [rec.best, *rec.runners_up])


def meets_all(metrics, thresholds) -> bool:
    return all(t.met(metrics.get(t.metric)) for t in thresholds)


def test_reason_names_metric_value_and_constraint_count() -> None:
    rec = recommend(ROUNDS, crit("f1", mins=["accuracy=0.9"]))
    assert rec.best is not None
    assert rec.best.round == 5
    assert rec.feasible == 4
    assert rec.considered == 6
    assert "round 5" in rec.reason
    assert "highest f1 (0.91)" in rec.reason
    assert "4 of 6 rounds meeting accuracy >= 0.9" in rec.reason
    assert "runner-up round 3" in rec.reason


def test_loss_is_lower_is_better() -> None:
    rec = recommend(ROUNDS, crit("loss"))
    assert rec.best is not None
    assert rec.best.round == 5
    assert rec.best.score == pytest.approx(0.25)
    assert "lowest loss" in rec.reason


# --- ties ----------------------------------------------------------------------------------------


def test_tie_on_metric_goes_to_lower_loss() -> None:
    # rounds 4 and 6 both reach accuracy 0.93; 4 has loss 0.28 < 0.29
    rec = recommend(ROUNDS, crit("accuracy"))
    assert rec.best is not None
    assert rec.best.round == 4
    assert rec.runners_up[0].round == 6
    assert "tied with round 6" in rec.reason
    assert "loss is lower" in rec.reason


def test_tie_on_metric_and_loss_goes_to_earlier_round() -> None:
    rounds = [
        summary("j", 1, (0.5, 0.9, 0.5, 0.5, 0.5)),
        summary("j", 7, (0.9, 0.2, 0.8, 0.8, 0.8)),
        summary("j", 3, (0.9, 0.2, 0.7, 0.7, 0.7)),
        summary("j", 9, (0.9, 0.2, 0.9, 0.9, 0.9)),
    ]
    rec = recommend(rounds, crit("accuracy"))
    assert rec.best is not None
    assert rec.best.round == 3
    assert [r.round for r in rec.runners_up] == [7, 9, 1]
    assert "it came earlier" in rec.reason
    # The input order does not matter.
    assert recommend(list(reversed(rounds)), crit("accuracy")).best == rec.best


def test_float_noise_below_tie_decimals_is_a_tie() -> None:
    a = summary("j", 2, (0.1 + 0.2, 0.4, 0.3, 0.3, 0.3))  # 0.30000000000000004
    b = summary("j", 1, (0.3, 0.4, 0.3, 0.3, 0.3))
    rec = recommend([a, b], crit("accuracy"))
    assert rec.best is not None
    assert rec.best.round == 1


def test_tie_across_jobs_same_round_goes_to_job_id() -> None:
    rounds = [
        summary("zeta", 2, (0.9, 0.2, 0.9, 0.9, 0.9)),
        summary("alpha", 2, (0.9, 0.2, 0.9, 0.9, 0.9)),
    ]
    rec = recommend(rounds, crit("f1"))
    assert rec.best is not None
    assert (rec.best.job_id, rec.best.round) == ("alpha", 2)
    assert "job alpha round 2" in rec.reason


# --- weighted score ------------------------------------------------------------------------------


def test_weighted_score_min_max_normalised() -> None:
    rec = recommend(ROUNDS, crit(score="f1:0.7,accuracy:0.3"), runners_up=5)
    assert rec.best is not None
    assert rec.best.round == 5
    f1_lo, f1_hi, acc_lo, acc_hi = 0.78, 0.91, 0.80, 0.93

    def expected(r: int) -> float:
        acc, _, f1, _, _ = TABLE[r]
        return 0.7 * (f1 - f1_lo) / (f1_hi - f1_lo) + 0.3 * (acc - acc_lo) / (acc_hi - acc_lo)

    assert rec.best.score == pytest.approx(expected(5))
    order = [rec.best.round] + [r.round for r in rec.runners_up]
    assert order == sorted(TABLE, key=lambda r: -expected(r))  # 5, 3, 4, 6, 2, 1
    for r in rec.runners_up:
        assert r.score == pytest.approx(expected(r.round))


def test_weighted_weights_are_relative_and_loss_flips() -> None:
    a = recommend(ROUNDS, crit(score="f1:7,accuracy:3"), runners_up=5)
    b = recommend(ROUNDS, crit(score="f1:0.7,accuracy:0.3"), runners_up=5)
    assert [r.round for r in a.runners_up] == [r.round for r in b.runners_up]
    assert a.best is not None
    assert b.best is not None
    assert a.best.score == pytest.approx(b.best.score)
    only_loss = recommend(ROUNDS, crit(score="loss:1"))
    assert only_loss.best is not None
    assert only_loss.best.round == 5
    assert only_loss.best.score == 1.0


def test_weighted_normalises_over_rounds_meeting_thresholds() -> None:
    rec = recommend(ROUNDS, crit(score="accuracy:1", mins=["accuracy=0.92"]), runners_up=5)
    # feasible: 4 (0.93), 5 (0.92), 6 (0.93); min-max over them: 4 and 6 -> 1.0, 5 -> 0.0
    assert rec.best is not None
    assert rec.best.round == 4
    assert rec.best.score == 1.0
    assert [(r.round, r.score) for r in rec.runners_up] == [(6, 1.0), (5, 0.0)]


def test_weighted_single_valued_metric_normalises_to_one() -> None:
    rounds = [summary("j", i, (0.9, 0.3, 0.5 + i / 10, 0.5, 0.5)) for i in (1, 2)]
    rec = recommend(rounds, crit(score="accuracy:1,f1:1"))
    assert rec.best is not None
    assert rec.best.round == 2
    assert rec.best.score == pytest.approx(1.0)


# --- nothing meets the thresholds ----------------------------------------------------------------


def test_no_feasible_single_threshold_says_how_close() -> None:
    rec = recommend(ROUNDS, crit("f1", mins=["accuracy=0.95"]))
    assert rec.best is None
    assert rec.feasible == 0
    assert rec.closest is not None
    assert rec.closest.threshold == Threshold("accuracy", "min", 0.95)
    assert rec.closest.round == 4  # 4 and 6 both reach 0.93: the earlier round
    assert rec.closest.shortfall == pytest.approx(0.02)
    assert rec.closest.relative == pytest.approx(0.02 / 0.95)
    assert rec.closest.alone
    assert "closest is accuracy >= 0.95" in rec.reason
    assert "0.02 short" in rec.reason
    assert rec.to_dict()["feasible"] is False


def test_no_feasible_picks_threshold_closest_relative_to_its_bound() -> None:
    # accuracy >= 0.93 alone: met by 4 and 6 (loss 0.28, 0.29); loss <= 0.26 alone: 5 (acc 0.92).
    rec = recommend(ROUNDS, crit("f1", mins=["accuracy=0.93"], maxs=["loss=0.26"]))
    assert rec.best is None
    gaps = {g.threshold.metric: g for g in rec.gaps}
    assert gaps["accuracy"].round == 5
    assert gaps["accuracy"].shortfall == pytest.approx(0.01)
    assert gaps["loss"].round == 4
    assert gaps["loss"].shortfall == pytest.approx(0.02)
    assert gaps["accuracy"].alone
    assert gaps["loss"].alone
    # 0.01 / 0.93 = 1.1% < 0.02 / 0.26 = 7.7%: accuracy is the closest to being met
    assert rec.closest is not None
    assert rec.closest.threshold.metric == "accuracy"
    assert "round 5 reaches 0.92" in rec.reason
    assert "meets the others" in rec.reason


def test_no_feasible_when_no_single_relaxation_suffices() -> None:
    rec = recommend(ROUNDS, crit("f1", mins=["accuracy=0.95"], maxs=["loss=0.2"]))
    assert rec.best is None
    assert not any(g.alone for g in rec.gaps)
    # every round misses both; round 5 misses least in sum (0.03/0.95 + 0.05/0.2)
    assert rec.closest is not None
    assert rec.closest.round == 5
    assert rec.closest.threshold.metric == "accuracy"
    assert "relaxing one threshold alone admits none" in rec.reason
    assert "nearest is round 5" in rec.reason


def test_threshold_on_a_metric_never_reported() -> None:
    rounds = [summary("j", 1, (0.9, 0.3, None, 0.9, 0.9))]
    rec = recommend(rounds, crit("accuracy", mins=["f1=0.5"]))
    assert rec.best is None
    assert rec.closest is not None
    assert rec.closest.value is None
    assert math.isinf(rec.closest.shortfall)
    assert "no value" in rec.reason


def test_no_rounds_at_all() -> None:
    rec = recommend([], crit("f1"))
    assert rec.best is None
    assert rec.considered == 0
    assert "no rounds" in rec.reason


def test_rounds_without_the_metric_are_not_candidates() -> None:
    rounds = [
        summary("j", 1, (0.9, 0.3, None, 0.9, 0.9)),
        summary("j", 2, (0.5, 0.9, 0.1, 0.1, 0.1)),
    ]
    rec = recommend(rounds, crit("f1"))
    assert rec.best is not None
    assert rec.best.round == 2
    assert rec.runners_up == ()


# --- parsers -------------------------------------------------------------------------------------


def test_parsers_accept_and_reject() -> None:
    assert parse_metric(" F1 ") == "f1"
    assert parse_metric("f1_macro") == "f1"
    assert parse_thresholds(["accuracy=0.9"], ["loss=0.3"]) == (
        Threshold("accuracy", "min", 0.9),
        Threshold("loss", "max", 0.3),
    )
    assert parse_score("f1:0.7, accuracy:0.3") == (("f1", 0.7), ("accuracy", 0.3))
    for bad in ("accuracy", "accuracy=", "auc=0.9", "accuracy=high", "accuracy=nan"):
        with pytest.raises(ValueError, match="min"):
            parse_thresholds([bad])
    for bad in ("", "f1", "f1:0", "f1:-1", "f1:1,f1:2", "auc:1"):
        with pytest.raises(ValueError, match="score"):
            parse_score(bad)
    with pytest.raises(ValueError, match="not both"):
        Criteria(metric="f1", weights=(("f1", 1.0),))
    with pytest.raises(ValueError, match="give a metric"):
        Criteria(metric=None)


# --- property: the pick is feasible, unbeaten, and independent of input order ---------------------

metric_value = st.one_of(st.none(), st.floats(0, 1, allow_nan=False).map(lambda x: round(x, 2)))
round_st = st.tuples(metric_value, metric_value, metric_value, metric_value, metric_value)


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(round_st, min_size=0, max_size=12),
    metric=st.sampled_from(NAMES),
    bound=st.floats(0, 1).map(lambda x: round(x, 2)),
    kind=st.sampled_from(["min", "max"]),
    bound_metric=st.sampled_from(NAMES),
    data=st.randoms(use_true_random=False),
)
def test_best_is_feasible_and_unbeaten(rows, metric, bound, kind, bound_metric, data) -> None:
    rounds = [summary("j", i + 1, v) for i, v in enumerate(rows)]
    criteria = Criteria(metric=metric, thresholds=(Threshold(bound_metric, kind, bound),))
    rec = recommend(rounds, criteria)
    shuffled = list(rounds)
    data.shuffle(shuffled)
    again = recommend(shuffled, criteria)
    assert (rec.best.round if rec.best else None) == (again.best.round if again.best else None)
    feasible = [
        r
        for r in rounds
        if meets_all(r.metrics, criteria.thresholds) and r.value(metric) is not None
    ]
    if not feasible:
        assert rec.best is None
        return
    assert rec.best is not None
    best_value = rec.best.metrics[metric]
    assert meets_all(rec.best.metrics, criteria.thresholds)
    for r in feasible:
        v = r.value(metric)
        assert v is not None
        assert best_value is not None
        assert (v >= best_value) if metric == "loss" else (v <= best_value)


# --- retention decisions -------------------------------------------------------------------------


def rows_for(values: dict[int, float], *, pinned=(), job="j", size=10) -> list[CheckpointRow]:
    return [
        CheckpointRow(
            summary=summary(job, r, (acc, 1 - acc, acc, acc, acc)),
            sha256=f"{job}{r}".ljust(64, "0"),
            size=size,
            pinned=r in pinned,
            order=r,
        )
        for r, acc in values.items()
    ]


def test_retention_best_keeps_top_k_and_pinned() -> None:
    rows = rows_for({1: 0.5, 2: 0.9, 3: 0.7, 4: 0.8, 5: 0.6}, pinned={1})
    drops = retention_drops(rows, RetentionPolicy("best", 2), Criteria("accuracy"))
    assert drops == [3, 5]  # keeps 2 (0.9), 4 (0.8) and the pinned 1


def test_retention_last_keeps_last_k_and_the_best() -> None:
    rows = rows_for({1: 0.5, 2: 0.9, 3: 0.7, 4: 0.8, 5: 0.6})
    assert retention_drops(rows, RetentionPolicy("last", 2), Criteria("accuracy")) == [1, 3]
    assert retention_drops(rows, RetentionPolicy("all"), Criteria("accuracy")) == []


def test_retention_ranks_rounds_meeting_the_job_thresholds_first() -> None:
    rows = rows_for({1: 0.9, 2: 0.8, 3: 0.7})
    # only round 3 meets the job's threshold, so it ranks first though its accuracy is lowest
    selection = Criteria("accuracy", thresholds=(Threshold("recall", "max", 0.75),))
    assert [r.round for r in selection_ranking([r.summary for r in rows], selection)] == [3, 1, 2]
    assert protected_rounds(rows, selection) == {3}
    assert retention_drops(rows, RetentionPolicy("best", 1), selection) == [1, 2]


def test_global_evictions_oldest_first_skip_protected_and_shared_blobs() -> None:
    rows = rows_for({1: 0.5, 2: 0.9, 3: 0.7, 4: 0.8})
    # rounds 3 and 4 share one blob
    rows[3] = CheckpointRow(rows[3].summary, rows[2].sha256, 10, False, 4)
    assert global_evictions(rows, protected={("j", 2)}, max_bytes=30) == []  # 3 distinct blobs
    assert global_evictions(rows, protected={("j", 2)}, max_bytes=20) == [("j", 1)]
    # dropping 3 frees nothing while 4 still refers to the blob
    assert global_evictions(rows, protected={("j", 2)}, max_bytes=10) == [
        ("j", 1),
        ("j", 3),
        ("j", 4),
    ]
    assert global_evictions(rows, protected={("j", 2)}, max_bytes=0) == [
        ("j", 1),
        ("j", 3),
        ("j", 4),
    ]


def test_rank_of_loss_reports_the_loss_itself() -> None:
    ranked = rank(ROUNDS, crit("loss"))
    assert [r.score for r in ranked][:2] == [0.25, 0.28]


def test_threshold_gaps_sorted_closest_first() -> None:
    gaps = threshold_gaps(ROUNDS, parse_thresholds(["accuracy=0.93"], ["loss=0.26"]))
    assert [g.threshold.metric for g in gaps] == ["accuracy", "loss"]
