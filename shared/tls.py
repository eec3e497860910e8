"""TLS contexts for the bus and the learning plane, all from fedsky's own CA."""

from __future__ import annotations

import ssl
from pathlib import Path


def client_context(*, ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A mutual-TLS client context that trusts only `ca_file`.

    Capped at TLS 1.2: under TLS 1.3 a broker that refuses the client's certificate does so after
    the handshake, and the client only sees a timeout; under 1.2 the refusal is immediate and
    names the reason. TLS 1.2 with the default cipher suites is still forward-secret and AEAD.
    """
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    ctx.check_hostname = True
    return ctx
