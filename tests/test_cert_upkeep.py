"""The controller's own certificates renewed while it runs: a listener's certificate, its bus
identity and the managed broker's certificate, each reissued once due and taken into use with
no restart: connections made before go on, new ones see the new certificate.

Real TLS (asyncio servers, a real Mosquitto with an MQTT client connected through the renewal);
a certificate is made due by putting a 10-day one in its place."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
from cryptography import x509
from fedsky.controller.api.enroll_listener import ensure_server_cert
from fedsky.controller.bus.broker_config import prepare_broker_files, refresh_server_certificate
from fedsky.controller.bus.supervisor import ManagedBroker
from fedsky.controller.daemon import renew_controller_identity
from fedsky.controller.inventory import store as inventory
from fedsky.controller.security.pki import Pki
from fedsky.controller.security.upkeep import LiveCertificate, renew_due
from fedsky.controller.store import Store
from fedsky.shared.files import atomic_write
from fedsky.shared.tls import client_context

from tests.support import free_port, write_credentials
from tests.test_broker import _creds, _running


def _short_lived(pki: Pki, cert_file: Path, key_file: Path, **issue: object) -> int:
    issued = pki.issue(days=10, **issue)  # type: ignore[arg-type]
    assert issued.key_pem is not None
    atomic_write(key_file, issued.key_pem, mode=0o600)
    atomic_write(cert_file, issued.cert_pem, mode=0o644)
    return issued.serial


def _served_serial(port: int, client: ssl.SSLContext, name: str = "127.0.0.1") -> int:
    import socket

    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname=name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@contextlib.asynccontextmanager
async def _echo_server(ctx: ssl.SSLContext) -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(100):
                writer.write(data)
                await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(echo, "127.0.0.1", port, ssl=ctx)
    try:
        yield port
    finally:
        server.close()
        await server.wait_closed()


async def test_a_listener_certificate_is_renewed_in_place(pki: Pki, tmp_path: Path) -> None:
    store = Store(tmp_path / "controller.db")
    inventory.ensure_schema(store)  # the table of issued certificates
    cert_file, key_file = tmp_path / "api.crt", tmp_path / "api.key"
    old = _short_lived(pki, cert_file, key_file, common_name="127.0.0.1", kind="server")
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(str(cert_file), str(key_file))
    client = ssl.create_default_context(cafile=str(pki.ca_cert_path))
    listener = LiveCertificate(
        what="the API listener's certificate",
        renew=lambda: ensure_server_cert(
            pki=pki,
            store=store,
            names=["127.0.0.1"],
            cert_file=cert_file,
            key_file=key_file,
            config_key="api.public_names",
        ),
        cert_file=cert_file,
        key_file=key_file,
        context=served,
    )
    async with _echo_server(served) as port:
        assert await asyncio.to_thread(_served_serial, port, client) == old
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client)
        assert await renew_due([listener]) == ["the API listener's certificate"]
        new = await asyncio.to_thread(_served_serial, port, client)
        assert new != old
        until = x509.load_pem_x509_certificate(cert_file.read_bytes()).not_valid_after_utc
        assert until - datetime.now(UTC) > timedelta(days=300)
        # The connection made before the renewal goes on.
        writer.write(b"still here")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(10), 10) == b"still here"
        writer.close()
        assert await renew_due([listener]) == []  # not due again
    # The controller's bus identity, the same way (its client context reloaded in place).
    identity = pki.controller_identity
    _short_lived(pki, *identity, common_name="controller", kind="controller")
    assert renew_controller_identity(pki, store)
    assert not renew_controller_identity(pki, store)
    bus = client_context(ca_file=pki.ca_cert_path, cert_file=identity[0], key_file=identity[1])
    bus.load_cert_chain(str(identity[0]), str(identity[1]))


async def test_the_brokers_certificate_is_renewed_without_dropping_anyone(
    pki: Pki, broker_dir: Path, tmp_path: Path
) -> None:
    files = prepare_broker_files(
        pki=pki,
        broker_dir=broker_dir / "broker",
        host="127.0.0.1",
        port=free_port(),
        topic_prefix="fedsky/v1",
    )
    old = _short_lived(
        pki,
        files.cert_file,
        files.key_file,
        common_name="fedsky-broker",
        kind="server",
        dns_names=["localhost"],
        ip_addresses=["127.0.0.1", "::1"],
    )
    if files.group_id is not None:
        import os

        os.chown(files.key_file, -1, files.group_id)
        os.chmod(files.key_file, 0o640)
    broker = ManagedBroker(files=files)
    creds = _creds(pki, tmp_path)
    async with _running(broker):
        await broker.wait_ready(timeout=30)
        pid = broker.pid
        assert await asyncio.to_thread(_served_serial, files.port, creds.context) == old
        async with aiomqtt.Client(
            files.host, files.port, tls_context=creds.context, identifier="hospital-a"
        ) as connected:
            renewed = await renew_due(
                [
                    LiveCertificate(
                        what="the broker's certificate",
                        renew=lambda: refresh_server_certificate(files, pki),
                        cert_file=files.cert_file,
                        key_file=files.key_file,
                        reload=broker.reload_certificates,
                    )
                ]
            )
            assert renewed == ["the broker's certificate"]
            fresh = write_credentials(
                tmp_path / "fresh",
                pki.issue(common_name="hospital-b", kind="agent"),
                ca_pem=pki.ca_cert_pem,
            )

            async def serial_now() -> int:
                return await asyncio.to_thread(_served_serial, files.port, fresh.context)

            for _ in range(50):  # SIGHUP is handled in the broker's next loop pass
                if await serial_now() != old:
                    break
                await asyncio.sleep(0.1)
            assert await serial_now() != old
            # No restart, and the client connected before is still connected.
            assert broker.pid == pid
            await connected.publish("fedsky/v1/agents/hospital-a/up/status", b"{}", qos=1)
