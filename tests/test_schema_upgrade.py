"""The database moves forward on upgrade: `fedsky-controller --migrate` (what a package upgrade
runs) brings a database written before this release's last schema step of every part to this
release, keeping its rows; it is refused while a controller runs on the state.

"Before" is each part's schema without its newest step (for example no job owners, no browser
sessions), applied with the store's own versioning, as the previous release left it."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fedsky.controller.clouds import vault
from fedsky.controller.inventory import store as inventory
from fedsky.controller.jobs import store as jobs
from fedsky.controller.models import store as registry
from fedsky.controller.orchestrator import store as orchestrator
from fedsky.controller.security import audit, bootstrap_tokens, users
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import LOCK_NAME, Store

PARTS: list[tuple[str, Sequence[str]]] = [
    ("inventory", inventory.SCHEMA),
    (orchestrator.SCHEMA_PART, orchestrator._SCHEMA),
    ("jobs", jobs.SCHEMA),
    ("users", users.SCHEMA),
    ("audit", audit.SCHEMA),
    (registry.SCHEMA_PART, registry.SCHEMA),
    ("clouds", vault.SCHEMA),
    ("bootstrap_tokens", bootstrap_tokens.SCHEMA),
]


def _controller(tmp_path: Path) -> tuple[Path, Path]:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    config = tmp_path / "controller.toml"
    config.write_text(f'state_dir = "{state}"\n')
    return config, state


def _migrate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "fedsky-controller"),
            "--config",
            str(config),
            "--migrate",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_previous_releases_database_is_migrated_with_its_rows(tmp_path: Path) -> None:
    config, state = _controller(tmp_path)
    Pki.init(state / "pki")
    store = Store(state / "controller.db")
    for part, statements in PARTS:
        store.ensure_schema(part, statements[:-1] if len(statements) > 1 else statements)
    store.call(
        lambda conn: conn.execute(
            "INSERT INTO agents(id, location, enrolled_at) VALUES "
            "('hospital-x', 'aws:us-east-1', '2026-01-01T00:00:00+00:00')"
        )
    )
    store.close()
    done = _migrate(config)
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(state / "controller.db") as conn:
        versions = dict(conn.execute("SELECT part, version FROM schema_parts").fetchall())
        assert [r[0] for r in conn.execute("SELECT id FROM agents")] == ["hospital-x"]
        # This release's newest steps are there: job owners, browser sessions.
        assert "owner" in [r[1] for r in conn.execute("PRAGMA table_info(jobs)")]
        assert conn.execute("SELECT COUNT(*) FROM api_sessions").fetchone() == (0,)
    for part, statements in PARTS:
        assert versions[part] == len(statements), part
    assert "inventory" in done.stdout
    again = _migrate(config)  # nothing left to do
    assert again.returncode == 0, again.stderr


def test_migrate_is_refused_while_a_controller_runs(tmp_path: Path) -> None:
    config, state = _controller(tmp_path)
    fd = os.open(state / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        done = _migrate(config)
    finally:
        os.close(fd)
    assert done.returncode == 69
    assert "pid 4242" in done.stderr
