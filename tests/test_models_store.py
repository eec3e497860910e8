"""The Model Manager's store: recording, retention under a bound, dedupe, crash leftovers."""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from fedsky.controller.config import load_controller_config
from fedsky.controller.models.criteria import Threshold
from fedsky.controller.models.errors import CheckpointCorrupted, ModelManagerError, NotFound
from fedsky.controller.models.retention import RetentionPolicy
from fedsky.controller.models.service import ModelManager
from fedsky.controller.models.settings import ModelsConfig
from fedsky.controller.store import Store
from fedsky.shared.messages import ClassFigures, RoundMetrics, SiteContribution, WeightsRef
from safetensors.numpy import save


def weights_for(seed: float, n: int = 256) -> bytes:
    """A distinct safetensors file of constant size per seed."""
    return save(
        {
            "layer.weight": np.full((n,), seed, dtype=np.float32),
            "layer.bias": np.zeros(4, np.float32),
        }
    )


def blob_files(root: Path) -> list[Path]:
    return [p for p in (root / "blobs").glob("*/*") if not p.name.startswith(".")]


def blob_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in blob_files(root))


@pytest.fixture
def store(tmp_path: Path):
    s = Store(tmp_path / "controller.db")
    yield s
    s.close()


def curve(seed: int = 7, n: int = 50) -> list[tuple[float, float, float]]:
    """(accuracy, loss, f1) of a noisy learning curve, rounded so that ties happen."""
    rng = random.Random(seed)
    out = []
    for r in range(1, n + 1):
        acc = round(min(0.99, 0.5 + 0.4 * (1 - math.exp(-r / 8)) + rng.uniform(-0.03, 0.03)), 2)
        loss = round(max(0.01, 1.2 * math.exp(-r / 10) + rng.uniform(0, 0.05)), 3)
        out.append((acc, loss, round(acc - 0.02, 2)))
    return out


def best_by_accuracy(points: list[tuple[float, float, float]]) -> int:
    # The documented rule, written out on its own: highest accuracy, lower loss, earlier round.
    return min(range(len(points)), key=lambda i: (-points[i][0], points[i][1], i)) + 1


async def record_curve(reg: ModelManager, job: str, points, *, after=None) -> None:
    for r, (acc, loss, f1) in enumerate(points, start=1):
        await reg.record_round(
            job_id=job,
            round=r,
            metrics={"accuracy": acc, "loss": loss, "f1": f1, "recall": f1, "precision": f1},
            participants=[{"site": "hospital-a", "train_examples": 100, "eval_examples": 20}],
            duration_s=1.5,
            weights=weights_for(r),
        )
        if after:
            after(r)


async def test_best_k_keeps_store_under_bound_over_50_rounds_and_keeps_the_best(
    store, tmp_path
) -> None:
    root = tmp_path / "models"
    reg = ModelManager(
        store=store, root=root, config=ModelsConfig(retention="best", keep=3, max_bytes=0)
    )
    await reg.record_job(job_id="job1", selection_metric="accuracy")
    size = len(weights_for(0))
    points = curve()
    seen: list[int] = []

    def check(r: int) -> None:
        seen.append(blob_bytes(root))
        assert blob_bytes(root) <= 3 * size, f"after round {r}"

    await record_curve(reg, "job1", points, after=check)
    assert max(seen) == 3 * size  # it did fill up to the bound
    rounds = await reg.rounds("job1")
    assert len(rounds) == 50  # metrics of every round are kept
    held = [r.round for r in rounds if r.has_checkpoint]
    assert len(held) == 3
    assert len(blob_files(root)) == 3
    best = best_by_accuracy(points)
    assert best in held
    top3 = sorted(range(1, 51), key=lambda r: (-points[r - 1][0], points[r - 1][1], r))[:3]
    assert sorted(held) == sorted(top3)
    rec = await reg.best(job_ids=["job1"])
    assert rec.best is not None
    assert rec.best.round == best
    assert rec.notes
    assert "47 of 50 rounds have no checkpoint" in rec.notes[0]
    pruned = next(r for r in rounds if not r.has_checkpoint)
    assert pruned.weights_pruned_at is not None
    with pytest.raises(NotFound, match="pruned"):
        await reg.weights("job1", pruned.round)


