"""The checkpoint store: files named by the SHA-256 of their content, written atomically.

Several rounds with identical weights share one file. `safetensors_header` checks that bytes
are a whole safetensors file without loading a tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsky.controller.models.errors import CheckpointCorrupted, NotFound

log = logging.getLogger(__name__)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def safetensors_header(data: bytes) -> dict[str, Any]:
    """Parse and check a safetensors header (no tensor is loaded): name -> dtype, shape, offsets.

    Raises ValueError when `data` is not a complete safetensors file.
    """
    if len(data) < 8:
        raise ValueError("too short to be a safetensors file")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8 or n > 100 << 20:
        raise ValueError("header length is beyond the end of the file")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    body = len(data) - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise ValueError(f"tensor {name!r} lies outside the file")
        end = max(end, offsets[1])
    if end != body:
        raise ValueError("the tensors do not fill the file (truncated or padded)")
    return header


@dataclass(frozen=True)
class BlobRef:
    sha256: str
    size: int


class BlobStore:
    """Files named by the SHA-256 of their content under `root/ab/abcd...`.

    Writes go to a temporary file in the same directory, are fsynced and renamed into place, so a
    reader never sees half a file and a crash leaves at most a `.tmp-*` file (swept at start).
    Writing content that is already there is a no-op (after checking the existing file).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def path(self, sha256: str) -> Path:
        if not _SHA_RE.match(sha256):
            raise ValueError("not a SHA-256 hex digest")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> BlobRef:
        sha = sha256_hex(data)
        target = self.path(sha)
        if target.exists():
            have, size = sha256_file(target)
            if have == sha and size == len(data):
                return BlobRef(sha, size)
            log.warning("checkpoint blob %s was damaged on disk; rewriting it", sha[:12])
        target.parent.mkdir(exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(target.parent)
        return BlobRef(sha, len(data))

    def read(self, sha256: str) -> bytes:
        """The blob's bytes, checked against its name."""
        try:
            data = self.path(sha256).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"checkpoint {sha256[:12]} is missing from the model store") from None
        if sha256_hex(data) != sha256:
            raise CheckpointCorrupted(
                f"checkpoint {sha256[:12]} in the model store no longer matches its SHA-256; "
                "it was damaged on disk and cannot be handed out"
            )
        return data

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def walk(self) -> Iterator[tuple[str, int]]:
        """Every stored blob as (sha256, size); temporary files are not blobs."""
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if _SHA_RE.match(f.name):
                    yield f.name, f.stat().st_size

    def sweep_temporaries(self) -> int:
        n = 0
        for tmp in self.root.glob("*/.tmp-*"):
            tmp.unlink(missing_ok=True)
            n += 1
        return n

    def total_bytes(self) -> int:
        return sum(size for _, size in self.walk())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
