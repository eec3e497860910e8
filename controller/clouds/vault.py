"""The credential vault: linked cloud accounts, their secrets encrypted at rest.

Secrets are sealed with AES-256-GCM under a key that never enters the database: it comes from
the environment (`FEDSKY_VAULT_KEY`, 32 bytes in base64) or from `<state_dir>/secrets/vault.key`
(made on first use, mode 0600 in a 0700 directory). A copy of the database alone therefore gives
nothing away. Each ciphertext is bound to its row (cloud and name are the associated data), so
sealed blobs cannot be swapped between rows, and each row names the key that sealed it, so a
wrong key is reported as such instead of as corrupt data.

Everything secret travels as `Secret`, whose repr and str are redacted: a secret that ends up in
a log line, an exception or a response by mistake shows up as `Secret(***)`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import secrets
import sqlite3
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from fedsky.controller.store import Store, transaction

log = logging.getLogger(__name__)

KEY_ENV = "FEDSKY_VAULT_KEY"
KEY_FILE = Path("secrets") / "vault.key"
_KEY_BYTES = 32
_NONCE_BYTES = 12
_BLOB_VERSION = b"\x01"

SCHEMA = [
    """
    CREATE TABLE clouds (
        name TEXT PRIMARY KEY,
        cloud TEXT NOT NULL,
        account TEXT NOT NULL,
        identity TEXT NOT NULL,
        region TEXT,
        key_hint TEXT NOT NULL,
        status TEXT NOT NULL,
        missing TEXT NOT NULL DEFAULT '[]',
        message TEXT NOT NULL DEFAULT '',
        created_at TEXT NOT NULL,
        validated_at TEXT NOT NULL,
        vault_key_id TEXT NOT NULL,
        sealed BLOB NOT NULL
    )
    """,
    "CREATE TABLE clouds_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
]


class VaultError(Exception):
    """The vault cannot be used as asked; the message is safe to show."""


class AccountNotLinked(VaultError):
    """No account of that name is in the vault."""


class AccountAlreadyLinked(VaultError):
    """An account of that name is in the vault already."""


class Secret:
    """Secret bytes whose repr and str never show them; `reveal()` is the one way in."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes | str) -> None:
        self._value = value.encode() if isinstance(value, str) else bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def reveal_str(self) -> str:
        return self._value.decode()

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(hashlib.sha256(self._value).digest())

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> NoReturn:
        # Pickling would write the value somewhere nobody meant it to go.
        raise TypeError("a Secret cannot be pickled")


@dataclass(frozen=True)
class VaultKey:
    key: Secret
    source: str  # "env" or the key file's path: says where to look, never what it holds

    @property
    def key_id(self) -> str:
        """A public fingerprint of the key (not derivable back to it)."""
        return hashlib.sha256(b"fedsky-vault-key-id\x00" + self.key.reveal()).hexdigest()[:16]


def _decode_key(text: str) -> bytes:
    text = text.strip()
    for decode in (base64.urlsafe_b64decode, base64.b64decode):
        try:
            raw = decode(text + "=" * (-len(text) % 4))
        except (binascii.Error, ValueError):
            continue
        if len(raw) == _KEY_BYTES:
            return raw
    raise VaultError(
        f"{KEY_ENV} is not a 32-byte key in base64; make one with `head -c 32 /dev/urandom | base64`"
    )


