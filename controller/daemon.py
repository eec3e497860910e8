"""`fedsky-controller --config controller.toml`: the operator's daemon.

One root TaskGroup: the managed broker (when `broker.managed`), the bus consumer, the stale-agent
sweeper and the HTTP API. SIGTERM or SIGINT cancels the group; every task is awaited on the way
out and the broker child is stopped. Exit codes: 0 clean stop, 78 bad config, 1 failure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import ssl
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from aiohttp import web
from fedsky.controller.api.app import make_app
from fedsky.controller.api.enroll_listener import (
    CERT_FILE as LISTENER_CERT_FILE,
)
from fedsky.controller.api.enroll_listener import (
    KEY_FILE as LISTENER_KEY_FILE,
)
from fedsky.controller.api.enroll_listener import (
    ensure_server_cert,
    listener_tls,
    renew_listener_cert,
    serve_enroll,
    split_listen,
)
from fedsky.controller.bus.broker_config import (
    BrokerError,
    prepare_broker_files,
    refresh_server_certificate,
)
from fedsky.controller.bus.consumer import ControllerBus
from fedsky.controller.bus.supervisor import ManagedBroker
from fedsky.controller.clouds.service import CloudService
from fedsky.controller.clouds.vault import Vault
from fedsky.controller.config import ControllerConfig, load_controller_config
from fedsky.controller.inventory import store as inventory
from fedsky.controller.inventory.service import InventoryIngest, ReportQuota
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.driver import JobManager
from fedsky.controller.models import store as registry_tables
from fedsky.controller.models.service import ModelManager
from fedsky.controller.monitoring.collector import make_registry, serve_metrics
from fedsky.controller.security import audit, bootstrap_tokens, users
from fedsky.controller.security.aggregators import AggregatorEnrolment
from fedsky.controller.security.audit import AuditTrail, HeadSigner
from fedsky.controller.security.enrollment import record_certificate, revoked_serials
from fedsky.controller.security.pki import Pki, PkiError, cert_info
from fedsky.controller.security.renewal import CertificateRenewal
from fedsky.controller.security.revocation import RevocationEnforcer
from fedsky.controller.security.upkeep import LiveCertificate, keep_fresh
from fedsky.controller.services import Services
from fedsky.controller.store import (
    StateInUse,
    Store,
    StoreError,
    secure_state_dir,
    state_lock,
)
from fedsky.shared import exitcodes
from fedsky.shared.config import ConfigError
from fedsky.shared.logs import setup_logging
from fedsky.shared.tls import client_context
from fedsky.shared.topics import Topics

log = logging.getLogger("fedsky.controller")

RENEW_BEFORE = timedelta(days=30)
API_CERT_FILE = "api-listener.crt"
API_KEY_FILE = "api-listener.key"


def ensure_controller_identity(pki: Pki, store: Store) -> tuple[Path, Path]:
    """The controller's own client certificate for the bus, renewed when it nears expiry."""
    renew_controller_identity(pki, store)
    return pki.controller_identity


def renew_controller_identity(pki: Pki, store: Store) -> bool:
    """Issue the controller's certificate unless it has another 30 days; True when issued."""
    cert_path, key_path = pki.controller_identity
    if cert_path.exists() and key_path.exists():
        info = cert_info(cert_path.read_bytes())
        if info.not_after - datetime.now(UTC) > RENEW_BEFORE:
            return False
    issued = pki.write_controller_identity()
    store.call(record_certificate, issued)
    return True


def open_parts(config: ControllerConfig) -> tuple[Store, Pki]:
    """Open the state (store, PKI) and declare every part's schema."""
    secure_state_dir(config.state_dir)
    try:
        pki = Pki.open(config.pki_dir)
    except PkiError as exc:
        raise ConfigError(f"{exc}") from None
    store = Store(config.db_path)
    inventory.ensure_schema(store)
    jobstore.ensure_schema(store)
    users.ensure_schema(store)
    audit.ensure_schema(store)
    store.ensure_schema(registry_tables.SCHEMA_PART, registry_tables.SCHEMA)
    Vault.ensure_schema(store)
    bootstrap_tokens.ensure_schema(store)
    _renew_crl(pki, store)
    return store, pki


