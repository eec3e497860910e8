"""The controller's state: one SQLite file (WAL, busy timeout, foreign keys, a schema version).

Every part of the controller keeps its tables here. A part declares its schema once with
`Store.ensure_schema(part, version, statements)`; the statements are applied in order the first
time (and when the part's version rises, only the new ones), inside one transaction.

SQLite stays off the event loop: `await store.run(fn, *args)` runs `fn(conn, *args)` in the
store's single writer thread with its own connection; writes that read first use
`BEGIN IMMEDIATE` (see `Store.transaction`). The synchronous API (`call`) is for CLIs and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_META_DDL = """
CREATE TABLE IF NOT EXISTS schema_parts (
    part TEXT PRIMARY KEY,
    version INTEGER NOT NULL
)
"""


class StoreError(Exception):
    """The state file cannot be opened or used."""


class StateInUse(StoreError):
    """Another controller already runs on this state directory."""


# The state directory holds the inventory, job logs, keys: its owner and group (the operators
# who use the API socket) may enter it, nobody else. The database file is the owner's alone.
STATE_DIR_MODE = 0o750
STATE_FILE_MODE = 0o600
LOCK_NAME = "controller.lock"


def secure_state_dir(path: Path) -> None:
    """Create `path` (and its parents) if missing and take away what others may do in it."""
    path.mkdir(parents=True, exist_ok=True, mode=STATE_DIR_MODE)
    mode = path.stat().st_mode & 0o777
    if mode & ~STATE_DIR_MODE:
        os.chmod(path, mode & STATE_DIR_MODE)


@contextlib.contextmanager
def state_lock(state_dir: Path) -> Iterator[None]:
    """One controller per state directory: an exclusive lock held while the block runs. The
    kernel drops it however the process ends (kill -9 too), so a crash never leaves it stale."""
    secure_state_dir(state_dir)
    path = state_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, STATE_FILE_MODE)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise StateInUse(
                f"another controller (pid {holder}) runs on the state directory {state_dir} "
                f"(it holds {path}); stop it first"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """`BEGIN IMMEDIATE` ... `COMMIT` (or `ROLLBACK` on error): reads in it see a stable state."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class Store:
    """One SQLite file, one writer thread."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Created (or tightened) owner-only before SQLite opens it; its -wal and -shm files
            # take the database file's mode.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, STATE_FILE_MODE))
            if self.path.stat().st_mode & 0o077:
                os.chmod(self.path, STATE_FILE_MODE)
            self._conn = _connect(self.path)
            self._conn.execute(_META_DDL)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open state file {self.path}: {exc}") from None
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsky-store")

    # -- schema --------------------------------------------------------------------------------

    def ensure_schema(self, part: str, statements: Sequence[str]) -> None:
        """Apply `statements[version:]` for `part`; the part's version is the count applied.

        Append new statements to evolve a part's schema; never edit or reorder old ones.
        """
        with self._lock, transaction(self._conn) as conn:
            row = conn.execute(
                "SELECT version FROM schema_parts WHERE part = ?", (part,)
            ).fetchone()
            have = int(row["version"]) if row else 0
            if have > len(statements):
                raise StoreError(
                    f"{self.path}: part {part!r} has schema version {have}, newer than this "
                    f"fedsky knows ({len(statements)}); upgrade fedsky"
                )
            for statement in statements[have:]:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_parts(part, version) VALUES (?, ?) "
                "ON CONFLICT(part) DO UPDATE SET version = excluded.version",
                (part, len(statements)),
            )

    # -- access --------------------------------------------------------------------------------

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(conn, *args, **kwargs)` now, serialised with every other use of the store.

        For start-up and command-line code, before or outside an event loop; a daemon's tasks
        use `run`, which keeps SQLite off the loop.
        """
        with self._lock:
            return fn(self._conn, *args, **kwargs)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run `fn(conn, *args, **kwargs)` in the store's thread, off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, functools.partial(self.call, fn, *args, **kwargs)
        )

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        with self._lock:
            self._conn.close()
