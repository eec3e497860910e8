"""The enrolment listener: the routes aggregator VMs call, alone on their own TLS port.

The operator's API stays on its unix socket (or a private TCP address); a cloud VM reaches only
`POST /v1/aggregators/enroll` and then `GET /v1/aggregators/model` (with the bus certificate it
just got as its client certificate), here, at `clouds.enroll_listen`. The listener's certificate
comes from fedsky's CA and names the host of `clouds.enroll_url`: the VM's startup script checks
the listener against the CA certificate it carries, so no public CA is involved. The certificate is
issued once and reused while it covers that name and is valid for another 30 days.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fedsky.controller.api.clouds import make_enroll_app
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.security.enrollment import record_certificate
from fedsky.controller.security.pki import Pki, PkiError, write_private_key
from fedsky.controller.services import Services
from fedsky.controller.store import Store
from fedsky.shared.config import ConfigError
from fedsky.shared.files import atomic_write

log = logging.getLogger(__name__)

CERT_FILE = "enroll-listener.crt"
KEY_FILE = "enroll-listener.key"
CERT_DAYS = 365
RENEW_BEFORE = timedelta(days=30)


def listener_host(clouds: CloudsConfig) -> str:
    """The name the VMs use for the listener: `enroll_url`'s host; ConfigError if unusable."""
    url = clouds.enroll_url or ""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise ConfigError(
            f"clouds.enroll_url must be an https URL with a host when clouds.enroll_listen is set "
            f"(the VMs check the listener against fedsky's CA), not {url!r}"
        )
    return parts.hostname


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def _names(host: str) -> tuple[list[str], list[str]]:
    try:
        return [], [str(ipaddress.ip_address(host))]
    except ValueError:
        return [host.lower()], []


def _reusable(pki: Pki, cert_file: Path, key_file: Path, dns: list[str], ips: list[str]) -> bool:
    try:
        pem = cert_file.read_bytes()
        info = pki.verify(pem)
        cert = x509.load_pem_x509_certificate(pem)
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, PkiError, x509.ExtensionNotFound):
        return False
    if cert.public_key() != key.public_key():
        return False
    if info.not_after - datetime.now(UTC) < RENEW_BEFORE:
        return False
    have_dns = set(san.get_values_for_type(x509.DNSName))
    have_ips = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return set(dns) <= have_dns and set(ips) <= have_ips


def ensure_server_cert(
    *,
    pki: Pki,
    store: Store,
    names: list[str],
    cert_file: Path,
    key_file: Path,
    config_key: str,
) -> bool:
    """Issue (and record) a listener's certificate for `names` (host names or IP addresses)
    unless the one in `cert_file` still covers them for another 30 days; True when issued."""
    dns: list[str] = []
    ips: list[str] = []
    for name in names:
        more_dns, more_ips = _names(name)
        dns += more_dns
        ips += more_ips
    if _reusable(pki, cert_file, key_file, dns, ips):
        return False
    first = names[0]
    try:
        issued = pki.issue(
            common_name=first if len(first) <= 64 else "fedsky-listener",
            kind="server",
            dns_names=dns,
            ip_addresses=ips,
            days=CERT_DAYS,
        )
    except PkiError as exc:
        raise ConfigError(f"{config_key}: {exc}") from None
    assert issued.key_pem is not None
    write_private_key(key_file, issued.key_pem, overwrite=True)
    atomic_write(cert_file, issued.cert_pem, mode=0o644)
    store.call(record_certificate, issued)
    log.info("issued the certificate of %s for %s", cert_file.name, ", ".join(names))
    return True


def renew_listener_cert(*, pki: Pki, store: Store, clouds: CloudsConfig) -> bool:
    """Issue (and record) the listener's certificate when due; True when issued."""
    return ensure_server_cert(
        pki=pki,
        store=store,
        names=[listener_host(clouds)],
        cert_file=pki.directory / CERT_FILE,
        key_file=pki.directory / KEY_FILE,
        config_key="clouds.enroll_url",
    )


def listener_tls(*, pki: Pki, store: Store, clouds: CloudsConfig) -> ssl.SSLContext:
    """The listener's server context; issues (and records) its certificate when needed."""
    cert_file, key_file = pki.directory / CERT_FILE, pki.directory / KEY_FILE
    renew_listener_cert(pki=pki, store=store, clouds=clouds)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    # Enrolment needs no client certificate; the model file needs the aggregator's bus
    # certificate. One presented must chain to fedsky's CA (the route checks the rest).
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=pki.ca_cert_pem.decode())
    return ctx


async def serve_enroll(
    services: Services, *, listen: str, tls: ssl.SSLContext, started: asyncio.Event | None = None
) -> None:
    """Serve the enrolment routes on `listen` ("host:port") until cancelled."""
    runner = web.AppRunner(make_enroll_app(services), access_log=None)
    await runner.setup()
    try:
        host, port = split_listen(listen)
        await web.TCPSite(runner, host, port, ssl_context=tls).start()
        log.info("aggregator enrolment listening on https://%s", listen)
        if started is not None:
            started.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
