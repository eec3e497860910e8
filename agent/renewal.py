"""Renewing the agent's certificate before it expires, without enrolling again.

1. When the certificate has less than `[tls] renew_before_days` left, the agent makes a new key
   (`agent.key.next`, 0600) and sends a CSR for its own name in a `certificate_requested` event,
   over the bus session of its current certificate: that session is what vouches for it.
2. The controller signs it and answers with a `certificate_issued` command.
3. The agent checks the certificate as it checks an enrolment bundle (signed by its CA, for its
   name, a client certificate, valid now, for the pending key), then swaps key, certificate and
   installed bundle and reconnects with them.

The swap is two renames and two writes: the checked new bundle is written first
(`bundle.json.next`), so an agent that stops half-way completes the swap at its next start
(`complete_interrupted_renewal`) instead of holding a key without its certificate.
"""

from __future__ import annotations

import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from fedsky.shared.bundle import BundleError, EnrolmentBundle, read_bundle
from fedsky.shared.files import atomic_write

from .enroll import (
    EnrolError,
    InstallPaths,
    _load_key,
    _owner_of,
    csr_for,
    new_private_key,
    verify_bundle,
)

log = logging.getLogger(__name__)


class RenewalError(Exception):
    """A renewed certificate that cannot be installed; the message says why."""


def _next_key(paths: InstallPaths) -> Path:
    return paths.key_file.with_name(paths.key_file.name + ".next")


def _next_bundle(paths: InstallPaths) -> Path:
    return paths.bundle_file.with_name(paths.bundle_file.name + ".next")


def certificate_expiry(cert_file: Path) -> datetime:
    return x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc


def renewal_due(cert_file: Path, *, before: timedelta, now: datetime | None = None) -> bool:
    return certificate_expiry(cert_file) - (now or datetime.now(UTC)) < before


def request_renewal(paths: InstallPaths, *, agent_id: str) -> bytes:
    """A CSR for `agent_id` with the pending new key (made now if there is none)."""
    next_key = _next_key(paths)
    if next_key.exists():
        key = _load_key(next_key)
    else:
        key = new_private_key(next_key, owner=_owner_of(paths.state_dir))
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise RenewalError(f"{next_key} is not an EC key")
    return csr_for(agent_id, key)


def install_renewed(paths: InstallPaths, cert_pem: str) -> EnrolmentBundle:
    """Check `cert_pem` against the pending key and the installed bundle, then swap them in."""
    next_key = _next_key(paths)
    if not next_key.exists():
        raise RenewalError("no renewal is pending here (no new key waits for a certificate)")
    try:
        current = read_bundle(paths.bundle_file)
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
    except (BundleError, ValueError) as exc:
        raise RenewalError(f"the renewed certificate cannot be read: {exc}") from None
    renewed = current.model_copy(
        update={"cert_pem": cert_pem, "not_after": cert.not_valid_after_utc}
    )
    try:
        verify_bundle(renewed, _load_key(next_key))
    except EnrolError as exc:
        raise RenewalError(str(exc).replace("the bundle's", "the renewed")) from None
    owner = _owner_of(paths.state_dir)
    atomic_write(_next_bundle(paths), renewed.dump().encode(), mode=0o640, owner=owner)
    _finish(paths)
    return renewed


def _finish(paths: InstallPaths) -> None:
    next_key, next_bundle = _next_key(paths), _next_bundle(paths)
    bundle = read_bundle(next_bundle)
    if next_key.exists():
        os.replace(next_key, paths.key_file)
    owner = _owner_of(paths.state_dir)
    atomic_write(paths.cert_file, bundle.cert_pem.encode(), mode=0o644, owner=owner)
    atomic_write(paths.bundle_file, bundle.dump().encode(), mode=0o640, owner=owner)
    next_bundle.unlink()


def complete_interrupted_renewal(paths: InstallPaths) -> bool:
    """Finish a swap an earlier run began (its checked bundle is there); True if there was one."""
    if not _next_bundle(paths).exists():
        return False
    _finish(paths)
    log.warning("completed a certificate renewal the agent's previous run left half-done")
    return True
