"""Mosquitto's files rendered from the PKI, and the supervisor that keeps the broker running."""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import signal
import socket
import stat
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from fedsky.controller.bus.broker_config import (
    DYNSEC_COMMANDS,
    DYNSEC_RESPONSES,
    MAX_PACKET_SIZE,
    BrokerError,
    BrokerFiles,
    external_revocation_instructions,
    prepare_broker_files,
    render_acl,
    render_config,
)
from fedsky.controller.bus.supervisor import BrokerTimeout, ManagedBroker
from fedsky.controller.security.pki import Pki
from fedsky.shared.messages import MAX_PAYLOAD_BYTES
from fedsky.shared.retry import Backoff
from fedsky.shared.topics import ACL_USERNAME, Topics

from tests.support import ClientCredentials, eventually, free_port, write_credentials

ROOT = os.geteuid() == 0
FAST = Backoff(base_s=0.05, cap_s=0.2)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _files(
    pki: Pki, broker_dir: Path, *, port: int | None = None, public_names: Sequence[str] = ()
) -> BrokerFiles:
    return prepare_broker_files(
        pki=pki,
        broker_dir=broker_dir / "broker",
        host="127.0.0.1",
        port=port or free_port(),
        topic_prefix="fedsky/v1",
        public_names=public_names,
    )


def _creds(pki: Pki, tmp_path: Path, name: str = "hospital-a") -> ClientCredentials:
    issued = pki.issue(common_name=name, kind="agent")
    return write_credentials(tmp_path / "clients", issued, ca_pem=pki.ca_cert_pem)


async def _connects(files: BrokerFiles, creds: ClientCredentials) -> bool:
    try:
        async with (
            asyncio.timeout(5),
            aiomqtt.Client(files.host, files.port, tls_context=creds.context, timeout=3),
        ):
            return True
    except aiomqtt.MqttError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@asynccontextmanager
async def _running(broker: ManagedBroker) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(broker.run())
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises((asyncio.CancelledError, BrokerError)):
            await task


# --- rendering -----------------------------------------------------------------------------


def test_acl_gives_each_identity_only_its_subtree() -> None:
    acl = render_acl(topic_prefix="fedsky/v1")
    lines = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert lines == [
        "user controller",
        "topic read fedsky/v1/agents/+/up/#",
        "topic read fedsky/v1/aggregators/+/up/#",
        "topic write fedsky/v1/agents/+/down/#",
        "topic write $CONTROL/dynamic-security/v1",
        "topic read $CONTROL/dynamic-security/v1/response",
        "pattern write fedsky/v1/agents/%u/up/report",
        "pattern write fedsky/v1/agents/%u/up/status",
        "pattern write fedsky/v1/agents/%u/up/events",
        "pattern read fedsky/v1/agents/%u/down/#",
        "pattern write fedsky/v1/aggregators/%u/up/metrics",
        "pattern write fedsky/v1/aggregators/%u/up/status",
    ]
    # Nothing grants readwrite, nor anything outside the prefix.
    assert "readwrite" not in acl
    assert render_acl(topic_prefix="t1/v1/", controller_id="ctl").count("user ctl") == 1


def _acl_rules(acl: str) -> list[tuple[str | None, str, str]]:
    """(user, access, topic filter) per rule; user None for a `pattern` (every user)."""
    rules: list[tuple[str | None, str, str]] = []
    user: str | None = None
    for line in acl.splitlines():
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "user":
            user = rest
        else:
            access, _, topic = rest.partition(" ")
            rules.append((user if word == "topic" else None, access, topic))
    return rules


