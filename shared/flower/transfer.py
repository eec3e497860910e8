"""Moving a round's global weights over the bus in chunks, and putting them back together.

Plain functions and small bounded classes: no MQTT, no Flower, no torch. The aggregator splits
(`split_weights`); the controller's consumer hands every payload from the metrics topic to one
`AggregatorFeed`, which gives back whole rounds (metrics plus the weights file, checked against
its SHA-256) and run ends.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import time
from dataclasses import dataclass, field

from fedsky.shared.ids import aggregator_id
from fedsky.shared.messages import (
    WEIGHTS_CHUNK_BYTES,
    PayloadError,
    RoundMetrics,
    RunFinished,
    WeightsChunk,
    WeightsRef,
    decode_aggregator,
)

log = logging.getLogger(__name__)


class TransferError(ValueError):
    """Chunks that do not add up to the file they claim to be."""


def split_weights(
    *, job_id: str, round: int, data: bytes, chunk_bytes: int = WEIGHTS_CHUNK_BYTES
) -> tuple[WeightsRef, list[WeightsChunk]]:
    """The reference a RoundMetrics carries, and the chunks that deliver `data`."""
    sha = hashlib.sha256(data).hexdigest()
    pieces = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
    chunks = [
        WeightsChunk(
            job_id=job_id,
            round=round,
            sha256=sha,
            index=i,
            count=len(pieces),
            data=base64.b64encode(piece).decode("ascii"),
        )
        for i, piece in enumerate(pieces)
    ]
    return WeightsRef(sha256=sha, size=len(data), chunks=len(pieces)), chunks


@dataclass
class _Pending:
    count: int
    parts: dict[int, bytes] = field(default_factory=dict)
    size: int = 0
    touched: float = 0.0


@dataclass(frozen=True)
class AssembledWeights:
    job_id: str
    round: int
    sha256: str
    data: bytes


class WeightsAssembler:
    """Collects chunks per (sender, job, round, sha256); bounded in bytes and in transfers.

    `add` returns the finished file when its last chunk arrives and the digest matches, None
    while pieces are missing, and raises TransferError for a chunk that contradicts its
    transfer (the transfer is dropped). Over `max_bytes` or `max_transfers`, the transfer
    touched least recently is dropped; one idle for `stale_s` is dropped too.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 512 << 20,
        max_transfers: int = 16,
        stale_s: float = 600.0,
    ) -> None:
        self._max_bytes = max_bytes
        self._max_transfers = max_transfers
        self._stale_s = stale_s
        self._pending: dict[tuple[str, str, int, str], _Pending] = {}
        self._bytes = 0

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def _drop(self, key: tuple[str, str, int, str]) -> None:
        p = self._pending.pop(key, None)
        if p is not None:
            self._bytes -= p.size

    def _evict(self, now: float) -> None:
        for key, p in list(self._pending.items()):
            if now - p.touched > self._stale_s:
                log.warning("dropping stale weights transfer for job %s round %s", key[1], key[2])
                self._drop(key)
        while self._pending and (
            self._bytes > self._max_bytes or len(self._pending) > self._max_transfers
        ):
            oldest = min(self._pending, key=lambda k: self._pending[k].touched)
            log.warning(
                "dropping weights transfer for job %s round %s: over the bound",
                oldest[1],
                oldest[2],
            )
            self._drop(oldest)

    def add(
        self, chunk: WeightsChunk, *, sender: str = "", now: float | None = None
    ) -> AssembledWeights | None:
        now = time.monotonic() if now is None else now
        key = (sender, chunk.job_id, chunk.round, chunk.sha256)
        if chunk.index >= chunk.count:
            raise TransferError(f"chunk {chunk.index} of {chunk.count} is out of range")
        try:
            piece = base64.b64decode(chunk.data, validate=True)
        except (binascii.Error, ValueError):
            self._drop(key)
            raise TransferError("chunk data is not base64") from None
        if len(piece) > WEIGHTS_CHUNK_BYTES:
            self._drop(key)
            raise TransferError(f"chunk of {len(piece)} bytes exceeds {WEIGHTS_CHUNK_BYTES}")
        p = self._pending.get(key)
        if p is None:
            p = self._pending[key] = _Pending(count=chunk.count)
        elif p.count != chunk.count:
            self._drop(key)
            raise TransferError(f"chunk count changed from {p.count} to {chunk.count}")
        p.touched = now
        if chunk.index not in p.parts:  # QoS 1 may deliver a chunk twice
            p.parts[chunk.index] = piece
            p.size += len(piece)
            self._bytes += len(piece)
        if len(p.parts) < p.count:
            self._evict(now)
            return None
        self._drop(key)
        data = b"".join(p.parts[i] for i in range(p.count))
        if hashlib.sha256(data).hexdigest() != chunk.sha256:
            raise TransferError(
                f"weights for job {chunk.job_id} round {chunk.round} do not match their SHA-256"
            )
        return AssembledWeights(chunk.job_id, chunk.round, chunk.sha256, data)


