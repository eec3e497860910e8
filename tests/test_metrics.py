"""Classification figures from confusion matrices: exact, and equal to scikit-learn's."""

from __future__ import annotations

import pytest
from fedsky.shared.metrics import (
    MetricsError,
    confusion_matrix,
    figures,
    flatten,
    sum_matrices,
    unflatten,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score


def test_known_matrix() -> None:
    # true 0: 3 right, 1 as class 1; true 1: 2 right; true 2: 1 as class 0
    cm = [[3, 1, 0], [0, 2, 0], [1, 0, 0]]
    f = figures(cm)
    assert f.total == 7
    assert f.accuracy == pytest.approx(5 / 7)
    p = [3 / 4, 2 / 3, 0.0]
    r = [3 / 4, 1.0, 0.0]
    f1 = [2 * 3 / (4 + 4), 2 * 2 / (2 + 3), 0.0]
    assert [c.precision for c in f.per_class] == pytest.approx(p)
    assert [c.recall for c in f.per_class] == pytest.approx(r)
    assert [c.f1 for c in f.per_class] == pytest.approx(f1)
    assert f.precision == pytest.approx(sum(p) / 3)
    assert f.recall == pytest.approx(sum(r) / 3)
    assert f.f1 == pytest.approx(sum(f1) / 3)
    assert [c.support for c in f.per_class] == [4, 2, 1]
    assert [c.predicted for c in f.per_class] == [4, 3, 0]


def test_absent_classes_do_not_count_and_empty_matrix_is_zero() -> None:
    cm = [[5, 0, 0], [0, 5, 0], [0, 0, 0]]  # class 2 neither occurs nor is predicted
    f = figures(cm)
    assert f.f1 == 1.0
    assert f.recall == 1.0
    assert f.precision == 1.0
    zero = figures([[0, 0], [0, 0]])
    assert (zero.accuracy, zero.f1, zero.recall, zero.precision, zero.total) == (
        0.0,
        0.0,
        0.0,
        0.0,
        0,
    )


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=2, max_value=6).flatmap(
        lambda k: st.lists(
            st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=80
        ).map(lambda pairs: (k, pairs))
    )
)
def test_matches_sklearn(case: tuple[int, list[tuple[int, int]]]) -> None:
    k, pairs = case
    y_true = [t for t, _ in pairs]
    y_pred = [p for _, p in pairs]
    f = figures(confusion_matrix(y_true, y_pred, k))
    assert f.accuracy == pytest.approx(accuracy_score(y_true, y_pred))
    assert f.f1 == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert f.recall == pytest.approx(recall_score(y_true, y_pred, average="macro", zero_division=0))
    assert f.precision == pytest.approx(
        precision_score(y_true, y_pred, average="macro", zero_division=0)
    )


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=30),
        min_size=1,
        max_size=4,
    )
)
def test_summed_matrices_equal_the_union(sites: list[list[tuple[int, int]]]) -> None:
    per_site = [confusion_matrix([t for t, _ in s], [p for _, p in s], 4) for s in sites]
    union = [pair for s in sites for pair in s]
    assert sum_matrices(per_site) == confusion_matrix(
        [t for t, _ in union], [p for _, p in union], 4
    )


def test_flatten_round_trip_and_bad_input() -> None:
    cm = [[1, 2], [3, 4]]
    assert unflatten(flatten(cm), 2) == cm
    with pytest.raises(MetricsError, match="4 entries"):
        unflatten([1, 2, 3], 2)
    with pytest.raises(MetricsError, match="non-negative integers"):
        unflatten([1, 2, 3, 0.5], 2)
    with pytest.raises(MetricsError, match="not square"):
        figures([[1, 2], [3]])
    with pytest.raises(MetricsError, match="negative"):
        figures([[1, -2], [3, 4]])
    with pytest.raises(MetricsError, match="cannot sum"):
        sum_matrices([[[1]], [[1, 0], [0, 1]]])
    with pytest.raises(MetricsError, match="out of range"):
        confusion_matrix([0, 2], [0, 1], 2)