def _renew_crl(pki: Pki, store: Store) -> bool:
    """Rewrite the CRL well before its next_update: past it, Mosquitto refuses every client.
    True when it was rewritten."""
    next_update = pki.crl_next_update
    if next_update is None or next_update - datetime.now(UTC) < RENEW_BEFORE:
        pki.write_crl(store.call(revoked_serials))
        log.info("certificate revocation list renewed")
        return True
    return False


def _live_certificates(
    *,
    config: ControllerConfig,
    pki: Pki,
    store: Store,
    broker: ManagedBroker | None,
    bus_context: ssl.SSLContext,
    api_context: ssl.SSLContext | None,
    enroll_context: ssl.SSLContext | None,
) -> list[LiveCertificate]:
    """Every certificate this controller presents, with what takes a renewed one into use."""
    cert, key = pki.controller_identity
    live = [
        LiveCertificate(
            what="the controller's bus certificate",
            renew=lambda: renew_controller_identity(pki, store),
            cert_file=cert,
            key_file=key,
            context=bus_context,
        )
    ]
    if api_context is not None:
        live.append(
            LiveCertificate(
                what="the API listener's certificate",
                renew=lambda: ensure_server_cert(
                    pki=pki,
                    store=store,
                    names=config.api.certificate_names(),
                    cert_file=pki.directory / API_CERT_FILE,
                    key_file=pki.directory / API_KEY_FILE,
                    config_key="api.public_names",
                ),
                cert_file=pki.directory / API_CERT_FILE,
                key_file=pki.directory / API_KEY_FILE,
                context=api_context,
            )
        )
    if enroll_context is not None:
        live.append(
            LiveCertificate(
                what="the enrolment listener's certificate",
                renew=lambda: renew_listener_cert(pki=pki, store=store, clouds=config.clouds),
                cert_file=pki.directory / LISTENER_CERT_FILE,
                key_file=pki.directory / LISTENER_KEY_FILE,
                context=enroll_context,
            )
        )
    if broker is not None:
        files = broker.files
        live.append(
            LiveCertificate(
                what="the broker's certificate",
                renew=lambda: refresh_server_certificate(files, pki, config.broker_public_names),
                cert_file=files.cert_file,
                key_file=files.key_file,
                reload=broker.reload_certificates,
            )
        )
    return live


async def _sweep_offline(store: Store, config: ControllerConfig) -> None:
    while True:
        await asyncio.sleep(config.inventory.sweep_interval_s)
        gone = await store.run(
            inventory.mark_stale_offline,
            now=datetime.now(UTC),
            offline_after_s=config.inventory.offline_after_s,
        )
        for agent_id in gone:
            log.warning(
                "agent %s sent nothing for %.0f s: marked offline",
                agent_id,
                config.inventory.offline_after_s,
            )


async def _sweep_cloud_orphans(clouds: CloudService, store: Store) -> None:
    """Terminate aggregators tagged by fedsky whose job has ended (e.g. after a crash)."""
    active = [j["id"] for j in await store.run(jobstore.list_jobs, states=jobstore.ACTIVE_STATES)]
    try:
        swept = await clouds.sweep_orphans(active)
    except Exception as exc:  # a cloud that cannot be reached must not stop the controller
        log.warning("sweeping orphaned aggregators failed: %s", exc)
        return
    for ref in swept:
        log.warning("terminated orphaned aggregator %s", ref)


