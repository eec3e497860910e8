"""Writing files that others read: atomically, and with their final permissions from the start."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(
    path: Path,
    data: bytes,
    *,
    mode: int,
    group: int | None = None,
    owner: tuple[int, int] | None = None,
) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a mix.

    The file has `mode` (and `owner` or `group`) before its first byte is written: mkstemp
    creates it 0600, and fchmod/fchown run before the write, so a key is never readable by others
    even for a moment, whatever the umask.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if owner is not None:
                os.fchown(fh.fileno(), *owner)
            elif group is not None:
                os.fchown(fh.fileno(), -1, group)
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
