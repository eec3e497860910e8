"""Every listener's bind and advertised address, validated when `controller.toml` loads; the
broker's advertised name in its certificate and in the hospitals' enrolment bundles."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from fedsky.controller.api.app import make_app
from fedsky.controller.bus.broker_config import prepare_broker_files
from fedsky.controller.bus.supervisor import ManagedBroker
from fedsky.controller.config import ControllerConfig, load_controller_config
from fedsky.controller.inventory import store as inventory
from fedsky.controller.security import users
from fedsky.controller.security.pki import Pki
from fedsky.controller.services import Services
from fedsky.controller.store import Store
from fedsky.shared.bundle import EnrolmentBundle
from fedsky.shared.config import ConfigError

from tests.support import free_port


def _load(tmp_path: Path, text: str) -> ControllerConfig:
    path = tmp_path / "controller.toml"
    path.write_text(f'state_dir = "state"\n{text}\n')
    return load_controller_config(path)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        # A wildcard bind needs the address the other machines are told.
        ('[broker]\nhost = "0.0.0.0"', "broker.public_host", "listens on every address"),
        ('[broker]\nhost = "::"', "broker.public_host", "must be set"),
        ('[aggregator]\nbind_host = "0.0.0.0"', "aggregator.advertise_host", "must be set"),
        ('[clouds]\nenroll_listen = "0.0.0.0:8443"', "clouds", "enroll_url is not"),
        # An advertised address is one specific host.
        ('[broker]\npublic_host = "0.0.0.0"', "broker.public_host", "is a wildcard"),
        ('[broker]\npublic_host = ""', "broker.public_host", "not be empty"),
        ('[aggregator]\nadvertise_host = "::"', "aggregator.advertise_host", "is a wildcard"),
        ('[aggregator]\nadvertise_host = "  "', "aggregator.advertise_host", "not be empty"),
        (
            '[aggregator]\nadvertise_host = "agg.example.org:9092"',
            "aggregator.advertise_host",
            "IP address or a DNS name",
        ),
        (
            '[clouds]\nenroll_url = "https://0.0.0.0:8443/v1/aggregators/enroll"',
            "clouds.enroll_url",
            "is a wildcard",
        ),
        ('[clouds]\nenroll_url = "ftp://ctl.example.org/x"', "clouds.enroll_url", "https URL"),
        (
            '[clouds]\nenroll_url = "http://ctl.example.org/x"\nenroll_listen = "127.0.0.1:8443"',
            "clouds",
            "must be an https URL",
        ),
        # A bind address is an IP literal or localhost.
        ('[broker]\nhost = "ctl.example.org"', "broker.host", "not a host name"),
        ('[broker]\nhost = ""', "broker.host", "bind address"),
        ('[aggregator]\nbind_host = "agg.local"', "aggregator.bind_host", "not a host name"),
        ('[aggregator]\nbind_host = "10.0.0.300"', "aggregator.bind_host", "bind address"),
        ('[clouds]\nenroll_listen = "ctl:8443"', "clouds.enroll_listen", "not a host name"),
        # The old plain-HTTP listener is refused with the reason; the TLS one needs its names.
        (
            '[api]\ntcp = "127.0.0.1:8080"',
            "api.tcp",
            "plain HTTP without authentication is not served",
        ),
        ('[api]\nlisten = "8443"', "api.listen", "must be host:port"),
        ('[api]\nlisten = "ctl:8443"', "api.listen", "not a host name"),
        ('[api]\nlisten = "0.0.0.0:8443"', "api", "give the names clients use"),
        ('[broker]\nmanaged = false\nhost = "0.0.0.0"', "broker.host", "to connect to"),
        # The operator's aggregator host.
        ('[aggregator.onprem]\nname = "hq"\nports = [9099, 9092]', "aggregator.onprem.ports", ""),
        ('[aggregator.onprem]\nname = "HQ site"', "aggregator.onprem.name", "pattern"),
        ("[aggregator.onprem]\nports = [9092, 9099]", "aggregator.onprem.name", "required"),
        ('[aggregator.onprem]\nname = "hq"\nport = 9092', "aggregator.onprem.port", "unknown"),
    ],
)
def test_a_bad_address_names_the_file_and_the_key(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        _load(tmp_path, text)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'controller.toml'}: key '{key}': "), message
    assert expected in message


def test_the_defaults_are_one_machine(tmp_path: Path) -> None:
    config = _load(tmp_path, "")
    assert (config.broker.host, config.broker_public_host) == ("127.0.0.1", "127.0.0.1")
    assert config.broker_public_names == []
    assert config.broker.connect_host == "127.0.0.1"
    assert (config.aggregator.bind_host, config.aggregator.advertised) == ("127.0.0.1",) * 2
    assert config.aggregator.onprem is None
    assert config.api.tcp is None
    assert config.clouds.enroll_listen is None


def test_hosts_on_their_own_machines(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        "\n".join(
            [
                "[broker]",
                'host = "0.0.0.0"',
                'public_host = "Controller.Example.org"',
                "[aggregator]",
                'bind_host = "::"',
                'advertise_host = "fd00::5"',
                "[aggregator.onprem]",
                'name = "hq-dc1"',
                "ports = [9100, 9109]",
                "[clouds]",
                'enroll_listen = "[::]:8443"',
                'enroll_url = "https://controller.example.org:8443/v1/aggregators/enroll"',
            ]
        ),
    )
    assert config.broker_public_host == "controller.example.org"
    assert config.broker_public_names == ["controller.example.org"]
    assert config.broker.connect_host == "127.0.0.1"  # the controller's own bus client
    assert config.aggregator.advertised == "fd00::5"
    assert config.aggregator.onprem is not None
    assert config.aggregator.onprem.ports == (9100, 9109)


# --- the broker's advertised name, end to end ---------------------------------------------------


def _handshake(
    address: tuple[str, int], name: str, *, ca: Path, cert: Path, key: Path
) -> ssl.SSLSocket | None:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(certfile=str(cert), keyfile=str(key))
    raw = socket.create_connection(address, timeout=5)
    try:
        return ctx.wrap_socket(raw, server_hostname=name)
    except ssl.SSLCertVerificationError:
        raw.close()
        return None


async def test_a_hospital_gets_the_brokers_public_host_and_the_broker_answers_to_it(
    tmp_path: Path, pki: Pki, broker_dir: Path
) -> None:
    port = free_port("127.0.0.2")
    config = _load(
        tmp_path,
        f'[broker]\nhost = "127.0.0.2"\nport = {port}\npublic_host = "broker.hq.test"',
    )
    # What the daemon does at start: the broker's files with every advertised name.
    files = prepare_broker_files(
        pki=pki,
        broker_dir=broker_dir / "broker",
        host=config.broker.host,
        port=config.broker.port,
        topic_prefix=config.bus.topic_prefix,
        public_names=config.broker_public_names,
    )
    store = Store(tmp_path / "controller.db")
    inventory.ensure_schema(store)
    client = TestClient(TestServer(make_app(Services(store=store, config=config, pki=pki))))
    token = store.call(users.add_user, name="ops", role=users.Role.ADMIN, created_by="test")
    await client.start_server()
    try:
        response = await client.post(
            "/v1/agents",
            json={"name": "hospital-a", "location": "aws:eu-west-1", "with_key": True},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status == 201, await response.text()
        body = await response.json()
    finally:
        await client.close()
        store.close()
    bundle = EnrolmentBundle.model_validate(body["bundle"])
    assert (bundle.broker_host, bundle.broker_port) == ("broker.hq.test", port)

    keys = tmp_path / "hospital-a"
    keys.mkdir()
    (keys / "ca.crt").write_text(bundle.ca_pem)
    (keys / "agent.crt").write_text(bundle.cert_pem)
    (keys / "agent.key").write_text(body["key_pem"])
    (keys / "agent.key").chmod(0o600)
    tls = {"ca": keys / "ca.crt", "cert": keys / "agent.crt", "key": keys / "agent.key"}

    broker = ManagedBroker(files=files)
    task = asyncio.create_task(broker.run())
    try:
        await broker.wait_ready(timeout=15)
        # The hospital connects to the bind address under the name its bundle gave it, with
        # the CA from the same bundle: the broker's certificate names it.
        sock = await asyncio.to_thread(_handshake, ("127.0.0.2", port), bundle.broker_host, **tls)
        assert sock is not None
        sock.close()
        assert (
            await asyncio.to_thread(_handshake, ("127.0.0.2", port), "other.hq.test", **tls) is None
        )
        with pytest.raises(ConnectionRefusedError):  # bound to 127.0.0.2 only
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert json.loads(bundle.dump())["broker_host"] == "broker.hq.test"
