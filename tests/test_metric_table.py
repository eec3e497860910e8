"""The metric table in fedsky.shared.metrics is the one source of metric names, directions and
aliases: the job spec, the wire message, the Model Manager's columns and ranking, and the CLI
all follow it."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fedsky.controller.cli import models as models_cli
from fedsky.controller.models.criteria import TIE_BREAKER, Criteria, RoundSummary, parse_metric
from fedsky.controller.models.recommend import recommend
from fedsky.controller.models.service import ModelManager
from fedsky.controller.models.settings import ModelsConfig
from fedsky.controller.models.store import SCHEMA
from fedsky.controller.store import Store
from fedsky.shared.config import ConfigError
from fedsky.shared.jobspec import parse_job_spec_text
from fedsky.shared.messages import RoundMetrics, SiteContribution
from fedsky.shared.metrics import (
    DEFAULT_SELECTION_METRIC,
    LOWER_IS_BETTER,
    METRIC_NAMES,
    METRICS,
    Metric,
    find_metric,
    format_values,
    metric_index,
    metric_key,
    metric_values,
)

SPEC = """
name = "digits-demo"
participants = ["hospital-us"]
model = "model.safetensors"
dataset = "digits"
selection_metric = "{metric}"

[hyperparameters]
rounds = 1
"""

SOURCE_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def manager(tmp_path: Path):
    store = Store(tmp_path / "controller.db")
    yield ModelManager(store=store, root=tmp_path / "models", config=ModelsConfig(retention="all"))
    store.close()


def _spec(tmp_path: Path, metric: str) -> str:
    return parse_job_spec_text(
        SPEC.format(metric=metric), path=tmp_path / "job.toml"
    ).selection_metric


def test_job_spec_accepts_exactly_the_table_names(tmp_path: Path) -> None:
    assert [_spec(tmp_path, name) for name in METRIC_NAMES] == list(METRIC_NAMES)
    aliases = [alias for m in METRICS for alias in m.aliases]
    assert aliases  # the table has aliases; a spec must use the canonical names
    for refused in [*aliases, "auc"]:
        with pytest.raises(ConfigError) as err:
            _spec(tmp_path, refused)
        listed = ", ".join(repr(n) for n in METRIC_NAMES[:-1]) + f" or {METRIC_NAMES[-1]!r}"
        assert f"key 'selection_metric': Input should be {listed} (got {refused!r})" in str(
            err.value
        )


def test_every_metric_is_a_field_of_the_round_message() -> None:
    assert set(METRIC_NAMES) <= set(RoundMetrics.model_fields)


async def test_every_metric_has_a_column(manager: ModelManager) -> None:
    rows = await manager.store.run(
        lambda c: c.execute("PRAGMA table_info(registry_rounds)").fetchall()
    )
    assert set(METRIC_NAMES) <= {row["name"] for row in rows}
    # A step of the schema's history (the CREATE, or an ALTER after it) makes each column.
    assert all(any(f" {name} REAL" in step for step in SCHEMA) for name in METRIC_NAMES)


async def test_round_message_stores_every_metric_in_its_column(manager: ModelManager) -> None:
    # A distinct value per metric, so a swapped column would show.
    values = {name: round(0.1 + 0.15 * i, 2) for i, name in enumerate(METRIC_NAMES)}
    now = datetime.now(UTC)
    message = RoundMetrics.model_validate(
        {
            "job_id": "job-1",
            "round": 1,
            "num_rounds": 1,
            **values,
            "per_class": [],
            "confusion_matrix": [[1]],
            "participants": [SiteContribution(site="hospital-a", train_examples=1)],
            "started_at": now,
            "finished_at": now,
            "duration_s": 1.0,
        }
    )
    assert metric_values(message) == values
    record = await manager.record_round_message(message, weights=None)
    assert record.metrics == values
    assert list(record.metrics) == list(METRIC_NAMES)
    stored = await manager.store.run(
        lambda c: c.execute(
            f"SELECT {', '.join(METRIC_NAMES)} FROM registry_rounds WHERE job_id = 'job-1'"  # noqa: S608
        ).fetchone()
    )
    assert tuple(stored) == tuple(values[n] for n in METRIC_NAMES)


async def test_aliases_are_stored_under_the_table_name(manager: ModelManager) -> None:
    for metric in METRICS:
        for alias in metric.aliases:
            assert metric_key(alias.upper()) == metric.name
            assert parse_metric(f" {alias} ") == metric.name
    record = await manager.record_round(
        job_id="job-2",
        round=1,
        metrics={alias: 0.5 for m in METRICS for alias in m.aliases[:1]},
    )
    for metric in METRICS:
        assert record.metrics[metric.name] == (0.5 if metric.aliases else None)


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.name)
def test_ranking_follows_the_tables_direction(metric: Metric) -> None:
    rounds = [
        RoundSummary("j", 1, {metric.name: 0.2}),
        RoundSummary("j", 2, {metric.name: 0.8}),
    ]
    best = recommend(rounds, Criteria(metric=metric.name)).best
    assert best is not None
    assert best.round == (1 if metric.lower_is_better else 2)
    assert (metric.name in LOWER_IS_BETTER) == (metric.better == "lower")


def test_the_default_and_the_tie_breaker_are_metrics_of_the_table() -> None:
    assert DEFAULT_SELECTION_METRIC in METRIC_NAMES
    assert TIE_BREAKER in LOWER_IS_BETTER  # ties go to the lower value


def test_cli_offers_the_table_names(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    models_cli.register(parser.add_subparsers())
    args = parser.parse_args(["models", "best", "j", "--metric", METRIC_NAMES[-1]])
    assert args.metric == METRIC_NAMES[-1]
    with pytest.raises(SystemExit):
        parser.parse_args(["models", "best", "j", "--metric", "auc"])
    offered = ", ".join(repr(n) for n in METRIC_NAMES)
    assert f"(choose from {offered})" in capsys.readouterr().err


def test_format_values_follows_the_table_order() -> None:
    text = format_values({name: 1.0 for name in reversed(METRIC_NAMES)})
    assert text.split()[::2] == list(METRIC_NAMES)
    assert format_values({}) == " ".join(f"{n} n/a" for n in METRIC_NAMES)


def test_table_rejects_a_clash_or_a_name_that_is_not_an_identifier() -> None:
    with pytest.raises(ValueError, match="names two rows"):
        metric_index([*METRICS, Metric("top1", "higher", "top-1", ratio=True, aliases=("acc",))])
    with pytest.raises(ValueError, match="not a lowercase identifier"):
        Metric("top-1", "higher", "top-1", ratio=True)
    assert find_metric("ACC") == METRICS[0]
    assert find_metric("auc") is None


def test_no_other_module_spells_the_aliases() -> None:
    """Aliases live in the table only (names are legitimately fields and columns elsewhere)."""
    table = SOURCE_ROOT / "shared" / "metrics.py"
    sources = [
        p
        for folder in ("shared", "controller", "agent")
        for p in (SOURCE_ROOT / folder).rglob("*.py")
        if p != table
    ]
    assert sources
    for alias in (a for m in METRICS for a in m.aliases):
        spelled = [p for p in sources if f'"{alias}"' in p.read_text()]
        assert not spelled, f"{alias!r} spelled outside the metric table: {spelled}"