def load_vault_key(state_dir: Path, *, environ: Mapping[str, str] | None = None) -> VaultKey:
    """The vault key from `FEDSKY_VAULT_KEY`, else from the key file (created on first use).

    The key file must be the owner's alone: a key readable by others is refused, not fixed, so
    that an operator notices the exposure.
    """
    env = os.environ if environ is None else environ
    if env.get(KEY_ENV):
        return VaultKey(Secret(_decode_key(env[KEY_ENV])), "env")
    path = state_dir / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "wb") as fh:
            fh.write(base64.urlsafe_b64encode(os.urandom(_KEY_BYTES)) + b"\n")
        log.info("made a new vault key at %s", path)
    try:
        mode = path.stat().st_mode
        if stat.S_IMODE(mode) & 0o077:
            raise VaultError(
                f"vault key {path} is open to other users (mode {stat.S_IMODE(mode):04o}); "
                f"run `chmod 600 {path}` and consider the linked credentials exposed"
            )
        text = path.read_text()
    except OSError as exc:
        raise VaultError(f"cannot read the vault key {path}: {exc.strerror}") from None
    try:
        raw = _decode_key(text)
    except VaultError:
        raise VaultError(f"vault key {path} is not a 32-byte key in base64") from None
    return VaultKey(Secret(raw), str(path))


@dataclass(frozen=True)
class CloudRecord:
    """A linked cloud account, as `fedctl clouds list` shows it: nothing secret in here."""

    name: str
    cloud: str
    account: str
    identity: str
    region: str | None
    key_hint: str
    status: str  # ok | invalid | missing-permissions | unreachable
    missing: tuple[str, ...]
    message: str
    created_at: str
    validated_at: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cloud": self.cloud,
            "account": self.account,
            "identity": self.identity,
            "region": self.region,
            "key_hint": self.key_hint,
            "status": self.status,
            "missing": list(self.missing),
            "message": self.message,
            "created_at": self.created_at,
            "validated_at": self.validated_at,
        }


def _record(row: sqlite3.Row) -> CloudRecord:
    return CloudRecord(
        name=row["name"],
        cloud=row["cloud"],
        account=row["account"],
        identity=row["identity"],
        region=row["region"],
        key_hint=row["key_hint"],
        status=row["status"],
        missing=tuple(json.loads(row["missing"])),
        message=row["message"],
        created_at=row["created_at"],
        validated_at=row["validated_at"],
    )


def now_iso() -> str:
    return datetime.now(UTC).replace(microsecond=0).isoformat()


