"""A consistent backup of what a controller cannot be rebuilt without, and its restore on a
fresh host (`fedctl backup create FILE`, `fedctl backup restore FILE`).

The backup holds the database (copied with SQLite's online backup: consistent while the
controller runs), the CA directory (the CA's key, its certificate and CRL, the controller's
own and its listeners' certificates), the cloud vault's key (`secrets/vault.key`, unless it
comes from `FEDSKY_VAULT_KEY`, which the operator keeps), the model signing key and the audit
log's signed head. Model checkpoints are not in it (they can be large; copy the models
directory as files). The file is a tar archive with a manifest of SHA-256 digests, written 0600
and never over an existing file: it holds the CA's private key, so keep it as you keep that.

A restore checks every digest before writing anything, refuses a state directory that already
holds a controller's database (unless `force`) and one a controller is running on (its lock),
and writes each file back with the mode it had (keys 0600).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsky.controller.store import secure_state_dir, state_lock

FORMAT = 1
MANIFEST = "manifest.json"
DB_NAME = "controller.db"
_MAX_MEMBER_BYTES = 8 * 1024 * 1024 * 1024


class BackupError(Exception):
    """The backup cannot be made or restored; the message says why."""


@dataclass(frozen=True)
class Sources:
    """What a controller's backup takes, as paths relative to its state directory where they
    are inside it (the models directory may be elsewhere)."""

    state_dir: Path
    signing_key: Path

    def files(self) -> list[tuple[str, Path]]:
        """(name in the archive, path) of every file but the database, those that exist."""
        out: list[tuple[str, Path]] = []
        pki = self.state_dir / "pki"
        if pki.is_dir():
            out += [(f"pki/{p.name}", p) for p in sorted(pki.iterdir()) if p.is_file()]
        for name in ("secrets/vault.key", "audit-head.json"):
            if (self.state_dir / name).is_file():
                out.append((name, self.state_dir / name))
        if self.signing_key.is_file():
            out.append(("models/signing.key", self.signing_key))
        return out


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(data))


def create_backup(sources: Sources, out: Path) -> dict[str, Any]:
    """Write the backup to `out` (which must not exist); returns its manifest."""
    db = sources.state_dir / DB_NAME
    if not db.is_file():
        raise BackupError(f"no controller database at {db}: nothing to back up")
    if out.exists():
        raise BackupError(f"{out} exists: a backup is never written over a file")
    entries: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedsky-backup-") as tmp:
        copy = Path(tmp) / DB_NAME
        source = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        target = sqlite3.connect(copy)
        try:
            source.backup(target)  # consistent even while the controller writes
        finally:
            target.close()
            source.close()
        files = [(DB_NAME, copy, 0o600)]
        files += [(name, path, path.stat().st_mode & 0o777) for name, path in sources.files()]
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
            for name, path, mode in files:
                data = path.read_bytes()
                entries.append({"name": name, "sha256": _digest(data), "mode": mode})
                _add(tar, name, data, mode)
            manifest = {"format": FORMAT, "created_at": time.time(), "files": entries}
            _add(tar, MANIFEST, json.dumps(manifest, indent=2).encode(), 0o644)
    return manifest


def _read(archive: Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members: dict[str, bytes] = {}
            for member in tar.getmembers():
                if not member.isfile() or member.size > _MAX_MEMBER_BYTES:
                    raise BackupError(f"{archive}: {member.name!r} is not a file this backup makes")
                handle = tar.extractfile(member)
                assert handle is not None
                members[member.name] = handle.read()
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise BackupError(f"{archive} is not a fedsky backup: {exc}") from None
    try:
        manifest = json.loads(members.pop(MANIFEST))
    except (KeyError, ValueError):
        raise BackupError(f"{archive} has no readable {MANIFEST}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{archive}: backup format {manifest.get('format')!r} is not {FORMAT}")
    listed = {e["name"]: e for e in manifest.get("files", [])}
    if set(listed) != set(members):
        raise BackupError(f"{archive}: its files and its manifest differ")
    for name, data in members.items():
        if _digest(data) != listed[name]["sha256"]:
            raise BackupError(f"{archive}: {name} does not have the digest its manifest names")
        if name.startswith("/") or ".." in Path(name).parts:
            raise BackupError(f"{archive}: {name!r} would land outside the state directory")
    return manifest, members


def restore_backup(
    archive: Path, *, state_dir: Path, signing_key: Path, force: bool = False
) -> list[str]:
    """Restore `archive` into `state_dir` (and the signing key where the config puts it);
    returns the names restored."""
    manifest, members = _read(archive)
    if (state_dir / DB_NAME).exists() and not force:
        raise BackupError(
            f"{state_dir} already holds a controller's database: restore into a fresh state "
            "directory, or give --force to replace it"
        )
    secure_state_dir(state_dir)
    modes = {e["name"]: int(e["mode"]) & 0o777 for e in manifest["files"]}
    with state_lock(state_dir):  # refuses while a controller runs on it
        # An old database's write-ahead log must not be replayed into the restored one.
        for stale in ("-wal", "-shm"):
            Path(f"{state_dir / DB_NAME}{stale}").unlink(missing_ok=True)
        for name, data in members.items():
            target = signing_key if name == "models/signing.key" else state_dir / name
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = target.with_name(target.name + ".restoring")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, modes[name] & 0o700)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, modes[name])
            os.replace(tmp, target)
    return sorted(members)