def _filter_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching: `+` is one level, a trailing `#` the rest (the parent level too)."""
    want, have = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return len(have) >= i
        if i >= len(have) or level not in ("+", have[i]):
            return False
    return len(want) == len(have)


def _allowed(acl: str, user: str, access: str, topic: str) -> bool:
    """What Mosquitto decides for `user`, whose `pattern` lines read `%u` as its name."""
    return any(
        rule_access in (access, "readwrite")
        and (rule_user in (None, user))
        and _filter_matches(
            topic_filter if rule_user is not None else topic_filter.replace(ACL_USERNAME, user),
            topic,
        )
        for rule_user, rule_access, topic_filter in _acl_rules(acl)
    )


def test_acl_is_spelled_by_the_topics_module() -> None:
    topics = Topics("t1/v1")
    acl = render_acl(topic_prefix="t1/v1/", controller_id="ctl")
    assert _acl_rules(acl) == [
        ("ctl", "read", topics.all_agents_up),
        ("ctl", "read", topics.all_aggregators_up),
        ("ctl", "write", topics.all_agents_down),
        ("ctl", "write", DYNSEC_COMMANDS),
        ("ctl", "read", DYNSEC_RESPONSES),
        (None, "write", topics.report(ACL_USERNAME)),
        (None, "write", topics.status(ACL_USERNAME)),
        (None, "write", topics.events(ACL_USERNAME)),
        (None, "read", topics.agent_down(ACL_USERNAME)),
        (None, "write", topics.aggregator_metrics(ACL_USERNAME)),
        (None, "write", topics.aggregator_status(ACL_USERNAME)),
    ]


def test_acl_lets_each_identity_use_exactly_its_own_topics() -> None:
    topics = Topics("fedsky/v1")
    acl = render_acl(topic_prefix="fedsky/v1")
    me, other, agg, other_agg = "hospital-a", "hospital-b", "agg-job1", "agg-job2"
    for sent in (topics.report, topics.status, topics.events):
        assert _allowed(acl, me, "write", sent(me))
        assert not _allowed(acl, me, "write", sent(other))
        assert _allowed(acl, "controller", "read", sent(me))
        assert topics.parse_up(sent(me)) is not None
    assert _allowed(acl, me, "read", topics.cmd(me))
    assert not _allowed(acl, me, "read", topics.cmd(other))
    # Only the controller may give the dynamic-security plugin commands (cut a session).
    assert not _allowed(acl, me, "write", DYNSEC_COMMANDS)
    assert not _allowed(acl, agg, "write", DYNSEC_COMMANDS)
    assert _allowed(acl, "controller", "write", DYNSEC_COMMANDS)
    assert not _allowed(acl, me, "write", topics.cmd(me))
    assert _allowed(acl, "controller", "write", topics.cmd(other))
    for sent in (topics.aggregator_metrics, topics.aggregator_status):
        assert _allowed(acl, agg, "write", sent(agg))
        assert not _allowed(acl, agg, "write", sent(other_agg))
        assert not _allowed(acl, me, "write", sent(agg))
        assert _allowed(acl, "controller", "read", sent(agg))
        assert topics.parse_up(sent(agg)) is not None
    # The controller's subscriptions are exactly what it may read.
    for subscription in (topics.all_agents_up, topics.all_aggregators_up):
        assert ("controller", "read", subscription) in _acl_rules(acl)
    assert not _allowed(acl, "controller", "read", "elsewhere/agents/hospital-a/up/report")


@pytest.mark.parametrize("prefix", ["", "a/+/b", "a/#", "a/%u", "a\nuser x"])
def test_acl_refuses_prefixes_that_would_widen_it(prefix: str) -> None:
    with pytest.raises(BrokerError):
        render_acl(topic_prefix=prefix)


def test_config_has_mutual_tls_and_limits(tmp_path: Path) -> None:
    conf = render_config(
        host="127.0.0.1",
        port=8883,
        ca_file=tmp_path / "ca.crt",
        cert_file=tmp_path / "server.crt",
        key_file=tmp_path / "server.key",
        crl_file=tmp_path / "crl.pem",
        acl_file=tmp_path / "acl",
        persistence_dir=tmp_path / "data",
        run_as="mosquitto",
    )
    lines = conf.splitlines()
    for needed in (
        "per_listener_settings true",
        "listener 8883 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "tls_version tlsv1.2",
        "log_dest stderr",
        "user mosquitto",
        f"persistence_location {tmp_path / 'data'}/",
        f"crlfile {tmp_path / 'crl.pem'}",
        f"acl_file {tmp_path / 'acl'}",
    ):
        assert needed in lines, needed
    # With per_listener_settings, security options count only after the listener line.
    assert lines.index("listener 8883 127.0.0.1") < lines.index("allow_anonymous false")
    assert MAX_PACKET_SIZE > MAX_PAYLOAD_BYTES
    assert f"max_packet_size {MAX_PACKET_SIZE}" in lines
    assert any(line.startswith("max_queued_messages ") for line in lines)
    assert any(line.startswith("max_queued_bytes ") for line in lines)
    assert "log_type debug" not in lines
    with pytest.raises(BrokerError):
        render_config(
            host="127.0.0.1",
            port=1,
            ca_file=Path("/x\nlistener 1883"),
            cert_file=tmp_path,
            key_file=tmp_path,
            crl_file=tmp_path,
            acl_file=tmp_path,
        )


def test_external_broker_instructions_say_copy_and_restart() -> None:
    text = external_revocation_instructions(crl_path=Path("/var/lib/fedsky/pki/crl.pem"))
    assert "/var/lib/fedsky/pki/crl.pem" in text
    assert "restart" in text
    assert "Mosquitto 2.0" in text


# --- files ---------------------------------------------------------------------------------


def test_prepared_files_are_readable_by_the_broker_and_nobody_else(
    pki: Pki, broker_dir: Path
) -> None:
    files = _files(pki, broker_dir)
    for path in (files.conf_file, files.acl_file, files.ca_file, files.cert_file, files.key_file):
        assert path.is_file()
    assert files.crl_file.read_bytes() == pki.crl_path.read_bytes()
    assert files.ca_file.read_bytes() == pki.ca_cert_pem
    assert files.persistence_dir is not None
    if ROOT:
        # Mosquitto drops to its own user before reading these: group mosquitto, no others.
        gid = grp.getgrnam("mosquitto").gr_gid
        assert (_mode(files.directory), files.directory.stat().st_gid) == (0o750, gid)
        for private in (files.key_file, files.acl_file, files.conf_file):
            assert (_mode(private), private.stat().st_uid, private.stat().st_gid) == (0o640, 0, gid)
        assert files.persistence_dir.stat().st_uid == pwd.getpwnam("mosquitto").pw_uid
        assert _mode(files.persistence_dir) == 0o700
        assert "user mosquitto" in files.conf_file.read_text().splitlines()
    else:
        assert _mode(files.directory) == 0o700
        assert _mode(files.key_file) == 0o600


def test_server_certificate_is_reused_while_valid_and_reissued_when_needed(
    pki: Pki, broker_dir: Path, tmp_path: Path
) -> None:
    first = _files(pki, broker_dir)
    cert = x509.load_pem_x509_certificate(first.cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    serial = cert.serial_number

    def serial_now() -> int:
        return x509.load_pem_x509_certificate(first.cert_file.read_bytes()).serial_number

    _files(pki, broker_dir)
    assert serial_now() == serial  # reused
    _files(pki, broker_dir, public_names=["broker.hospital.example"])
    assert serial_now() != serial  # a new name agents will use: reissued
    serial = serial_now()
    _files(pki, broker_dir, public_names=["broker.hospital.example"])
    assert serial_now() == serial
    new_ca = Pki.init(pki.directory, force=True)
    _files(new_ca, broker_dir, public_names=["broker.hospital.example"])
    assert serial_now() != serial  # the CA changed: the old certificate means nothing now
    new_ca.verify(first.cert_file.read_bytes())


def test_install_crl_copies_only_changes(pki: Pki, broker_dir: Path) -> None:
    files = _files(pki, broker_dir)
    assert files.install_crl() is False
    pki.write_crl([(1234, datetime.now(UTC))])
    assert files.install_crl() is True
    assert files.crl_file.read_bytes() == pki.crl_path.read_bytes()
    assert _mode(files.crl_file) == 0o644


async def test_unreachable_broker_directory_moves_to_a_runtime_directory(
    pki: Pki, broker_dir: Path, tmp_path: Path
) -> None:
    # A state directory of 0700 (pytest's tmp_path is one) stays closed to the broker's user.
    locked = tmp_path / "state"
    locked.mkdir(mode=0o700)
    runtime_root = broker_dir / "run"
    files = prepare_broker_files(
        pki=pki,
        broker_dir=locked / "broker",
        host="127.0.0.1",
        port=free_port(),
        topic_prefix="fedsky/v1",
        runtime_root=runtime_root,
    )
    if ROOT:
        assert files.directory.parent == runtime_root
        assert not (locked / "broker").exists()
        assert _mode(locked) == 0o700
        # The same broker_dir always maps to the same runtime directory (and pid file).
        again = prepare_broker_files(
            pki=pki,
            broker_dir=locked / "broker",
            host="127.0.0.1",
            port=files.port,
            topic_prefix="fedsky/v1",
            runtime_root=runtime_root,
        )
        assert again.directory == files.directory
    else:
        assert files.directory == locked / "broker"  # Mosquitto keeps our user
    broker = ManagedBroker(files=files, backoff=FAST)
    async with _running(broker):
        await broker.wait_ready(timeout=10)
        assert await _connects(files, _creds(pki, tmp_path))
    # The runtime copy holds the server key: it goes when the broker stops.
    assert files.runtime_copy == ROOT
    assert not files.key_file.exists() if ROOT else files.key_file.exists()


def test_runtime_directory_must_be_roots_alone(pki: Pki, broker_dir: Path, tmp_path: Path) -> None:
    locked = tmp_path / "state"
    locked.mkdir(mode=0o700)
    runtime_root = broker_dir / "run"
    runtime_root.mkdir()
    runtime_root.chmod(0o777)

    def prepare() -> BrokerFiles:
        return prepare_broker_files(
            pki=pki,
            broker_dir=locked / "b",
            host="127.0.0.1",
            port=1883,
            topic_prefix="fedsky/v1",
            runtime_root=runtime_root,
        )

    if ROOT:
        with pytest.raises(BrokerError, match="writable only by it"):
            prepare()
        runtime_root.chmod(0o700)  # safe, but closed to Mosquitto's user: nowhere to go
        with pytest.raises(BrokerError, match=r"can reach neither .* Run `chmod o\+x "):
            prepare()
    else:
        prepare()


# --- supervision ---------------------------------------------------------------------------


async def test_managed_broker_serves_and_stops_without_orphan(
    pki: Pki, broker_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="fedsky.controller.bus.supervisor")
    files = _files(pki, broker_dir)
    broker = ManagedBroker(files=files, backoff=FAST)
    async with _running(broker):
        await broker.wait_ready(timeout=10)  # called before run() had a chance to start
        pid = broker.pid
        assert pid is not None
        assert files.pid_file.read_text().strip() == str(pid)
        assert await _connects(files, _creds(pki, tmp_path))
    assert broker.pid is None
    assert not _alive(pid)
    assert not files.pid_file.exists()
    assert "mosquitto: mosquitto version" in caplog.text
    with pytest.raises(BrokerError, match="not running"):
        await broker.restart()


async def test_managed_broker_comes_back_after_being_killed(
    pki: Pki, broker_dir: Path, tmp_path: Path
) -> None:
    files = _files(pki, broker_dir)
    broker = ManagedBroker(files=files, backoff=FAST)
    creds = _creds(pki, tmp_path)
    async with _running(broker):
        await broker.wait_ready(timeout=10)
        first = broker.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await eventually(
            lambda: broker.ready and broker.pid not in (None, first),
            timeout=5,
            interval=0.02,
            what="the broker restarted",
        )
        assert broker.restarts == 1
        assert await _connects(files, creds)


async def test_crash_loop_gives_up_after_the_allowed_tries(pki: Pki, broker_dir: Path) -> None:
    files = _files(pki, broker_dir)
    broker = ManagedBroker(files=files, backoff=Backoff(base_s=0.01, cap_s=0.02, max_tries=1))
    task = asyncio.create_task(broker.run())
    await broker.wait_ready(timeout=10)
    for _ in range(2):
        pid = broker.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

        def over(old: int = pid) -> bool:
            return task.done() or (broker.ready and broker.pid not in (None, old))

        await eventually(over, timeout=5, interval=0.02, what="a restart or giving up")
    async with asyncio.timeout(5):
        with pytest.raises(BrokerError, match="giving up"):
            await task
    with pytest.raises(BrokerError, match="failed"):
        await broker.wait_ready(timeout=1)


async def test_restart_loads_a_new_crl(pki: Pki, broker_dir: Path, tmp_path: Path) -> None:
    files = _files(pki, broker_dir)
    broker = ManagedBroker(files=files, backoff=FAST)
    doomed = _creds(pki, tmp_path, "hospital-a")
    other = _creds(pki, tmp_path, "hospital-b")
    async with _running(broker):
        await broker.wait_ready(timeout=10)
        before = broker.pid
        assert await _connects(files, doomed)
        pki.write_crl([(doomed.serial, datetime.now(UTC))])  # the controller's revocation path
        await broker.restart(timeout=10)
        assert broker.pid not in (None, before)
        assert broker.restarts == 0  # asked for, not a crash
        assert not await _connects(files, doomed)
        assert await _connects(files, other)


async def test_first_start_failure_reports_the_brokers_reason(pki: Pki, broker_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        files = _files(pki, broker_dir, port=taken.getsockname()[1])
        broker = ManagedBroker(files=files, backoff=FAST)
        async with asyncio.timeout(10):
            with pytest.raises(BrokerError, match="Address already in use"):
                await broker.run()
    with pytest.raises(BrokerError):
        await broker.wait_ready(timeout=1)


async def test_missing_mosquitto_binary(pki: Pki, broker_dir: Path) -> None:
    broker = ManagedBroker(files=_files(pki, broker_dir), mosquitto_bin="/nonexistent/mosquitto")
    with pytest.raises(BrokerError, match="cannot run"):
        await broker.run()


async def test_wait_ready_times_out_when_nothing_runs(pki: Pki, broker_dir: Path) -> None:
    broker = ManagedBroker(files=_files(pki, broker_dir))
    with pytest.raises(BrokerTimeout):
        await broker.wait_ready(timeout=0.1)


async def test_a_broker_left_by_a_killed_controller_is_replaced(
    pki: Pki, broker_dir: Path, tmp_path: Path
) -> None:
    files = _files(pki, broker_dir)
    # What a SIGKILLed controller leaves: its child still holding the port, and the pid file.
    stale = subprocess.Popen(
        ["mosquitto", "-c", str(files.conf_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        files.pid_file.write_text(f"{stale.pid}\n")
        await eventually(
            lambda: _port_open(files.port),
            timeout=5,
            interval=0.02,
            what="the stale broker to listen",
        )
        broker = ManagedBroker(files=files, backoff=FAST)
        async with _running(broker):
            await broker.wait_ready(timeout=10)
            assert stale.poll() is not None  # stopped (and reaped by us, its parent here)
            assert broker.pid != stale.pid
            assert await _connects(files, _creds(pki, tmp_path))
    finally:
        if stale.poll() is None:
            stale.kill()
        stale.wait()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0
