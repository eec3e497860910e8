"""The enrolment listener: its certificate from the CA, reuse and renewal, and only one route."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import ClientSession, TCPConnector
from cryptography import x509
from fedsky.controller.api.enroll_listener import listener_tls, serve_enroll
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.config import load_controller_config
from fedsky.controller.inventory import store as inventory
from fedsky.controller.security.pki import Pki
from fedsky.controller.services import Services
from fedsky.controller.store import Store
from fedsky.shared.config import ConfigError

from tests.fakes.clouds import HealthSwitch, clouds_config, open_enrolment, open_service
from tests.support import free_port, make_csr


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(tmp_path / "controller.db")
    inventory.ensure_schema(store)  # the certificates table, as the daemon has it
    yield store
    store.close()


def _cert(pki: Pki) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki.directory / "enroll-listener.crt").read_bytes())


def _names(cert: x509.Certificate) -> set[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }


def test_the_certificate_names_the_url_host_and_is_reused_until_the_host_changes(
    pki: Pki, store: Store
) -> None:
    url = "https://enrol.example.org:8443/v1/aggregators/enroll"
    listener_tls(pki=pki, store=store, clouds=CloudsConfig(enroll_url=url))
    first = _cert(pki)
    pki.verify((pki.directory / "enroll-listener.crt").read_bytes())
    assert _names(first) == {"enrol.example.org"}
    assert ((pki.directory / "enroll-listener.key").stat().st_mode & 0o077) == 0

    listener_tls(pki=pki, store=store, clouds=CloudsConfig(enroll_url=url))
    assert _cert(pki).serial_number == first.serial_number

    listener_tls(
        pki=pki,
        store=store,
        clouds=CloudsConfig(enroll_url="https://198.51.100.4:8443/v1/aggregators/enroll"),
    )
    second = _cert(pki)
    assert second.serial_number != first.serial_number
    assert _names(second) == {"198.51.100.4"}


def test_the_listener_needs_an_https_url(pki: Pki, store: Store, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="must be an https URL"):
        listener_tls(
            pki=pki,
            store=store,
            clouds=CloudsConfig(enroll_url="http://127.0.0.1:8080/v1/aggregators/enroll"),
        )
    config = tmp_path / "controller.toml"
    config.write_text('[clouds]\nenroll_listen = "0.0.0.0:8443"\n')
    with pytest.raises(ConfigError, match="enroll_url is not"):
        load_controller_config(config)


async def test_the_listener_serves_the_enrolment_route_only_over_tls(
    pki: Pki, tmp_path: Path
) -> None:
    port = free_port()
    url = f"https://127.0.0.1:{port}/v1/aggregators/enroll"
    service, store = open_service(
        tmp_path / "state", pki, clouds_config(enroll_url=url), HealthSwitch()
    )
    tls = listener_tls(pki=pki, store=store, clouds=service.config)
    started = asyncio.Event()
    aggregators, _ = open_enrolment(tmp_path / "state", pki, store)
    services = Services(store=store, pki=pki, clouds=service, aggregators=aggregators)
    task = asyncio.create_task(
        serve_enroll(services, listen=f"127.0.0.1:{port}", tls=tls, started=started)
    )
    try:
        await asyncio.wait_for(started.wait(), 10)
        client_ctx = ssl.create_default_context(cadata=pki.ca_cert_pem.decode())
        async with ClientSession(connector=TCPConnector(ssl=client_ctx)) as http:
            _, csr = make_csr("agg-job-1")
            body = {
                "token": "fsk1_" + "A" * 43,
                "csr_pem": csr.decode(),
                "bus_csr_pem": csr.decode(),
            }
            async with http.post(url, json=body) as resp:
                assert resp.status == 403
                assert "invalid, used or expired" in json.loads(await resp.read())["error"]
            # The model file only to an aggregator's client certificate (test_clouds_bootstrap).
            async with http.get(f"https://127.0.0.1:{port}/v1/aggregators/model") as resp:
                assert resp.status == 403
            # The operator's API is not behind this listener.
            for path in ("/v1/health", "/v1/clouds", "/v1/jobs"):
                async with http.get(f"https://127.0.0.1:{port}{path}") as resp:
                    assert resp.status == 404, path
        # Another CA's client does not trust the listener.
        other = Pki.init(tmp_path / "other-ca")
        strict = ssl.create_default_context(cadata=other.ca_cert_pem.decode())
        async with ClientSession(connector=TCPConnector(ssl=strict)) as http:
            with pytest.raises(Exception, match="certificate verify failed"):
                await http.post(url, json={})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        store.close()
