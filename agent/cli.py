"""`agentctl`: the hospital side's CLI.

    agentctl [--config FILE] status [--json]
    agentctl [--config FILE] enroll request NAME [--state-dir DIR] [--out CSR] [--new-key]
    agentctl [--config FILE] enroll BUNDLE [--state-dir DIR] [--key FILE] [--force]
    agentctl [--config FILE] vm register NAME [--address HOST] [--port N]
                                              [--fingerprint SHA256:...] [--replace]
    agentctl [--config FILE] jobs pending|list [--json]
    agentctl [--config FILE] jobs approve JOB | deny JOB [--reason TEXT]

`status` exits 0 only when the agent runs and is connected to its broker, 1 when it runs but
is not connected, 69 when it is not running, 78 when the config file is invalid.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from fedsky.shared import exitcodes
from fedsky.shared.config import ConfigError

from .config import AgentConfig, default_config_path, load_agent_config
from .jobs_cli import add_jobs_parser, run_jobs
from .policy import ApprovalBook
from .status import StatusReading, as_json, read_status

_REQUEST = "request"


class _UsageError(Exception):
    pass


class _Failed(Exception):
    pass


def _config(args: argparse.Namespace, *, missing_ok: bool = False) -> AgentConfig:
    """The config named by --config, else the default file if it exists, else defaults.

    `--state-dir` overrides the config's state directory (and with it every default path).
    `missing_ok`: a --config file that does not exist yet means defaults (enrolment creates it).
    """
    path: Path | None = args.config
    if path is not None and missing_ok and not path.exists():
        path = None
    elif path is None and default_config_path().exists():
        path = default_config_path()
    config = load_agent_config(path) if path is not None else AgentConfig()
    state_dir: Path | None = getattr(args, "state_dir", None)
    if state_dir is not None:
        config = config.model_copy(update={"state_dir": state_dir.expanduser().resolve()})
    return config


# --- status ------------------------------------------------------------------------------------


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    seconds = int((now - moment).total_seconds())
    if seconds < 0:
        return f"{moment:%Y-%m-%d %H:%M:%S} UTC"
    if seconds < 120:
        span = f"{seconds} s"
    elif seconds < 7200:
        span = f"{seconds // 60} min"
    elif seconds < 172800:
        span = f"{seconds // 3600} h"
    else:
        span = f"{seconds // 86400} days"
    return f"{moment:%Y-%m-%d %H:%M:%S} UTC ({span} ago)"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _print_status(reading: StatusReading) -> None:
    doc = reading.doc
    if doc is None:
        print(f"agent: NOT RUNNING ({reading.note})")
        return
    now = datetime.now(UTC)
    ident = doc.identity
    if reading.running:
        head = f"running (pid {doc.pid}, since {_ago(doc.started_at, now)})"
    else:
        head = f"NOT RUNNING (last status written {_ago(doc.updated_at, now)})"
    print(f"agent        {ident.agent_id} at {ident.location}: {head}")
    if reading.note and reading.source == "file":
        print(f"note         {reading.note}")
    broker = doc.broker
    if reading.running and broker.connected:
        print(f"broker       {broker.address}: connected since {_ago(broker.connected_since, now)}")
    else:
        why = (
            f"{broker.last_error} ({_ago(broker.last_error_at, now)})"
            if broker.last_error
            else "not yet connected"
        )
        print(f"broker       {broker.address}: NOT CONNECTED: {why}")
    left = (ident.cert_not_after - now).days
    expiry = f"{ident.cert_not_after:%Y-%m-%d %H:%M} UTC"
    print(f"certificate  expires {expiry}" + (" (EXPIRED)" if left < 0 else f" (in {left} days)"))
    if doc.last_report is not None:
        print(f"last report  #{doc.last_report.seq} sent {_ago(doc.last_report.sent_at, now)}")
    else:
        print("last report  none sent yet")
    if doc.pending_report_seq is not None:
        print(f"pending      report #{doc.pending_report_seq} waits for the broker")
    inv = doc.inventory
    if inv.error:
        print(f"libvirt      {inv.uri}: ERROR: {inv.error}")
    else:
        print(f"libvirt      {inv.uri}: {len(inv.vms)} VMs, read {_ago(inv.updated_at, now)}")
    if inv.host is not None:
        h = inv.host
        print(
            f"host         {h.hostname}: {h.cpu_count} CPUs at {h.cpu_percent:.0f}%, "
            f"load {h.load_1m:.2f}, "
            f"{h.memory_available_mib}/{h.memory_total_mib} MiB free, "
            f"disk {h.disk_free_gib:.1f}/{h.disk_total_gib:.1f} GiB free"
        )
    task = doc.task
    if task is None:
        print("task         none")
    else:
        print(
            f"task         {task.task_id} (job {task.job_id}) on {task.vm}: {task.state} "
            f"since {_ago(task.since, now)}"
        )
    if doc.bad_commands:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(doc.bad_commands.items()))
        print(f"bad commands {counts}")
    if inv.vms:
        print()
        rows = [["NAME", "STATE", "VCPUS", "MEMORY", "DISK", "ADDRESSES", "UUID"]]
        rows += [
            [
                vm.name,
                vm.state,
                str(vm.vcpus),
                f"{vm.memory_mib / 1024:.1f} GiB",
                f"{vm.disk_gib:.1f} GiB",
                ",".join(vm.addresses) or "-",
                vm.uuid,
            ]
            for vm in inv.vms
        ]
        for line in _table(rows):
            print(line)


def _cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    reading = read_status(socket_path=config.status_socket, state_file=config.status_file)
    if args.json:
        print(as_json(reading))
    else:
        _print_status(reading)
    if not reading.running:
        return exitcodes.UNAVAILABLE
    return exitcodes.OK if reading.connected else exitcodes.FAILED


# --- jobs (approvals) ---------------------------------------------------------------------------


def _cmd_jobs(args: argparse.Namespace) -> int:
    config = _config(args)
    book = ApprovalBook(config.approvals_file, create=False)
    return run_jobs(args, book, manual=config.policy.approval == "manual")


# --- enroll ------------------------------------------------------------------------------------


def _cmd_enroll(args: argparse.Namespace) -> int:
    # cryptography is imported only here: `status` stays light.
    from .config_file import ConfigFileError, configured_agent_id
    from .config_file import record as record_in_config
    from .enroll import EnrolError, install_bundle, make_request

    config = _config(args, missing_ok=args.target != _REQUEST)
    paths = config.install_paths
    try:
        if args.target == _REQUEST:
            if args.name is None:
                raise _UsageError("usage: agentctl enroll request NAME [--out CSR]")
            if args.key is not None or args.force:
                raise _UsageError("--key and --force belong to `agentctl enroll BUNDLE`")
            result = make_request(name=args.name, paths=paths, new_key=args.new_key)
            out: Path = args.out or Path(f"{result.name}.csr")
            out.write_bytes(result.csr_pem)
            made = "made a new private key" if result.key_created else "reused the private key"
            print(f"{made} at {result.key_file} (0600; it never leaves this machine)")
            print(f"wrote the certificate request to {out}")
            print(
                f"next: the operator runs `fedctl agents enroll {result.name} "
                f"--location CLOUD:REGION --csr {out.name}` and sends back the bundle; "
                "then run `agentctl enroll BUNDLE`"
            )
            return exitcodes.OK
        if args.name is not None or args.out is not None or args.new_key:
            raise _UsageError("usage: agentctl enroll BUNDLE [--key FILE] [--force]")
        config_path = _enrolment_config_path(args)
        bundle = install_bundle(
            bundle_path=Path(args.target),
            paths=paths,
            key_source=args.key,
            force=args.force,
            expected_agent_id=(
                configured_agent_id(config_path) if config_path is not None else None
            ),
        )
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return exitcodes.USAGE
    except (EnrolError, ConfigFileError, OSError) as exc:
        print(f"enrolment failed: {exc}", file=sys.stderr)
        return exitcodes.FAILED
    print(
        f"enrolled as {bundle.agent_id} ({bundle.location}); broker {bundle.broker_host}:"
        f"{bundle.broker_port}; certificate valid until {bundle.not_after:%Y-%m-%d}"
    )
    if config_path is None:
        print("no config file named: the agent's identity is in the installed bundle alone")
    else:
        values = {"agent_id": bundle.agent_id}
        if args.state_dir is not None:
            values["state_dir"] = str(paths.state_dir)
        try:
            written = record_in_config(config_path, values, group_of=paths.state_dir)
        except (ConfigFileError, OSError) as exc:
            # The certificates are installed and the agent reads its identity from them.
            print(f"warning: agent_id not recorded in the config: {exc}", file=sys.stderr)
        else:
            print(f"config {written.path}: {written.outcome} (agent_id = {bundle.agent_id})")
    print(f"installed into {paths.state_dir}; (re)start the agent: systemctl restart fedsky-agent")
    return exitcodes.OK


def _enrolment_config_path(args: argparse.Namespace) -> Path | None:
    """The config file `agentctl enroll BUNDLE` records the agent's identity in.

    The file in use (`--config`, $FEDSKY_AGENT_CONFIG or the default) when it exists, or when
    named by `--config`; the default file is created too unless `--state-dir` points the
    enrolment somewhere of its own. None: no config file to write.
    """
    if args.config is not None:
        return Path(args.config)
    path = default_config_path()
    if path.exists() or args.state_dir is None:
        return path
    return None


# --- vm register --------------------------------------------------------------------------------


def _vm_address(config: AgentConfig, name: str, given: str | None) -> str:
    """--address, else the config's `[vms.NAME] address`, else what libvirt reports."""
    from .executors.base import check_vm_address
    from .executors.ssh import usable_addresses

    if given is not None:
        try:
            return check_vm_address(given)
        except ValueError as exc:
            raise _UsageError(f"--address: {exc}") from None
    settings = config.vms.get(name)
    if settings is not None and settings.address:
        return settings.address
    from .inventory import InventoryError, LibvirtInventory

    inventory = LibvirtInventory(uri=config.libvirt.uri)
    try:
        vms = inventory.snapshot()
    except InventoryError as exc:
        raise _Failed(f"{exc}; give the VM's address with --address") from None
    finally:
        inventory.close()
    vm = next((v for v in vms if v.name == name), None)
    if vm is None:
        raise _Failed(f"libvirt at {config.libvirt.uri} has no VM named {name!r}")
    usable = usable_addresses(vm.addresses)
    if not usable:
        raise _Failed(
            f"libvirt knows no address of {name} (it is {vm.state}); start it, or give the "
            f"address with --address or [vms.{name}] address"
        )
    return usable[0]


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError("a TCP port: 1-65535")
    return int(text)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _cmd_vm_register(args: argparse.Namespace) -> int:
    from .executors.base import SshExecutorConfig
    from .hostkeys import (
        HostKeyError,
        check_vm_name,
        normalise_fingerprint,
        pin,
        pinned_keys,
        scan,
    )

    config = _config(args)
    try:
        name = check_vm_name(args.name)
        expected = normalise_fingerprint(args.fingerprint) if args.fingerprint else None
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return exitcodes.USAGE
    executor = config.executor
    settings = config.vms.get(name)
    port: int = (
        args.port
        or (settings.port if settings else None)
        or (executor.port if isinstance(executor, SshExecutorConfig) else 22)
    )
    known_hosts = config.known_hosts_file
    try:
        host = _vm_address(config, name, args.address)
        offered = scan(host, port, timeout_s=args.timeout)
        current = pinned_keys(known_hosts, name)
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        return exitcodes.USAGE
    except (_Failed, HostKeyError) as exc:
        print(f"cannot register {name}: {exc}", file=sys.stderr)
        return exitcodes.FAILED
    print(f"VM {name} at {host}:{port} offers:")
    for key in offered:
        print(f"  {key.key_type:<22} {key.fingerprint}")
    if expected is not None:
        chosen = next((k for k in offered if k.fingerprint == expected), None)
        if chosen is None:
            print(
                f"refused: none of these is {expected}; the machine answering at {host}:{port} "
                "may not be the VM",
                file=sys.stderr,
            )
            return exitcodes.FAILED
    else:
        chosen = offered[0]
        print(
            f"compare {chosen.fingerprint} with the VM's own, read on its console: "
            "`for k in /etc/ssh/ssh_host_*_key.pub; do ssh-keygen -lf $k; done`"
        )
        if not _confirm(f"pin the {chosen.key_type} key for {name}?"):
            print(
                "not pinned: confirm interactively, or pass --fingerprint with the fingerprint "
                "read on the VM's console",
                file=sys.stderr,
            )
            return exitcodes.FAILED
    if chosen in current:
        print(f"{name}: that key is already pinned in {known_hosts}")
        return exitcodes.OK
    if current and not args.replace:
        print(
            f"refused: {name} already has a different pinned key ({current[0].fingerprint}); "
            "if the VM's key changed on purpose, run again with --replace",
            file=sys.stderr,
        )
        return exitcodes.FAILED
    try:
        pin(known_hosts, name, chosen, state_dir=config.state_dir)
    except (HostKeyError, OSError) as exc:
        print(f"cannot pin the key: {exc}", file=sys.stderr)
        return exitcodes.FAILED
    print(f"pinned {chosen.key_type} {chosen.fingerprint} for {name} in {known_hosts}")
    if args.address and (settings is None or settings.address != host):
        print(
            f"note: jobs reach {name} at libvirt's address unless the config says otherwise: "
            f'add [vms.{name}] address = "{host}" if libvirt does not know this one'
        )
    return exitcodes.OK