# --- The controller's side of the metrics topic ----------------------------------------------


@dataclass(frozen=True)
class RoundReady:
    """A round to record: its metrics and, when they arrived intact, its weights."""

    sender: str
    metrics: RoundMetrics
    weights: bytes | None


@dataclass(frozen=True)
class RunEnded:
    sender: str
    message: RunFinished


class AggregatorFeed:
    """Turns what arrives on `Topics.aggregator_metrics(...)` into rounds and run ends.

    A RoundMetrics that announces weights is held until its chunks are in (they follow it), then
    handed out with them; `expire()` hands out rounds whose weights did not arrive within
    `wait_for_weights_s` without them. A RunFinished first flushes its job's held rounds. A sender
    may only report on its own job (`agg-<job id>`): anything else is refused as `wrong_sender`.
    Payloads that are not valid raise PayloadError (count and drop them, as for any payload).
    """

    def __init__(
        self, *, assembler: WeightsAssembler | None = None, wait_for_weights_s: float = 120.0
    ) -> None:
        self._asm = assembler or WeightsAssembler()
        self._wait_s = wait_for_weights_s
        self._held: dict[tuple[str, str, int], tuple[RoundMetrics, float]] = {}
        self._early: dict[tuple[str, str, int, str], bytes] = {}  # weights that beat their metrics

    def feed(
        self, sender: str, payload: bytes | bytearray, *, now: float | None = None
    ) -> list[RoundReady | RunEnded]:
        now = time.monotonic() if now is None else now
        msg = decode_aggregator(payload)
        if sender != aggregator_id(msg.job_id):
            raise PayloadError("wrong_sender", f"{sender} may not report on job {msg.job_id}")
        out: list[RoundReady | RunEnded] = []
        if isinstance(msg, RoundMetrics):
            ref = msg.weights
            if ref is None:
                return [RoundReady(sender, msg, None)]
            early = self._early.pop((sender, msg.job_id, msg.round, ref.sha256), None)
            if early is not None:
                return [RoundReady(sender, msg, early)]
            self._held[(sender, msg.job_id, msg.round)] = (msg, now)
            return []
        if isinstance(msg, WeightsChunk):
            try:
                done = self._asm.add(msg, sender=sender, now=now)
            except TransferError as exc:
                log.warning("weights of job %s round %s dropped: %s", msg.job_id, msg.round, exc)
                return out
            if done is None:
                return out
            held = self._held.get((sender, msg.job_id, msg.round))
            if (
                held is not None
                and held[0].weights is not None
                and held[0].weights.sha256 == done.sha256
            ):
                del self._held[(sender, msg.job_id, msg.round)]
                return [RoundReady(sender, held[0], done.data)]
            if len(self._early) < 4:
                self._early[(sender, msg.job_id, msg.round, done.sha256)] = done.data
            return out
        for key in [k for k in self._held if k[0] == sender and k[1] == msg.job_id]:
            metrics, _ = self._held.pop(key)
            out.append(RoundReady(sender, metrics, None))
        out.append(RunEnded(sender, msg))
        return out

    def expire(self, *, now: float | None = None) -> list[RoundReady]:
        now = time.monotonic() if now is None else now
        out = []
        for key, (metrics, since) in list(self._held.items()):
            if now - since > self._wait_s:
                del self._held[key]
                log.warning(
                    "job %s round %s: weights did not arrive; recording the round without them",
                    metrics.job_id,
                    metrics.round,
                )
                out.append(RoundReady(key[0], metrics, None))
        return out
