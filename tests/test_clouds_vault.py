"""The vault: a key kept apart from the database, sealed rows, secrets that never print."""

from __future__ import annotations

import base64
import os
import pickle
import stat
from pathlib import Path

import pytest
from fedsky.controller.clouds.vault import (
    KEY_ENV,
    CloudRecord,
    Secret,
    Vault,
    VaultError,
    load_vault_key,
    now_iso,
)
from fedsky.controller.store import Store

SECRET = b'{"secret_access_key": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYz1EXAMPLEK"}'


def _record(name: str = "prod") -> CloudRecord:
    now = now_iso()
    return CloudRecord(
        name=name,
        cloud="aws",
        account="123456789012",
        identity="arn:aws:iam::123456789012:user/fl",
        region="us-east-1",
        key_hint="...1234",
        status="ok",
        missing=(),
        message="",
        created_at=now,
        validated_at=now,
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "state" / "controller.db")
    Vault.ensure_schema(store)
    yield store
    store.close()


def test_secret_never_shows_itself() -> None:
    secret = Secret("hunter2-very-secret")
    for text in (repr(secret), str(secret), f"{secret}", repr([secret]), repr({"k": secret})):
        assert "hunter2" not in text
    assert secret.reveal_str() == "hunter2-very-secret"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(secret)


def test_key_file_is_made_once_owner_only_and_outside_the_database(tmp_path: Path) -> None:
    state = tmp_path / "state"
    key = load_vault_key(state, environ={})
    path = state / "secrets" / "vault.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    again = load_vault_key(state, environ={})
    assert again.key == key.key
    assert again.key_id == key.key_id
    encoded = base64.urlsafe_b64encode(key.key.reveal()).decode()
    assert path.read_text().strip() == encoded
    assert encoded not in repr(key)
    assert key.key.reveal().hex() not in repr(key)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    load_vault_key(state, environ={})
    path = state / "secrets" / "vault.key"
    path.chmod(0o644)
    with pytest.raises(VaultError, match=r"open to other users \(mode 0644\); run `chmod 600"):
        load_vault_key(state, environ={})


def test_key_from_the_environment(tmp_path: Path) -> None:
    raw = os.urandom(32)
    key = load_vault_key(tmp_path, environ={KEY_ENV: base64.b64encode(raw).decode()})
    assert key.key.reveal() == raw
    assert key.source == "env"
    assert not (tmp_path / "secrets").exists()
    with pytest.raises(VaultError, match="not a 32-byte key in base64"):
        load_vault_key(tmp_path, environ={KEY_ENV: "c2hvcnQ="})


async def test_sealed_at_rest_and_opened_with_the_key(store: Store, tmp_path: Path) -> None:
    vault = Vault(store, load_vault_key(tmp_path / "state", environ={}))
    await vault.add(_record(), Secret(SECRET))
    record, secret = await vault.secret("prod")
    assert secret.reveal() == SECRET
    assert (record.name, record.account, record.status) == ("prod", "123456789012", "ok")
    assert [r.name for r in await vault.list()] == ["prod"]
    store.call(lambda conn: conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    on_disk = b"".join(p.read_bytes() for p in store.path.parent.iterdir() if p.is_file())
    assert b"wJalrXUtnFEMI" not in on_disk
    assert b"secret_access_key" not in on_disk
    with pytest.raises(VaultError, match="already linked"):
        await vault.add(_record(), Secret(SECRET))


async def test_another_key_is_named_as_the_problem(store: Store, tmp_path: Path) -> None:
    await Vault(store, load_vault_key(tmp_path / "a", environ={})).add(_record(), Secret(SECRET))
    other = Vault(store, load_vault_key(tmp_path / "b", environ={}))
    with pytest.raises(VaultError, match="sealed with another vault key"):
        await other.secret("prod")


async def test_a_sealed_blob_moved_to_another_row_does_not_open(
    store: Store, tmp_path: Path
) -> None:
    vault = Vault(store, load_vault_key(tmp_path / "state", environ={}))
    await vault.add(_record("prod"), Secret(SECRET))
    await vault.add(_record("test"), Secret(b"{}"))
    store.call(
        lambda conn: conn.execute(
            "UPDATE clouds SET sealed = (SELECT sealed FROM clouds WHERE name = 'prod') WHERE name = 'test'"
        )
    )
    with pytest.raises(VaultError, match="do not decrypt"):
        await vault.secret("test")


async def test_status_updates_and_removal(store: Store, tmp_path: Path) -> None:
    vault = Vault(store, load_vault_key(tmp_path / "state", environ={}))
    await vault.add(_record(), Secret(SECRET))
    updated = await vault.update_status(
        "prod", status="missing-permissions", missing=("ec2:RunInstances",), message="m"
    )
    assert (updated.status, updated.missing) == ("missing-permissions", ("ec2:RunInstances",))
    await vault.remove("prod")
    assert await vault.list() == []
    with pytest.raises(VaultError, match="no cloud account named 'prod'"):
        await vault.remove("prod")
    assert await vault.meta("uid", "first") == "first"
    assert await vault.meta("uid", "second") == "first"
