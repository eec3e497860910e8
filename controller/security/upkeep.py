"""The controller's own certificates and the CRL, kept fresh while it runs for months.

Twice a day: the CRL is rewritten well before its next update (past it Mosquitto refuses every
client) and the managed broker reloads it; every certificate the controller serves or presents
(its bus identity, the API and enrolment listeners' certificates, the managed broker's) is
reissued once it has fewer than 30 days left, and taken into use without a restart: an
`ssl.SSLContext` the controller holds is reloaded in place (new handshakes present the new
certificate, established connections go on), and the broker is sent SIGHUP (Mosquitto 2.0
reloads its server certificate and key then).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 12 * 3600.0


@dataclass(frozen=True)
class LiveCertificate:
    """A certificate in use, how to renew it, and what takes the renewed one into use."""

    what: str  # for the log: "the API listener's certificate"
    renew: Callable[[], bool]  # blocking: reissue when due; True when it did
    cert_file: Path
    key_file: Path
    context: ssl.SSLContext | None = None  # reloaded in place
    reload: Callable[[], Awaitable[None]] | None = None  # e.g. the broker's SIGHUP


async def renew_due(certificates: Sequence[LiveCertificate]) -> list[str]:
    """Renew what is due and take it into use; what was renewed. A failure is logged and
    tried again at the next check; the others go on."""
    renewed = []
    for item in certificates:
        try:
            if not await asyncio.to_thread(item.renew):
                continue
            if item.context is not None:
                item.context.load_cert_chain(str(item.cert_file), str(item.key_file))
            if item.reload is not None:
                await item.reload()
        except Exception as exc:
            log.error("renewing %s failed (tried again later): %s", item.what, exc)
            continue
        log.info("renewed %s; in use without a restart", item.what)
        renewed.append(item.what)
    return renewed


async def keep_fresh(
    *,
    renew_crl: Callable[[], bool],
    reload_crl: Callable[[], Awaitable[None]] | None,
    certificates: Sequence[LiveCertificate],
    interval_s: float = CHECK_INTERVAL_S,
) -> None:
    """The daemon's timer: the CRL, then the certificates, every `interval_s`."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            if await asyncio.to_thread(renew_crl) and reload_crl is not None:
                await reload_crl()
        except Exception as exc:  # tried again at the next check
            log.error("renewing the certificate revocation list failed: %s", exc)
        await renew_due(certificates)