def api_tls(*, pki: Pki, store: Store, config: ControllerConfig) -> ssl.SSLContext:
    """The network listener's server context (`[api] listen`), its certificate from the CA."""
    names = config.api.certificate_names()  # never empty: the config's check
    cert_file, key_file = pki.directory / API_CERT_FILE, pki.directory / API_KEY_FILE
    ensure_server_cert(
        pki=pki,
        store=store,
        names=names,
        cert_file=cert_file,
        key_file=key_file,
        config_key="api.public_names",
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return ctx


async def _serve_api(
    app: web.Application,
    config: ControllerConfig,
    started: asyncio.Event,
    tls: ssl.SSLContext | None,
) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        sock = config.api_socket
        sock.parent.mkdir(parents=True, exist_ok=True)
        if sock.exists() or sock.is_symlink():
            sock.unlink()
        await web.UnixSite(runner, str(sock)).start()
        os.chmod(sock, config.api.socket_mode)
        log.info("API listening on unix socket %s", sock)
        if tls is not None and config.api.listen:
            host, port = split_listen(config.api.listen)
            await web.TCPSite(runner, host, port, ssl_context=tls).start()
            log.info("API listening on https://%s (users' tokens)", config.api.listen)
        started.set()
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def serve(config: ControllerConfig, *, started: asyncio.Event | None = None) -> None:
    """Run the controller until cancelled; StateInUse when another runs on its state."""
    # Before anything else: a second controller must not touch the first one's broker, socket
    # or database.
    with state_lock(config.state_dir):
        await _serve(config, started=started)


async def _serve(config: ControllerConfig, *, started: asyncio.Event | None) -> None:
    store, pki = open_parts(config)
    started = started or asyncio.Event()
    try:
        cert, key = ensure_controller_identity(pki, store)
        topics = Topics(config.bus.topic_prefix)
        broker: ManagedBroker | None = None
        if config.broker.managed:
            files = prepare_broker_files(
                pki=pki,
                broker_dir=config.broker_dir,
                host=config.broker.host,
                port=config.broker.port,
                topic_prefix=config.bus.topic_prefix,
                public_names=config.broker_public_names,
            )
            broker = ManagedBroker(files=files, mosquitto_bin=config.broker.mosquitto_bin)
            ca_file = pki.ca_cert_path
        else:
            ca_file = config.broker.ca_file or pki.ca_cert_path
        bus_context = client_context(ca_file=ca_file, cert_file=cert, key_file=key)
        bus = ControllerBus(
            host=config.broker.connect_host,
            port=config.broker.port,
            tls_context=bus_context,
            topics=topics,
            inventory=InventoryIngest(
                store=store,
                history_per_agent=config.inventory.history_per_agent,
                history_bytes_per_agent=config.inventory.history_bytes_per_agent,
                quota=ReportQuota(
                    per_minute=config.inventory.reports_per_minute,
                    burst=config.inventory.report_burst,
                ),
            ),
            dynsec=broker is not None and broker.can_cut_sessions,
        )
        revocations = RevocationEnforcer(
            settings=config.broker, broker=broker, pki=pki, sessions=bus
        )
        models = ModelManager(
            store=store, root=config.registry.root(config.state_dir), config=config.registry
        )
        clouds = CloudService.open(config=config, store=store, pki=pki)
        aggregators = AggregatorEnrolment.open(config=config, store=store, pki=pki)
        trail = AuditTrail(
            store=store,
            signer=HeadSigner.load(
                path=config.state_dir / audit.HEAD_FILE, key_file=key, cert_file=cert
            ),
            ca_cert_pem=pki.ca_cert_pem,
        )
        jobs = JobManager(
            config=config,
            store=store,
            pki=pki,
            bus=bus,
            models=models,
            clouds=clouds,
            revocations=revocations,
            audit=trail,
        )
        services = Services(
            store=store,
            config=config,
            pki=pki,
            bus=bus,
            broker=broker,
            revocations=revocations,
            models=models,
            clouds=clouds,
            aggregators=aggregators,
            jobs=jobs,
            audit=trail,
        )
        renewals = CertificateRenewal(
            store=store,
            pki=pki,
            bus=bus,
            audit=services.audit,
            days=config.pki.agent_cert_days,
            min_interval=timedelta(seconds=config.pki.renewal_min_interval_s),
        )
        bus.add_event_listener(renewals.on_event)
        app = make_app(services)
        api_context = api_tls(pki=pki, store=store, config=config) if config.api.listen else None
        enroll_tls = (
            listener_tls(pki=pki, store=store, clouds=config.clouds)
            if config.clouds.enroll_listen
            else None
        )
        async with asyncio.TaskGroup() as tg:
            if broker is not None:
                tg.create_task(broker.run(), name="broker")
                await broker.wait_ready(timeout=30)
            tg.create_task(bus.run(), name="bus")
            tg.create_task(_sweep_cloud_orphans(clouds, store), name="cloud-orphan-sweep")
            tg.create_task(jobs.run(), name="jobs")
            tg.create_task(_sweep_offline(store, config), name="offline-sweeper")
            tg.create_task(
                keep_fresh(
                    renew_crl=lambda: _renew_crl(pki, store),
                    reload_crl=broker.reload_crl if broker is not None else None,
                    certificates=_live_certificates(
                        config=config,
                        pki=pki,
                        store=store,
                        broker=broker,
                        bus_context=bus_context,
                        api_context=api_context,
                        enroll_context=enroll_tls,
                    ),
                ),
                name="certificate-upkeep",
            )
            if enroll_tls is not None and config.clouds.enroll_listen:
                tg.create_task(
                    serve_enroll(services, listen=config.clouds.enroll_listen, tls=enroll_tls),
                    name="enroll-listener",
                )
            if config.metrics.listen:
                tg.create_task(
                    serve_metrics(
                        listen=config.metrics.listen,
                        registry=make_registry(store=store, bus=bus.stats),
                    ),
                    name="metrics",
                )
            tg.create_task(_serve_api(app, config, started, api_context), name="api")
    finally:
        store.close()


async def _main_async(config: ControllerConfig) -> None:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await serve(config)
    except asyncio.CancelledError:
        log.info("stopped")


def _raise_open_files_limit() -> None:
    # Every agent holds a connection to the managed broker, which inherits this limit: the
    # default soft limit (1,024) would cap a deployment at about a thousand hospitals.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _migrate(config: ControllerConfig) -> int:
    try:
        with state_lock(config.state_dir):
            store, _ = open_parts(config)
            try:
                versions = store.call(
                    lambda conn: conn.execute(
                        "SELECT part, version FROM schema_parts ORDER BY part"
                    ).fetchall()
                )
            finally:
                store.close()
    except (StoreError, ConfigError, OSError) as exc:
        print(f"fedsky-controller: {exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE if isinstance(exc, StateInUse) else exitcodes.FAILED
    parts = ", ".join(f"{row['part']} {row['version']}" for row in versions)
    print(f"schema of {config.db_path}: {parts}")
    return exitcodes.OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedsky-controller", description="Run the fedsky controller."
    )
    parser.add_argument("--config", required=True, help="controller.toml")
    parser.add_argument(
        "--migrate",
        action="store_true",
        help="bring the state's database to this release's schema and exit (a package "
        "upgrade runs it; refused while a controller runs on the state)",
    )
    args = parser.parse_args(argv)
    try:
        config = load_controller_config(args.config)
    except ConfigError as exc:
        print(f"fedsky-controller: {exc}", file=sys.stderr)
        return exitcodes.CONFIG
    if args.migrate:
        return _migrate(config)
    setup_logging(config.log_level, config.log_format)
    _raise_open_files_limit()
    try:
        asyncio.run(_main_async(config))
    except ConfigError as exc:
        log.error("%s", exc)
        return exitcodes.CONFIG
    except (StoreError, BrokerError) as exc:
        log.error("%s", exc)
        return exitcodes.FAILED
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