async def test_global_bound_with_keep_all_evicts_oldest_but_never_best_or_pinned(
    store, tmp_path
) -> None:
    root = tmp_path / "models"
    size = len(weights_for(0))
    bound = 5 * size + size // 2
    reg = ModelManager(
        store=store, root=root, config=ModelsConfig(retention="all", max_bytes=bound)
    )
    points = curve(seed=3)
    # make round 2 the clear best so it is old when the bound bites
    points[1] = (0.99, 0.01, 0.99)
    await reg.record_job(
        job_id="job1", selection_metric="accuracy", retention=RetentionPolicy("all")
    )

    def check(r: int) -> None:
        assert blob_bytes(root) <= bound, f"after round {r}"

    for r, (acc, loss, f1) in enumerate(points, start=1):
        await reg.record_round(
            job_id="job1",
            round=r,
            metrics={"accuracy": acc, "loss": loss, "f1": f1},
            weights=weights_for(r),
        )
        if r == 3:
            await reg.pin(job_id="job1", round=3)
        check(r)
    held = [r.round for r in await reg.rounds("job1") if r.has_checkpoint]
    assert 2 in held
    assert 3 in held
    assert held == [2, 3, 48, 49, 50]  # then the newest
    usage = await reg.usage()
    assert usage.bytes == blob_bytes(root) <= bound
    assert usage.blobs == 5


async def test_pinned_round_survives_best_k_and_unpinning_releases_it(store, tmp_path) -> None:
    root = tmp_path / "models"
    reg = ModelManager(
        store=store, root=root, config=ModelsConfig(retention="best", keep=2, max_bytes=0)
    )
    await reg.record_round(job_id="j", round=1, metrics={"accuracy": 0.1}, weights=weights_for(1))
    await reg.pin(job_id="j", round=1)
    for r in range(2, 8):
        await reg.record_round(
            job_id="j", round=r, metrics={"accuracy": r / 10}, weights=weights_for(r)
        )
    assert [r.round for r in await reg.rounds("j") if r.has_checkpoint] == [1, 6, 7]
    await reg.pin(job_id="j", round=1, pinned=False)
    assert [r.round for r in await reg.rounds("j") if r.has_checkpoint] == [6, 7]
    with pytest.raises(ModelManagerError, match="no checkpoint left to pin"):
        await reg.pin(job_id="j", round=1)
    with pytest.raises(NotFound):
        await reg.pin(job_id="j", round=99)


async def test_identical_weights_are_stored_once_and_freed_with_the_last_reference(
    store, tmp_path
) -> None:
    root = tmp_path / "models"
    reg = ModelManager(
        store=store, root=root, config=ModelsConfig(retention="last", keep=1, max_bytes=0)
    )
    same = weights_for(42)
    await reg.record_round(job_id="a", round=1, metrics={"accuracy": 0.5}, weights=same)
    await reg.record_round(job_id="b", round=1, metrics={"accuracy": 0.5}, weights=same)
    assert len(blob_files(root)) == 1
    await reg.delete_job(job_id="a")
    assert len(blob_files(root)) == 1  # job b still refers to it
    data, record = await reg.weights("b", 1)
    assert data == same
    assert record.weights_size == len(same)
    await reg.delete_job(job_id="b")
    assert blob_files(root) == []


async def test_start_sweeps_leftovers_of_a_crash(store, tmp_path) -> None:
    root = tmp_path / "models"
    reg = ModelManager(store=store, root=root)
    await reg.record_round(job_id="j", round=1, metrics={"accuracy": 0.5}, weights=weights_for(1))
    kept = blob_files(root)
    orphan = root / "blobs" / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"left by a crash between the write and the insert")
    tmp = root / "blobs" / "ab" / ".tmp-half"
    tmp.write_bytes(b"half a file")
    ModelManager(store=store, root=root)
    assert blob_files(root) == kept
    assert not tmp.exists()


async def test_a_checkpoint_damaged_on_disk_is_refused(store, tmp_path) -> None:
    root = tmp_path / "models"
    reg = ModelManager(store=store, root=root)
    record = await reg.record_round(
        job_id="j", round=1, metrics={"accuracy": 0.5}, weights=weights_for(1)
    )
    path = reg.blobs.path(record.weights_sha256 or "")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorrupted, match="no longer matches"):
        await reg.weights("j", 1)
    # Recording the same content again repairs it (the blob is rewritten, not trusted by name).
    await reg.record_round(job_id="j", round=2, metrics={"accuracy": 0.5}, weights=weights_for(1))
    data, _ = await reg.weights("j", 1)
    assert data == weights_for(1)


async def test_rejects_non_safetensors_weights_and_stores_nan_as_missing(store, tmp_path) -> None:
    reg = ModelManager(store=store, root=tmp_path / "models")
    with pytest.raises(ModelManagerError, match="not a safetensors file"):
        await reg.record_round(job_id="j", round=1, metrics={}, weights=b"\x80\x04pickle")
    truncated = weights_for(1)[:-3]
    with pytest.raises(ModelManagerError, match="not a safetensors file"):
        await reg.record_round(job_id="j", round=1, metrics={}, weights=truncated)
    rec = await reg.record_round(
        job_id="j",
        round=1,
        metrics={"accuracy": float("nan"), "loss": float("inf"), "f1_macro": 0.4},
    )
    assert rec.metrics == {
        "accuracy": None,
        "loss": None,
        "f1": 0.4,
        "recall": None,
        "precision": None,
    }
    assert not rec.has_checkpoint


