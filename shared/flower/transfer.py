"""Moving a round's global weights over the bus in chunks, and putting them back together.

Plain functions and a small bounded class: no MQTT, no Flower, no torch. The aggregator splits,
the controller's consumer feeds every `WeightsChunk` it receives to one `WeightsAssembler` and
gets the whole file back, checked against its SHA-256, once the last piece is in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import time
from dataclasses import dataclass, field

from fedsky.shared.messages import WEIGHTS_CHUNK_BYTES, WeightsChunk, WeightsRef

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
            log.warning("dropping weights transfer for job %s round %s: over the bound", oldest[1], oldest[2])
            self._drop(oldest)

    def add(self, chunk: WeightsChunk, *, sender: str = "", now: float | None = None) -> AssembledWeights | None:
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