class Vault:
    """Linked clouds in the store; `add`/`secret` seal and open with the vault key."""

    def __init__(self, store: Store, key: VaultKey) -> None:
        self._store = store
        self._key = key
        self._aead = AESGCM(key.key.reveal())

    @staticmethod
    def ensure_schema(store: Store) -> None:
        store.ensure_schema("clouds", SCHEMA)

    def __repr__(self) -> str:
        return f"Vault(key_id={self._key.key_id}, source={self._key.source})"

    # -- sealing -------------------------------------------------------------------------------

    @staticmethod
    def _aad(cloud: str, name: str) -> bytes:
        return f"fedsky-vault/v1/{cloud}/{name}".encode()

    def seal(self, *, cloud: str, name: str, secret: Secret) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return (
            _BLOB_VERSION
            + nonce
            + self._aead.encrypt(nonce, secret.reveal(), self._aad(cloud, name))
        )

    def open(self, *, cloud: str, name: str, sealed: bytes, key_id: str) -> Secret:
        if key_id != self._key.key_id:
            raise VaultError(
                f"the credentials of {name!r} were sealed with another vault key "
                f"(id {key_id}, this controller has {self._key.key_id} from {self._key.source}); "
                "restore that key or link the account again"
            )
        if sealed[:1] != _BLOB_VERSION or len(sealed) < 1 + _NONCE_BYTES + 16:
            raise VaultError(
                f"the stored credentials of {name!r} are damaged; link the account again"
            )
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            return Secret(self._aead.decrypt(nonce, body, self._aad(cloud, name)))
        except InvalidTag:
            raise VaultError(
                f"the stored credentials of {name!r} do not decrypt (altered, or moved from "
                "another row); link the account again"
            ) from None

    # -- records -------------------------------------------------------------------------------

    async def add(self, record: CloudRecord, secret: Secret) -> None:
        sealed = self.seal(cloud=record.cloud, name=record.name, secret=secret)
        key_id = self._key.key_id

        def insert(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                if conn.execute("SELECT 1 FROM clouds WHERE name = ?", (record.name,)).fetchone():
                    raise AccountAlreadyLinked(
                        f"a cloud account named {record.name!r} is already linked"
                    )
                conn.execute(
                    "INSERT INTO clouds(name, cloud, account, identity, region, key_hint, status, "
                    "missing, message, created_at, validated_at, vault_key_id, sealed) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.name,
                        record.cloud,
                        record.account,
                        record.identity,
                        record.region,
                        record.key_hint,
                        record.status,
                        json.dumps(list(record.missing)),
                        record.message,
                        record.created_at,
                        record.validated_at,
                        key_id,
                        sealed,
                    ),
                )

        await self._store.run(insert)

    async def exists(self, name: str) -> bool:
        def query(conn: sqlite3.Connection) -> bool:
            return (
                conn.execute("SELECT 1 FROM clouds WHERE name = ?", (name,)).fetchone() is not None
            )

        return await self._store.run(query)

    async def list(self, cloud: str | None = None) -> list[CloudRecord]:
        def query(conn: sqlite3.Connection) -> list[CloudRecord]:
            if cloud is None:
                rows = conn.execute("SELECT * FROM clouds ORDER BY name").fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM clouds WHERE cloud = ? ORDER BY name", (cloud,)
                ).fetchall()
            return [_record(r) for r in rows]

        return await self._store.run(query)

    async def get(self, name: str) -> CloudRecord | None:
        def query(conn: sqlite3.Connection) -> CloudRecord | None:
            row = conn.execute("SELECT * FROM clouds WHERE name = ?", (name,)).fetchone()
            return None if row is None else _record(row)

        return await self._store.run(query)

    async def secret(self, name: str) -> tuple[CloudRecord, Secret]:
        def query(conn: sqlite3.Connection) -> sqlite3.Row | None:
            row: sqlite3.Row | None = conn.execute(
                "SELECT * FROM clouds WHERE name = ?", (name,)
            ).fetchone()
            return row

        row = await self._store.run(query)
        if row is None:
            raise AccountNotLinked(f"no cloud account named {name!r} is linked")
        record = _record(row)
        return record, self.open(
            cloud=record.cloud, name=name, sealed=bytes(row["sealed"]), key_id=row["vault_key_id"]
        )

    async def update_status(
        self,
        name: str,
        *,
        status: str,
        missing: tuple[str, ...],
        message: str,
        account: str | None = None,
        identity: str | None = None,
    ) -> CloudRecord:
        def update(conn: sqlite3.Connection) -> CloudRecord:
            with transaction(conn):
                row = conn.execute("SELECT * FROM clouds WHERE name = ?", (name,)).fetchone()
                if row is None:
                    raise AccountNotLinked(f"no cloud account named {name!r} is linked")
                conn.execute(
                    "UPDATE clouds SET status = ?, missing = ?, message = ?, validated_at = ?, "
                    "account = COALESCE(?, account), identity = COALESCE(?, identity) WHERE name = ?",
                    (
                        status,
                        json.dumps(list(missing)),
                        message,
                        now_iso(),
                        account,
                        identity,
                        name,
                    ),
                )
                return _record(
                    conn.execute("SELECT * FROM clouds WHERE name = ?", (name,)).fetchone()
                )

        return await self._store.run(update)

    async def remove(self, name: str) -> None:
        def delete(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                return conn.execute("DELETE FROM clouds WHERE name = ?", (name,)).rowcount

        if not await self._store.run(delete):
            raise AccountNotLinked(f"no cloud account named {name!r} is linked")

    async def meta(self, key: str, default: str) -> str:
        """A value kept beside the accounts (made once, then stable), e.g. the controller's uid."""

        def get_or_set(conn: sqlite3.Connection) -> str:
            with transaction(conn):
                row = conn.execute("SELECT value FROM clouds_meta WHERE key = ?", (key,)).fetchone()
                if row is not None:
                    return str(row["value"])
                conn.execute("INSERT INTO clouds_meta(key, value) VALUES (?, ?)", (key, default))
                return default

        return await self._store.run(get_or_set)
