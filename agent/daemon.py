"""`fedsky-agent --config agent.toml`: the agent daemon.

One root TaskGroup holds the inventory poller (notices a VM state change and asks for a report at
once), the reporter (a full report at start, every `report_interval_s` and on request), the MQTT
link, the status server and, in test configurations only, the fault hook. Every libvirt and
psutil call runs in one single-thread executor, which also serialises the libvirt connection.
SIGTERM or SIGINT: publish the offline status, cancel the tasks, exit 0. A bad config exits 78
naming the file and the key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import ssl
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar, get_args

from fedsky.shared import exitcodes
from fedsky.shared.config import ConfigError
from fedsky.shared.logs import setup_logging
from fedsky.shared.messages import (
    CertificateIssuedCommand,
    Command,
    Event,
    PingCommand,
    PrepareTaskCommand,
    Report,
    StartTaskCommand,
    StopTaskCommand,
    TaskSummary,
    VmState,
    utcnow,
)
from fedsky.shared.retry import Backoff
from fedsky.shared.tls import client_context
from fedsky.shared.topics import Topics

from .config import (
    AgentConfig,
    Identity,
    default_config_path,
    load_agent_config,
    require_executor,
    resolve_identity,
)
from .inventory import FaultAction, HostProbe, InventoryError, LibvirtInventory
from .link import AgentLink
from .policy import ApprovalBook
from .renewal import (
    RenewalError,
    complete_interrupted_renewal,
    install_renewed,
    renewal_due,
    request_renewal,
)
from .runner import TaskRunner
from .status import AgentState, StatusError, StatusServer, resolve_group

log = logging.getLogger(__name__)

T = TypeVar("T")

_FAULT_ACTIONS: tuple[str, ...] = get_args(FaultAction)
_CERT_WARN_BEFORE = timedelta(days=30)
# A renewal asked for and not answered (the controller was away) is asked again after this.
_RENEWAL_RETRY_S = 3600.0
# How soon a decision IT takes with agentctl reaches the controller.
APPROVAL_POLL_S = 1.0


def _remove_socket(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("fedsky")
    except Exception:
        return ""


class AgentDaemon:
    """The running agent. `run(stop=...)` returns after `stop` is set and everything has stopped."""

    def __init__(
        self,
        *,
        config: AgentConfig,
        identity: Identity,
        status_gid: int | None = None,
        rtt_source: Callable[[], Mapping[str, float]] | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        # One worker thread for every blocking call: libvirt's connection is not shared between
        # threads, and the agent's footprint stays small.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedsky-agent-io")
        self.inventory = LibvirtInventory(uri=config.libvirt.uri)
        self._host: HostProbe | None = None
        # The RTT prober (agent/rtt_probe.py) plugs in here: a cheap call returning its latest
        # measurements in ms by `cloud:region`.
        self._rtt_source = rtt_source
        self._measured_rtt: dict[str, float] = {}
        if rtt_source is None and config.rtt_probe.targets:
            self._rtt_source = lambda: self._measured_rtt
        self.state = AgentState(
            agent_id=identity.agent_id,
            location=identity.location,
            cert_not_after=identity.cert_not_after,
            broker_address=f"{identity.broker_host}:{identity.broker_port}",
            libvirt_uri=config.libvirt.uri,
        )
        self.link = AgentLink(
            agent_id=identity.agent_id,
            host=identity.broker_host,
            port=identity.broker_port,
            topics=Topics(identity.topic_prefix),
            tls=self._tls_context,
            state=self.state,
            on_command=self.handle_command,
            backoff=Backoff(
                base_s=config.broker.reconnect_base_s, cap_s=config.broker.reconnect_cap_s
            ),
            keepalive_s=config.broker.keepalive_s,
            timeout_s=config.broker.timeout_s,
            session_expiry_s=config.broker.session_expiry_s,
            version=_version(),
        )
        self.status_server = StatusServer(
            state=self.state,
            socket_path=config.status_socket,
            state_file=config.status_file,
            mode=config.status.mode,
            gid=status_gid,
            run_blocking=self.blocking,
        )
        self.runner = TaskRunner(
            agent_id=identity.agent_id,
            work_dir=config.tasks_dir,
            datasets=dict(config.datasets),
            executor_config=config.task_executor,
            one_box=config.one_box,
            vms=config.vms,
            known_hosts_file=config.known_hosts_file,
            payload=config.payload_source,
            blocking=self.blocking,
            snapshot=self.inventory.snapshot,
            emit=self.link.emit,
            on_change=self._task_changed,
            policy=config.policy,
            approvals=(
                ApprovalBook(config.approvals_file) if config.policy.approval == "manual" else None
            ),
        )
        self._seq = 0
        self._report_now = asyncio.Event()
        self._known_states: dict[str, VmState] | None = None
        self._inventory_error_logged: str | None = None

    def _tls_context(self) -> ssl.SSLContext:
        return client_context(
            ca_file=self.config.ca_file,
            cert_file=self.config.cert_file,
            key_file=self.config.key_file,
        )

    async def blocking(self, fn: Callable[[], T]) -> T:
        """Run `fn` in the agent's one worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # --- commands -----------------------------------------------------------------------------

    async def handle_command(self, command: Command) -> None:
        """Valid, unexpired commands from the link.

        Task commands (issue 4) go to the task runner from here; the link stays transport only.
        """
        if isinstance(command, PingCommand):
            self.link.emit(
                Event(agent_id=self.identity.agent_id, kind="pong", command_id=command.command_id)
            )
            log.debug("ping %s answered", command.command_id)
            return
        if isinstance(command, PrepareTaskCommand | StartTaskCommand | StopTaskCommand):
            await self.runner.handle(command)
            return
        if isinstance(command, CertificateIssuedCommand):
            await self._install_renewed(command)
            return
        self.link.emit(self.link.rejection(command, "this agent does not support this command"))

    # --- certificate renewal (agent/renewal.py) -----------------------------------------------

    async def _renewer(self) -> None:
        """Ask for a new certificate once the current one nears its end; again after an hour
        without an answer."""
        section = self.config.tls
        before = timedelta(days=section.renew_before_days)
        asked_at: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            try:
                due = await self.blocking(lambda: renewal_due(self.config.cert_file, before=before))
                if due and (asked_at is None or loop.time() - asked_at >= _RENEWAL_RETRY_S):
                    csr = await self.blocking(
                        lambda: request_renewal(
                            self.config.install_paths, agent_id=self.identity.agent_id
                        )
                    )
                    self.link.emit(
                        Event(
                            agent_id=self.identity.agent_id,
                            kind="certificate_requested",
                            csr_pem=csr.decode(),
                        )
                    )
                    asked_at = loop.time()
                    log.info("asked the controller to renew the agent's certificate")
            except Exception as exc:  # a file that cannot be read: say so, try again later
                log.error("certificate renewal: %s", exc)
            await asyncio.sleep(section.renew_check_s)

    async def _install_renewed(self, command: CertificateIssuedCommand) -> None:
        try:
            bundle = await self.blocking(
                lambda: install_renewed(self.config.install_paths, command.cert_pem)
            )
        except (RenewalError, OSError) as exc:
            log.error("refused the renewed certificate: %s", exc)
            self.link.emit(self.link.rejection(command, f"renewed certificate refused: {exc}"))
            return
        self.identity = dataclasses.replace(self.identity, cert_not_after=bundle.not_after)
        self.state.cert_not_after = bundle.not_after
        self.state.touch()
        log.info(
            "installed the renewed certificate (valid until %s); reconnecting with it",
            bundle.not_after.isoformat(),
        )
        self.link.reconnect()

    def _task_changed(self, summary: TaskSummary | None) -> None:
        self.state.task = summary
        self.state.touch()
        self.request_report()

    # --- reports ------------------------------------------------------------------------------

    def request_report(self) -> None:
        """Report at once (a VM changed state, or a task event wants fresh inventory)."""
        self._report_now.set()

    async def report_once(self) -> Report | None:
        """Read the inventory and hand a report to the link; None if libvirt could not be read."""
        if self._host is None:
            self._host = await self.blocking(lambda: HostProbe(disk_path=self.config.state_dir))
        host_probe = self._host
        try:
            vms = await self.blocking(self.inventory.snapshot)
        except InventoryError as exc:
            # No report rather than one with no VMs: the controller would take an empty list
            # to mean that every VM is gone.
            message = str(exc)
            self.state.inventory_error = message
            self.state.touch()
            if message != self._inventory_error_logged:
                self._inventory_error_logged = message
                log.error("%s; no report until libvirt answers again", message)
            return None
        if self._inventory_error_logged is not None:
            log.info("libvirt at %s answers again", self.config.libvirt.uri)
            self._inventory_error_logged = None
        host = await self.blocking(host_probe.snapshot)
        now = utcnow()
        rtt = dict(self._rtt_source()) if self._rtt_source is not None else {}
        report = Report(
            agent_id=self.identity.agent_id,
            seq=self._seq,
            sent_at=now,
            host=host,
            vms=vms,
            task=self.state.task,
            rtt_ms=rtt,
        )
        self._seq += 1
        self._known_states = {vm.uuid: vm.state for vm in vms}
        # The poller only sees changes after the last report: a VM that stopped between a poll
        # and this report must still stop its task here.
        await self.runner.check_vm_states(self._known_states)
        self.state.vms = vms
        self.state.host = host
        self.state.inventory_at = now
        self.state.inventory_error = None
        self.link.offer_report(report)
        return report

    async def _reporter(self) -> None:
        interval = self.config.report_interval_s
        while True:
            self._report_now.clear()
            await self.report_once()
            with contextlib.suppress(TimeoutError):
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
                # that arrives together with the event.
                async with asyncio.timeout(interval):
                    await self._report_now.wait()

    async def _poller(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval_s)
            try:
                states = await self.blocking(self.inventory.states)
            except InventoryError:
                continue  # the reporter logs it and records it in the status
            known = self._known_states
            if known is not None and states != known:
                changed = sorted(
                    f"{uuid}: {known.get(uuid, 'new')} -> {states.get(uuid, 'gone')}"
                    for uuid in set(known) | set(states)
                    if known.get(uuid) != states.get(uuid)
                )
                log.info("VM state changed (%s); reporting now", ", ".join(changed))
                self._known_states = states
                self.request_report()
                await self.runner.check_vm_states(states)

    # --- the test fault hook ------------------------------------------------------------------

    async def _fault_hook(self, path: Path) -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            answer: dict[str, Any]
            try:
                async with asyncio.timeout(5.0):
                    line = await reader.readline()
                request = json.loads(line[:4096])
                action, vm = request.get("action"), request.get("vm")
                if action not in _FAULT_ACTIONS or not isinstance(vm, str):
                    raise ValueError(f"expected {{'action': one of {_FAULT_ACTIONS}, 'vm': NAME}}")
                state = await self.blocking(
                    lambda: self.inventory.apply_fault(action=action, vm=vm)
                )
                log.warning("fault hook: %s %s -> %s", action, vm, state)
                answer = {"ok": True, "state": state}
            except (ValueError, InventoryError, TimeoutError, AttributeError) as exc:
                answer = {"ok": False, "error": str(exc)}
            try:
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
            finally:
                writer.close()

        await asyncio.to_thread(_remove_socket, path)
        server = await asyncio.start_unix_server(serve, path=str(path))
        await asyncio.to_thread(path.chmod, 0o600)
        log.warning("TEST fault hook listening on %s: never enable [test] in production", path)
        try:
            await asyncio.Future()  # serve until cancelled
        finally:
            server.close()
            _remove_socket(path)

    # --- life cycle ---------------------------------------------------------------------------

    async def _approvals(self) -> None:
        """Answer waiting tasks as soon as IT decides (`agentctl jobs approve|deny` writes the
        approvals file; a decision taken while the agent was down is answered at start)."""
        while True:
            try:
                await self.runner.resume_decided()
            except Exception:
                log.exception("reading the approvals file %s", self.config.approvals_file)
            await asyncio.sleep(APPROVAL_POLL_S)

    async def _rtt_prober(self) -> None:
        from fedsky.agent.rtt_probe import probe_rtt

        section = self.config.rtt_probe
        while True:
            measured = await probe_rtt(targets=section.targets, timeout_s=section.timeout_s)
            if measured != self._measured_rtt:
                self._measured_rtt = measured
                self.request_report()
            await asyncio.sleep(section.interval_s)

    async def run(self, *, stop: asyncio.Event) -> None:
        """Run until `stop` is set; StatusError if the status socket cannot be served."""
        try:
            server = await self.status_server.start()
            await self.runner.reap_leftovers()
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.status_server.run(server), name="status"),
                    tg.create_task(self.link.run(), name="link"),
                    tg.create_task(self._reporter(), name="reporter"),
                    tg.create_task(self._poller(), name="inventory-poller"),
                    tg.create_task(self._renewer(), name="certificate-renewal"),
                ]
                if self.config.metrics.listen:
                    from .metrics import serve_metrics

                    tasks.append(
                        tg.create_task(
                            serve_metrics(listen=self.config.metrics.listen, state=self.state),
                            name="metrics",
                        )
                    )
                if self.config.policy.approval == "manual":
                    tasks.append(tg.create_task(self._approvals(), name="approvals"))
                if self.config.rtt_probe.targets and self._rtt_source is not None:
                    tasks.append(tg.create_task(self._rtt_prober(), name="rtt-probe"))
                if self.config.test is not None and self.config.test.fault_socket is not None:
                    tasks.append(
                        tg.create_task(
                            self._fault_hook(self.config.test.fault_socket), name="fault-hook"
                        )
                    )
                await stop.wait()
                log.info("stopping")
                await self.runner.close()
                await self.link.close()
                for task in tasks:
                    task.cancel()
                # Libraries may still use 3.11's wait_for, which can swallow a cancellation
                # that races with a result: insist until every task has ended.
                while pending := [t for t in tasks if not t.done()]:
                    await asyncio.wait(pending, timeout=1.0)
                    for task in pending:
                        task.cancel()
        finally:
            with contextlib.suppress(Exception):
                await self.blocking(self.inventory.close)
            self._executor.shutdown(wait=False, cancel_futures=True)