# --- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentctl", description="Check and enrol the fedsky agent."
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"agent config file (default: $FEDSKY_AGENT_CONFIG or {default_config_path()} "
        "if it exists)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    status = sub.add_parser("status", help="is the agent running and connected; its VMs")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("--state-dir", type=Path, default=None, help="the agent's state directory")
    status.set_defaults(func=_cmd_status)

    enroll = sub.add_parser(
        "enroll",
        help="`enroll request NAME`: make the key and a request; `enroll BUNDLE`: install",
        description="`agentctl enroll request NAME` makes the private key and a certificate "
        "request; `agentctl enroll BUNDLE` installs the bundle the operator signed.",
    )
    enroll.add_argument("target", metavar="request|BUNDLE", help="`request`, or the bundle file")
    enroll.add_argument(
        "name",
        nargs="?",
        default=None,
        metavar="NAME",
        help="the agent id to request (with `request`)",
    )
    enroll.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="the agent's state directory (default: from the config)",
    )
    enroll.add_argument(
        "--out", type=Path, default=None, help="where to write the request (default: NAME.csr here)"
    )
    enroll.add_argument(
        "--new-key",
        action="store_true",
        help="make a new private key even if one exists (re-enrolment)",
    )
    enroll.add_argument(
        "--key",
        type=Path,
        default=None,
        help="install this private key (made by `fedctl agents enroll --with-key`)",
    )
    enroll.add_argument(
        "--force", action="store_true", help="replace a different private key already installed"
    )
    enroll.set_defaults(func=_cmd_enroll)

    vm = sub.add_parser("vm", help="`vm register NAME`: pin a VM's SSH host key")
    vm_sub = vm.add_subparsers(dest="vm_command", metavar="COMMAND")
    vm_sub.required = True
    register = vm_sub.add_parser(
        "register",
        help="fetch the VM's SSH host key, show its fingerprint, pin it once confirmed",
        description="Fetch the SSH host key of VM NAME (ssh-keyscan), show its fingerprint to "
        "compare with the one on the VM's console, and pin it in the agent's known-hosts file. "
        "Jobs reach the VM over SSH only if its key is pinned and unchanged.",
    )
    register.add_argument("name", metavar="NAME", help="the VM's name in libvirt")
    register.add_argument(
        "--address",
        default=None,
        help="where to reach it (default: [vms.NAME] address, else libvirt's address)",
    )
    register.add_argument(
        "--port",
        type=_port,
        metavar="N",
        default=None,
        help="its SSH port (default: [vms.NAME] port, else [executor] port, else 22)",
    )
    register.add_argument(
        "--fingerprint",
        default=None,
        help="accept without asking if the VM offers a key with this SHA256:... fingerprint; "
        "refuse otherwise",
    )
    register.add_argument(
        "--replace", action="store_true", help="replace a different key already pinned"
    )
    register.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait for the VM's sshd"
    )
    register.add_argument(
        "--state-dir", type=Path, default=None, help="the agent's state directory"
    )
    register.set_defaults(func=_cmd_vm_register)

    add_jobs_parser(sub)
    sub.choices["jobs"].set_defaults(func=_cmd_jobs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return exitcodes.CONFIG
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
