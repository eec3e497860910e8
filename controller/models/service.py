"""The Model Manager: every round's metrics and global weights, recommendation, signed download.

The daemon records each job at submit and each round as the aggregator reports it; retention
runs after every round. The API asks it for rounds, the recommended round, weights and their
signed metadata. Decisions are plain functions (`recommend`, `retention`), storage is
`store` (SQL) and `blobs` (weights files); this class holds them together under one lock.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedsky.controller.models import store as tables
from fedsky.controller.models.blobs import BlobStore, safetensors_header, sha256_hex
from fedsky.controller.models.criteria import Criteria, Threshold, parse_metric
from fedsky.controller.models.errors import ModelManagerError, NotFound
from fedsky.controller.models.recommend import Recommendation, recommend
from fedsky.controller.models.records import JobRecord, RoundRecord, StoreUsage
from fedsky.controller.models.retention import (
    CheckpointRow,
    RetentionPolicy,
    global_evictions,
    protected_rounds,
    retention_drops,
)
from fedsky.controller.models.settings import ModelsConfig
from fedsky.controller.models.signing import (
    SigningKey,
    build_metadata,
    public_key_pem,
    sign_metadata,
)
from fedsky.controller.store import Store, transaction
from fedsky.shared.messages import RoundMetrics, phase_seconds
from fedsky.shared.metrics import (
    DEFAULT_SELECTION_METRIC,
    METRIC_NAMES,
    format_values,
    metric_key,
    metric_values,
)

log = logging.getLogger(__name__)


def _contributions(
    participants: Sequence[Mapping[str, Any]] | Mapping[str, int],
) -> list[dict[str, Any]]:
    """Participants as a list of {"site": id, counts...}; {site: train examples} is accepted."""
    if isinstance(participants, Mapping):
        return [{"site": str(k), "train_examples": int(v)} for k, v in sorted(participants.items())]
    out = []
    for p in participants:
        entry = dict(p)
        if not isinstance(entry.get("site"), str):
            raise ModelManagerError("each participant needs a site id")
        out.append(entry)
    return out


class ModelManager:
    """The Model Manager service (`Services.models`).

    Mutations are serialised by one asyncio lock: recording a round, pinning and pruning must not
    interleave, or a blob shared by two rounds could be deleted while a new round refers to it.
    SQLite runs in the store's thread and file I/O in a worker thread; nothing blocks the loop.
    """

    def __init__(self, *, store: Store, root: Path, config: ModelsConfig | None = None) -> None:
        self.store = store
        self.config = config or ModelsConfig()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.blobs = BlobStore(self.root / "blobs")
        self.signing_key = SigningKey(self.root / "signing.key")
        self._lock = asyncio.Lock()
        store.ensure_schema(tables.SCHEMA_PART, tables.SCHEMA)
        self._reconcile()

    def _reconcile(self) -> None:
        """At start: drop temporaries and blobs no round refers to (left by a crash mid-way)."""
        swept = self.blobs.sweep_temporaries()
        in_use = self.store.call(tables.referenced)
        orphans = [sha for sha, _ in self.blobs.walk() if sha not in in_use]
        for sha in orphans:
            self.blobs.delete(sha)
        missing = [sha for sha in in_use if not self.blobs.path(sha).exists()]
        if swept or orphans:
            log.info(
                "model store: removed %d unfinished writes and %d unreferenced checkpoints",
                swept,
                len(orphans),
            )
        if missing:
            log.warning(
                "model store: %d checkpoints are missing from %s", len(missing), self.blobs.root
            )

    # -- recording -------------------------------------------------------------------------------

    async def record_job(
        self,
        *,
        job_id: str,
        name: str | None = None,
        selection_metric: str = DEFAULT_SELECTION_METRIC,
        thresholds: Sequence[Threshold] = (),
        hyperparameters: Mapping[str, Any] | None = None,
        model_digest: str | None = None,
        participants: Sequence[str] = (),
        datasets: Sequence[str] | Mapping[str, str] = (),
        retention: RetentionPolicy | None = None,
    ) -> JobRecord:
        """Record (or update) what the download metadata says about a job; call at submit."""
        selection = Criteria(metric=parse_metric(selection_metric), thresholds=tuple(thresholds))
        hp = tables.json_or_none(dict(hyperparameters or {}), "hyperparameters")
        ds = tables.json_or_none(
            datasets if isinstance(datasets, Mapping) else list(datasets), "datasets"
        )
        async with self._lock:
            return await self.store.run(
                tables.upsert_job,
                job_id=job_id,
                name=name,
                selection=selection,
                hyperparameters_json=hp,
                model_digest=model_digest,
                participants=participants,
                datasets_json=ds,
                retention=retention,
            )

    async def record_round(
        self,
        *,
        job_id: str,
        round: int,
        metrics: Mapping[str, Any],
        per_class: Any = None,
        confusion_matrix: Sequence[Sequence[int]] | None = None,
        participants: Sequence[Mapping[str, Any]] | Mapping[str, int] = (),
        failures: Sequence[Mapping[str, Any]] = (),
        duration_s: float | None = None,
        weights: bytes | None = None,
    ) -> RoundRecord:
        """Record one round (call for each RoundMetrics); then enforce retention.

        `metrics` holds the metrics of the table in `fedsky.shared.metrics` (under their names or
        aliases; other numeric entries are kept too); NaN or infinite values are stored as
        missing. `weights` are the global weights as a safetensors file. Recording the same round
        again replaces it (a redelivered message).
        """
        if round < 0:
            raise ModelManagerError(f"round {round}: rounds are numbered from 0")
        all_metrics: dict[str, float] = {}
        for key, value in metrics.items():
            number = tables.finite(value)
            if number is not None:
                all_metrics[metric_key(key)] = number
        new = tables.NewRound(
            job_id=job_id,
            round=round,
            metrics={m: all_metrics.get(m) for m in METRIC_NAMES},
            all_metrics=all_metrics,
            participants=_contributions(participants),
            failures_json=tables.json_or_none([dict(f) for f in failures], "failures") or "[]",
            confusion=(
                [[int(c) for c in row] for row in confusion_matrix]
                if confusion_matrix is not None
                else None
            ),
            per_class_json=tables.json_or_none(per_class, "per-class figures"),
            duration_s=duration_s,
            weights=None,
        )
        if weights is not None:
            try:
                safetensors_header(weights)
            except ValueError as exc:
                raise ModelManagerError(
                    f"job {job_id} round {round}: the weights are not a safetensors file ({exc})"
                ) from None
        async with self._lock:
            if weights is not None:
                new = replace(new, weights=await asyncio.to_thread(self.blobs.put, weights))
            try:
                record, replaced = await self.store.run(tables.insert_round, new)
            except BaseException:
                if new.weights is not None:
                    await self._collect([new.weights.sha256])
                raise
            await self._collect(replaced)
            await self._enforce_locked(job_id)
            # Re-read: retention may have dropped this round's own checkpoint (global bound).
            rounds = await self.store.run(tables.get_rounds, job_id)
        log.info("recorded job %s round %d (%s)", job_id, round, format_values(new.metrics, ".4g"))
        return next((r for r in rounds if r.round == round), record)

    async def record_round_message(
        self, message: RoundMetrics, *, weights: bytes | None
    ) -> RoundRecord:
        """Record a `RoundMetrics` from the aggregator, with the reassembled weights file (or None).

        The weights must match the message's `weights` reference (SHA-256 and size): a mismatch
        means the chunks were mixed up, and the round is recorded without a checkpoint rather
        than with the wrong one.
        """
        ref = message.weights
        got = None
        if weights is not None:
            got = (await asyncio.to_thread(sha256_hex, weights), len(weights))
        if got is not None and ref is not None and got != (ref.sha256, ref.size):
            log.warning(
                "job %s round %d: reassembled weights do not match their announced SHA-256; "
                "recording the round without a checkpoint",
                message.job_id,
                message.round,
            )
            weights = None
        metrics: dict[str, float | None] = metric_values(message)
        if message.train_loss is not None:
            metrics["train_loss"] = message.train_loss
        if message.phases is not None:  # kept with the round's other figures
            metrics.update(
                {f"{name}_phase_s": value for name, value in phase_seconds(message.phases).items()}
            )
        return await self.record_round(
            job_id=message.job_id,
            round=message.round,
            metrics=metrics,
            per_class=[c.model_dump(mode="json") for c in message.per_class],
            confusion_matrix=message.confusion_matrix,
            participants=[p.model_dump(mode="json") for p in message.participants],
            failures=[f.model_dump(mode="json") for f in message.failures],
            duration_s=message.duration_s,
            weights=weights,
        )

    async def finish_job(self, *, job_id: str, status: str) -> None:
        """Record a job's end state (completed, failed, cancelled); enforce retention once more."""
        async with self._lock:
            await self.store.run(tables.finish_job, job_id, status)
            await self._enforce_locked(job_id)

    async def delete_job(self, *, job_id: str) -> int:
        """Forget a job: its rounds and the checkpoints only it used. Returns rounds removed."""
        async with self._lock:
            n, gone = await self.store.run(tables.delete_job, job_id)
            await asyncio.to_thread(self._delete_blobs, gone)
        return n

    async def pin(self, *, job_id: str, round: int, pinned: bool = True) -> RoundRecord:
        """Pin (or unpin) a round: a pinned checkpoint is never pruned."""
        async with self._lock:
            record = await self.store.run(tables.set_pinned, job_id, round, pinned)
            if not pinned:
                await self._enforce_locked(job_id)
        return record

    # -- retention -------------------------------------------------------------------------------

    async def enforce_retention(self, job_id: str) -> None:
        async with self._lock:
            await self._enforce_locked(job_id)

    async def _enforce_locked(self, job_id: str) -> None:
        gone = await self.store.run(self._prune, job_id)
        if gone:
            await asyncio.to_thread(self._delete_blobs, gone)

    async def _collect(self, shas: Sequence[str]) -> None:
        """Delete those of `shas` that no round refers to (call with the lock held)."""
        if not shas:
            return
        in_use = await self.store.run(tables.referenced)
        await asyncio.to_thread(self._delete_blobs, [s for s in shas if s not in in_use])

    def _delete_blobs(self, shas: Sequence[str]) -> None:
        for sha in shas:
            self.blobs.delete(sha)

    def _prune(self, conn: sqlite3.Connection, job_id: str) -> list[str]:
        """Apply the job's policy, then the store's bound; returns blobs no round refers to now."""
        max_bytes = self.config.max_bytes
        with transaction(conn):
            job = tables.get_job(conn, job_id)
            selection = job.selection if job else Criteria()
            policy = (job.retention if job else None) or self.config.default_policy
            drops = [
                (job_id, r)
                for r in retention_drops(tables.checkpoint_rows(conn, job_id), policy, selection)
            ]
            # The whole-store pass reads every row: only when the store may be over its bound.
            if max_bytes and tables.held_bytes(conn) > max_bytes:
                drops += self._evictions(conn, set(drops), max_bytes)
            if not drops:
                return []
            gone = tables.drop_checkpoints(conn, drops)
        log.info("retention dropped %d checkpoints (%d files)", len(drops), len(gone))
        return gone

    @staticmethod
    def _evictions(
        conn: sqlite3.Connection, dropping: set[tuple[str, int]], max_bytes: int
    ) -> list[tuple[str, int]]:
        """What else to drop, store-wide, to fit `max_bytes` once `dropping` is gone."""
        remaining = [
            r
            for r in tables.checkpoint_rows(conn, None)
            if (r.summary.job_id, r.summary.round) not in dropping
        ]
        by_job: dict[str, list[CheckpointRow]] = {}
        for r in remaining:
            by_job.setdefault(r.summary.job_id, []).append(r)
        protected: set[tuple[str, int]] = set()
        for jid, rows in by_job.items():
            other = tables.get_job(conn, jid)
            selection = other.selection if other else Criteria()
            protected |= {(jid, n) for n in protected_rounds(rows, selection)}
        evict = global_evictions(remaining, protected, max_bytes)
        evicted = set(evict)
        held = {
            r.sha256: r.size
            for r in remaining
            if r.sha256 and (r.summary.job_id, r.summary.round) not in evicted
        }
        if sum(held.values()) > max_bytes:
            log.warning(
                "model store holds %d bytes, above its bound of %d, in checkpoints "
                "that are pinned or best for their job; unpin some or raise "
                "[registry] max_bytes",
                sum(held.values()),
                max_bytes,
            )
        return evict

    # -- queries ---------------------------------------------------------------------------------

    async def job(self, job_id: str) -> JobRecord:
        job = await self.store.run(tables.get_job, job_id)
        if job is None:
            raise NotFound(f"no job {job_id} in the model registry")
        return job

    async def jobs(self) -> list[JobRecord]:
        return await self.store.run(tables.list_jobs)

    async def rounds(self, job_id: str) -> list[RoundRecord]:
        """Every recorded round of a job, in order (NotFound for an unknown job)."""
        await self.job(job_id)
        return await self.store.run(tables.get_rounds, job_id)

    async def round(self, job_id: str, round_no: int) -> RoundRecord:
        record = await self.store.run(tables.get_round, job_id, round_no)
        if record is None:
            await self.job(job_id)
            raise NotFound(f"job {job_id} has no round {round_no}")
        return record

    async def best(
        self,
        *,
        job_ids: Sequence[str] | None,
        criteria: Criteria | None = None,
        thresholds: Sequence[Threshold] = (),
        runners_up: int = 3,
    ) -> Recommendation:
        """Recommend among the rounds that still hold a checkpoint.

        `job_ids=None` means every job. Without `criteria`, one job's own selection metric is used
        (`thresholds`, when given, replace the job's own); across jobs `criteria` is required.
        """
        if criteria is None:
            if job_ids is None or len(job_ids) != 1:
                raise ModelManagerError("across jobs, name the metric or score to compare by")
            job = await self.job(job_ids[0])
            criteria = replace(
                job.selection, thresholds=tuple(thresholds) or job.selection.thresholds
            )
        if job_ids is None:
            records = await self.store.run(tables.get_rounds, None)
        else:
            records = []
            for jid in job_ids:
                records += await self.rounds(jid)
        held = [r.summary for r in records if r.has_checkpoint]
        rec = recommend(held, criteria, runners_up=runners_up)
        pruned = len(records) - len(held)
        if pruned:
            rec = replace(
                rec,
                notes=(
                    f"{pruned} of {len(records)} rounds have no checkpoint (pruned, or none "
                    "was recorded) and were not considered",
                ),
            )
        return rec

    async def usage(self) -> StoreUsage:
        return await self.store.run(tables.usage, self.config.max_bytes)

    # -- download --------------------------------------------------------------------------------

    async def weights(self, job_id: str, round_no: int) -> tuple[bytes, RoundRecord]:
        """A round's weights (safetensors bytes), checked against their SHA-256."""
        record = await self.round(job_id, round_no)
        if record.weights_sha256 is None:
            why = (
                f"pruned at {record.weights_pruned_at}"
                if record.weights_pruned_at
                else "none was recorded"
            )
            raise NotFound(f"job {job_id} round {round_no} has no checkpoint ({why})")
        data = await asyncio.to_thread(self.blobs.read, record.weights_sha256)
        return data, record

    async def signed_metadata(self, job_id: str, round_no: int) -> bytes:
        """The metadata file for a round's weights, signed with the controller's key."""
        record = await self.round(job_id, round_no)
        if record.weights_sha256 is None:
            raise NotFound(
                f"job {job_id} round {round_no} has no checkpoint (pruned or never recorded)"
            )
        job = await self.job(job_id)
        metadata = build_metadata(job, record)
        return await asyncio.to_thread(sign_metadata, metadata, self.signing_key)

    def public_key_pem(self) -> str:
        return public_key_pem(self.signing_key.public_key)