async def run_agent(*, config: AgentConfig, identity: Identity, status_gid: int | None) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    now = utcnow()
    if identity.cert_not_after <= now:
        log.error(
            "the agent's certificate expired at %s: the broker will refuse it; re-enrol",
            identity.cert_not_after.isoformat(),
        )
    elif identity.cert_not_after - now < _CERT_WARN_BEFORE:
        log.warning(
            "the agent's certificate expires at %s: it is renewed over the bus while the "
            "controller answers (else re-enrol)",
            identity.cert_not_after.isoformat(),
        )
    daemon = AgentDaemon(config=config, identity=identity, status_gid=status_gid)
    executor = config.task_executor
    where = "inside the VMs over SSH"
    if executor is not None and executor.kind == "local":
        where = "on this host (one-box mode)"
    log.info(
        "agent %s (%s) starting: libvirt %s, broker %s, SuperNodes run %s (%s executor)",
        identity.agent_id,
        identity.location,
        config.libvirt.uri,
        daemon.link.address,
        where,
        executor.kind if executor is not None else "no",
    )
    await daemon.run(stop=stop)
    log.info("stopped")


def _complete_renewal(config: AgentConfig) -> None:
    """Finish a certificate swap a stopped run left half-done, before the identity is read."""
    try:
        complete_interrupted_renewal(config.install_paths)
    except Exception as exc:
        raise ConfigError(f"completing an interrupted certificate renewal failed: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsky-agent", description="Run the fedsky agent.")
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"agent config file (default: $FEDSKY_AGENT_CONFIG or {default_config_path()})",
    )
    args = parser.parse_args(argv)
    setup_logging("INFO")
    path: Path = args.config or default_config_path()
    try:
        config = load_agent_config(path)
        _complete_renewal(config)
        identity = resolve_identity(config)
        require_executor(config, path)
        gid = resolve_group(config.status.group)
    except (ConfigError, StatusError) as exc:
        log.error("%s", exc)
        return exitcodes.CONFIG
    setup_logging(config.log_level, config.log_format)
    try:
        asyncio.run(run_agent(config=config, identity=identity, status_gid=gid))
    except StatusError as exc:
        log.error("%s", exc)
        return exitcodes.FAILED
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("the agent failed")
        return exitcodes.FAILED
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