async def test_redelivered_round_replaces_and_job_metadata_round_trips(store, tmp_path) -> None:
    reg = ModelManager(store=store, root=tmp_path / "models")
    job = await reg.record_job(
        job_id="j",
        name="digits",
        selection_metric="f1",
        thresholds=[Threshold("loss", "max", 0.5)],
        hyperparameters={"rounds": 3, "lr": 0.01},
        model_digest="ab" * 32,
        participants=["hospital-a", "hospital-b"],
        datasets={"hospital-a": "digits", "hospital-b": "digits"},
        retention=RetentionPolicy("last", 4),
    )
    assert job.selection.metric == "f1"
    assert job.retention == RetentionPolicy("last", 4)
    await reg.record_round(job_id="j", round=1, metrics={"f1": 0.3}, weights=weights_for(1))
    await reg.record_round(job_id="j", round=1, metrics={"f1": 0.4}, weights=weights_for(2))
    rounds = await reg.rounds("j")
    assert len(rounds) == 1
    assert rounds[0].metrics["f1"] == 0.4
    assert len(blob_files(tmp_path / "models")) == 1  # the replaced weights were freed
    await reg.finish_job(job_id="j", status="completed")
    again = await reg.job("j")
    assert again.status == "completed"
    assert again.ended_at is not None
    assert again.to_dict()["thresholds"] == [{"metric": "loss", "kind": "max", "bound": 0.5}]
    with pytest.raises(NotFound):
        await reg.rounds("nope")


async def test_record_round_message_maps_every_field(store, tmp_path) -> None:
    reg = ModelManager(store=store, root=tmp_path / "models")
    w = weights_for(5)
    import hashlib

    now = datetime.now(UTC)
    msg = RoundMetrics(
        job_id="job-1",
        round=2,
        num_rounds=3,
        accuracy=0.75,
        loss=0.6,
        f1=0.7,
        recall=0.72,
        precision=0.71,
        train_loss=0.5,
        per_class=[
            ClassFigures(label=0, precision=0.8, recall=0.7, f1=0.75, support=10, predicted=9),
            ClassFigures(label=1, precision=0.6, recall=0.7, f1=0.65, support=10, predicted=11),
        ],
        confusion_matrix=[[7, 3], [2, 8]],
        participants=[
            SiteContribution(site="hospital-a", train_examples=120, eval_examples=12),
            SiteContribution(site="hospital-b", train_examples=80, eval_examples=8),
        ],
        started_at=now,
        finished_at=now,
        duration_s=3.25,
        weights=WeightsRef(sha256=hashlib.sha256(w).hexdigest(), size=len(w), chunks=1),
    )
    rec = await reg.record_round_message(msg, weights=w)
    assert rec.metrics == {
        "accuracy": 0.75,
        "loss": 0.6,
        "f1": 0.7,
        "recall": 0.72,
        "precision": 0.71,
    }
    assert rec.all_metrics["train_loss"] == 0.5
    assert rec.confusion_matrix == [[7, 3], [2, 8]]
    assert rec.per_class[1]["predicted"] == 11
    assert rec.to_dict()["train_examples"] == 200
    assert rec.to_dict()["eval_examples"] == 20
    assert rec.duration_s == 3.25
    assert rec.has_checkpoint
    # weights that do not match the announced digest are not kept as this round's checkpoint
    other = await reg.record_round_message(
        msg.model_copy(update={"round": 3}), weights=weights_for(6)
    )
    assert not other.has_checkpoint
    assert json.loads(json.dumps(rec.to_dict()))["participants"][0]["site"] == "hospital-a"


def test_built_from_the_controller_config(store, tmp_path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    cfg = load_controller_config(plain)
    assert cfg.registry == ModelsConfig()  # no [registry] section: the defaults
    reg = ModelManager(store=store, root=cfg.registry.root(cfg.state_dir), config=cfg.registry)
    assert reg.root == tmp_path / "state" / "models"

    section = tmp_path / "section.toml"
    section.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        "[registry]\n"
        'retention = "last"\n'
        "keep = 2\n"
        'directory = "elsewhere"\n'  # relative to the config file's directory
    )
    cfg = load_controller_config(section)
    reg = ModelManager(store=store, root=cfg.registry.root(cfg.state_dir), config=cfg.registry)
    assert reg.root == tmp_path / "elsewhere"
    assert reg.config.default_policy == RetentionPolicy("last", 2)
