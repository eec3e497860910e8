"""When the PKI's pieces expire: the CA, its CRL, the controller's own certificates and every
certificate issued and not revoked (`fedctl ca status`).

Past its CRL's next update Mosquitto refuses every client, and an expired agent certificate
takes a hospital off the bus: both are listed with the days left, the soonest first.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fedsky.controller.security.pki import Pki, PkiError, cert_info

WARN_WITHIN = timedelta(days=30)


@dataclass(frozen=True)
class Expiry:
    what: str  # "ca", "crl", "file", or the certificate's kind ("agent", "aggregator", ...)
    name: str
    not_after: datetime

    def to_json(self, now: datetime) -> dict[str, Any]:
        left = self.not_after - now
        state = "expired" if left <= timedelta(0) else "soon" if left < WARN_WITHIN else "ok"
        return {
            "what": self.what,
            "name": self.name,
            "not_after": self.not_after.isoformat(),
            "days_left": round(left.total_seconds() / 86400, 1),
            "state": state,
        }


def _issued(conn: sqlite3.Connection) -> list[Expiry]:
    """The newest certificate of each name that is not revoked."""
    rows = conn.execute(
        "SELECT common_name, kind, max(not_after) AS not_after FROM certificates "
        "WHERE revoked_at IS NULL GROUP BY common_name, kind"
    ).fetchall()
    return [
        Expiry(str(r["kind"]), str(r["common_name"]), datetime.fromisoformat(r["not_after"]))
        for r in rows
    ]


def ca_status(
    conn: sqlite3.Connection, *, pki: Pki, files: list[Path], now: datetime | None = None
) -> dict[str, Any]:
    """Everything with an expiry, soonest first, and whether any has expired."""
    now = now or datetime.now(UTC)
    entries = [Expiry("ca", "CA", pki.ca_not_after)]
    next_update = pki.crl_next_update
    if next_update is not None:
        entries.append(Expiry("crl", "revocation list (next update)", next_update))
    for path in files:
        try:
            info = cert_info(path.read_bytes())
        except (OSError, PkiError):
            continue  # not made (yet) on this controller
        entries.append(Expiry("file", path.name, info.not_after))
    entries += _issued(conn)
    shown = sorted((e.to_json(now) for e in entries), key=lambda e: e["days_left"])
    return {
        "certificates": shown,
        "expired": sum(e["state"] == "expired" for e in shown),
        "soon": sum(e["state"] == "soon" for e in shown),
    }
