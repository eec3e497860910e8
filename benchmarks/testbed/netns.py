"""Network namespaces for a `Plan`, made with iproute2, and always taken down again.

Layout: one namespace per host with one veth (`tb0`) whose peer is a port of a bridge that lives
in a namespace of its own (`<prefix>tb-br`, which also holds the relay address). Each host has
its own address on `tb0` as a /32 and a route to the relay address only, and the addresses of the
hosts it talks with as local routes on `lo` (not as addresses of an interface): a connection to
a peer stays inside the host and reaches the relay listening there (see relay.py), so every byte
between hosts that talk is delayed and hosts that do not talk cannot reach each other at all.

Safety: while the testbed is up, the host namespace has `blackhole <subnet>`; the host has a
default route that leaves the machine, and a packet for the testbed subnet must never take it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from benchmarks.testbed.topology import Host, Plan

log = logging.getLogger(__name__)

# What each run created, written before it is created, so a crashed run can be cleaned up.
STATE_DIR = Path("/run/fedsky-testbed")
NETNS_DIR = Path("/run/netns")
HOST_IF = "tb0"  # the veth end inside each host (names are per namespace, so one name fits all)
BRIDGE_IF = "tbbr"
_IP_TIMEOUT_S = 30
_CLONE_NEWNET = 0x40000000
# Per-namespace settings: answer ARP only for addresses on the asking interface (every host
# holds its peers' addresses on lo and must not claim them on the bridge), and no IPv6 on the
# veths, whose link-local addresses would be an undelayed path between hosts.
_HOST_SYSCTLS = (
    "net.ipv4.conf.all.arp_ignore=1",
    "net.ipv4.conf.all.arp_announce=2",
    "net.ipv6.conf.default.disable_ipv6=1",
)


class TestbedError(RuntimeError):
    """The testbed cannot be built or used; the message says what to do."""

    __test__ = False  # not a pytest test class despite the name


class IpError(TestbedError):
    """An `ip` (or other system) command failed: the message names the command and its error."""


class LeftoversError(TestbedError):
    """A previous run left namespaces or routes behind: clean them first."""


def run(argv: Sequence[str], *, check: bool = True, timeout: float = _IP_TIMEOUT_S) -> str:
    """Run a system command; raise IpError naming it on failure. Returns stdout."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise IpError(f"`{' '.join(argv)}` could not run: {exc}") from exc
    if check and done.returncode != 0:
        raise IpError(f"`{' '.join(argv)}` failed (exit {done.returncode}): {done.stderr.strip()}")
    return done.stdout


def shape(netns: str, device: str, mbps: float) -> None:
    """Limit what leaves `device` to `mbps` Mbit/s (a token bucket: this kernel has no netem).
    The burst holds a few of the veth's 64 KiB GSO packets, which a smaller bucket would drop
    for good; the queue holds 100 ms at the rate."""
    run(
        ["tc", "-n", netns, "qdisc", "add", "dev", device, "root", "tbf",
         "rate", f"{mbps:g}mbit", "burst", "512kb", "latency", "100ms"]
    )  # fmt: skip


def ip(*args: str, check: bool = True) -> str:
    return run(["ip", *args], check=check)


def list_netns() -> list[str]:
    """Names of every named network namespace on this machine."""
    out = ip("netns", "list")
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def blackhole_present(subnet: str) -> bool:
    out = ip("-4", "route", "show", "type", "blackhole", "exact", subnet)
    return bool(out.strip())


def _host_routes_overlapping(subnet: str) -> list[str]:
    """Host-namespace routes or addresses inside the subnet (other than our blackhole)."""
    network = ipaddress.IPv4Network(subnet)
    found = []
    for route in json.loads(ip("-j", "-4", "route", "show") or "[]"):
        dst = route.get("dst", "")
        if dst in ("", "default") or route.get("type") == "blackhole":
            continue
        if ipaddress.IPv4Network(dst, strict=False).overlaps(network):
            found.append(f"route {dst}")
    for iface in json.loads(ip("-j", "-4", "addr", "show") or "[]"):
        for addr in iface.get("addr_info", []):
            if ipaddress.ip_address(addr["local"]) in network:
                found.append(f"address {addr['local']} on {iface.get('ifname')}")
    return found


# -- sockets in other namespaces ---------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def socket_in(
    netns: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM
) -> socket.socket:
    """A socket created inside namespace `netns`; it keeps that namespace for its lifetime.

    setns() switches only the calling thread, so a short-lived thread does it and the caller's
    threads never change namespace (os.setns arrived in Python 3.12).
    """
    result: dict[str, Any] = {}

    def work() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(NETNS_DIR / netns, os.O_RDONLY)
            try:
                _setns(target)
                try:
                    result["sock"] = socket.socket(family, kind)
                finally:
                    _setns(own)
            finally:
                os.close(target)
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc
        finally:
            os.close(own)

    thread = threading.Thread(target=work, name=f"setns-{netns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise TestbedError(f"cannot create a socket in namespace {netns}: {result['error']}")
    sock: socket.socket = result["sock"]
    return sock


# -- leftovers ---------------------------------------------------------------------------------


@dataclass
class Leftovers:
    namespaces: list[str] = field(default_factory=list)
    blackholes: list[str] = field(default_factory=list)
    journals: list[Path] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.blackholes or self.journals)

    def describe(self) -> str:
        parts = []
        if self.namespaces:
            parts.append("namespaces " + ", ".join(self.namespaces))
        if self.blackholes:
            parts.append("blackhole routes " + ", ".join(self.blackholes))
        if self.journals:
            parts.append("journals " + ", ".join(str(j) for j in self.journals))
        return "; ".join(parts)


def _read_journal(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    except (OSError, ValueError):
        log.warning("unreadable testbed journal %s", path)
        return {}


def _process_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the parenthesised command name, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def process_start_ticks(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot): with the pid, names one process even after
    the pid is reused, as it is when a machine starts the same steps the same way."""
    fields = _process_stat(pid)
    # Field 22 of stat; the list starts at field 3 (state).
    return int(fields[19]) if fields and len(fields) > 19 else None


def _alive(pid: int, started: int | None = None) -> bool:
    """Whether the run that wrote a journal is still running: its pid is alive, not a zombie,
    and (when the journal says) started when that run did. This process is never "alive":
    a testbed of its own still in a journal is one it failed to take down."""
    if pid == os.getpid():
        return False
    fields = _process_stat(pid)
    if not fields or fields[0] == "Z":
        return False
    return started is None or process_start_ticks(pid) == started


def find_leftovers(plan: Plan | None = None, *, prefix: str | None = None) -> Leftovers:
    """What earlier runs left: namespaces named as in `plan` or starting with `prefix` (when
    not empty), and everything in the journals of runs whose process is gone."""
    existing = set(list_netns())
    found = Leftovers()
    names: set[str] = set()
    subnets: set[str] = set()
    if plan is not None:
        names |= {h.netns for h in plan.hosts} | {plan.bridge_netns}
        subnets.add(plan.subnet)
    if prefix:
        names |= {n for n in existing if n.startswith(prefix)}
    if STATE_DIR.is_dir():
        for path in sorted(STATE_DIR.glob("*.json")):
            journal = _read_journal(path)
            started = journal.get("started")
            if _alive(int(journal.get("pid", 0)), started if isinstance(started, int) else None):
                continue  # a live testbed of another process: not ours to touch
            found.journals.append(path)
            names |= set(journal.get("namespaces", []))
            if journal.get("subnet"):
                subnets.add(journal["subnet"])
    found.namespaces = sorted(names & existing)
    found.blackholes = sorted(s for s in subnets if blackhole_present(s))
    return found


def kill_namespace_processes(netns: str) -> None:
    """Kill every process whose network namespace is `netns` (a machine powered off).

    A process left inside would keep the namespace (and its sockets) alive after `del`."""
    out = ip("netns", "pids", netns, check=False)
    for pid in (int(p) for p in out.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            log.info("killed pid %d left in namespace %s", pid, netns)


def remove(leftovers: Leftovers) -> None:
    """Remove what `find_leftovers` found. Raises IpError if something will not go."""
    errors = []
    for netns in leftovers.namespaces:
        try:
            kill_namespace_processes(netns)
            ip("netns", "del", netns)
        except IpError as exc:
            errors.append(str(exc))
    for subnet in leftovers.blackholes:
        try:
            ip("route", "del", "blackhole", subnet)
        except IpError as exc:
            errors.append(str(exc))
    for path in leftovers.journals:
        path.unlink(missing_ok=True)
    if errors:
        raise IpError("cleanup incomplete: " + " | ".join(errors))


def cleanup(plan: Plan | None = None, *, prefix: str | None = None) -> Leftovers:
    """Remove leftovers of crashed runs (see `find_leftovers`); returns what was removed."""
    found = find_leftovers(plan, prefix=prefix)
    if found:
        log.info("removing testbed leftovers: %s", found.describe())
        remove(found)
    return found


# -- the testbed -------------------------------------------------------------------------------


class Testbed:
    """Namespaces, veths, bridge and blackhole for a plan; a context manager.

    `with Testbed(plan) as tb:` builds everything, and takes it all down on exit, on an
    exception, on Ctrl-C and on SIGTERM/SIGHUP (turned into SystemExit while inside).
    Processes started with `popen` are stopped before the namespaces go.
    """

    __test__ = False

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.journal = STATE_DIR / f"{plan.bridge_netns}.json"
        self._procs: list[subprocess.Popen[Any]] = []
        self._up = False
        self._old_handlers: dict[int, Any] = {}

    # context manager, signals
    def __enter__(self) -> Testbed:
        self._install_signal_handlers()
        try:
            self.up()
        except BaseException:
            self._restore_signal_handlers()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.down()
        finally:
            self._restore_signal_handlers()

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def stop(signum: int, frame: FrameType | None) -> None:
            # Unwind through __exit__ so the teardown runs.
            raise SystemExit(128 + signum)

        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, stop)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()

    # building
    def up(self) -> None:
        """Build the testbed; on any failure take down what was built and re-raise."""
        if os.geteuid() != 0:
            raise TestbedError("the testbed needs root (network namespaces, routes)")
        found = find_leftovers(self.plan, prefix=self.plan.prefix or None)
        if found:
            raise LeftoversError(
                f"leftovers from an earlier run: {found.describe()}; remove them with "
                "`python -m benchmarks.testbed --cleanup`"
            )
        overlap = _host_routes_overlapping(self.plan.subnet)
        if overlap:
            raise TestbedError(
                f"the host namespace already uses {self.plan.subnet} ({', '.join(overlap)}); "
                "choose another testbed subnet"
            )
        self._up = True
        try:
            self._write_journal()
            # First, before any testbed address exists anywhere.
            ip("route", "add", "blackhole", self.plan.subnet)
            self._make_bridge()
            for index, host in enumerate(self.plan.hosts):
                self._make_host(index, host)
        except BaseException:
            log.error("testbed set-up failed; tearing down")
            self.down()
            raise
        log.info(
            "testbed up: %d hosts, %d links on %s",
            len(self.plan.hosts),
            len(self.plan.links),
            self.plan.subnet,
        )

    def _write_journal(self) -> None:
        STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        record = {
            "pid": os.getpid(),
            "started": process_start_ticks(os.getpid()),
            "subnet": self.plan.subnet,
            "namespaces": [self.plan.bridge_netns, *(h.netns for h in self.plan.hosts)],
        }
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.journal)

    def _make_bridge(self) -> None:
        br = self.plan.bridge_netns
        ip("netns", "add", br)
        self._sysctl(br, "net.ipv6.conf.default.disable_ipv6=1")
        ip("-n", br, "link", "set", "lo", "up")
        ip("-n", br, "link", "add", BRIDGE_IF, "type", "bridge")
        prefixlen = ipaddress.IPv4Network(self.plan.subnet).prefixlen
        ip("-n", br, "addr", "add", f"{self.plan.relay_address}/{prefixlen}", "dev", BRIDGE_IF)
        ip("-n", br, "link", "set", BRIDGE_IF, "up")

    def _make_host(self, index: int, host: Host) -> None:
        br, ns = self.plan.bridge_netns, host.netns
        port = f"tbv{index}"  # unique inside the bridge namespace, well under 15 characters
        ip("netns", "add", ns)
        self._sysctl(ns, *_HOST_SYSCTLS)
        # Both ends are created directly in their namespaces: nothing appears in the host's.
        ip("link", "add", HOST_IF, "netns", ns, "type", "veth", "peer", "name", port, "netns", br)
        ip("-n", br, "link", "set", port, "master", BRIDGE_IF, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "addr", "add", f"{host.address}/32", "dev", HOST_IF)
        ip("-n", ns, "link", "set", HOST_IF, "up")
        ip("-n", ns, "route", "add", self.plan.relay_address, "dev", HOST_IF, "src", host.address)
        mbps = self.plan.bandwidth_mbps.get(host.role)
        if mbps is not None:
            # Both ends: the host's side shapes what it sends, the bridge's what it receives.
            shape(ns, HOST_IF, mbps)
            shape(br, port, mbps)
        for peer in self.plan.peers(host.name):
            # A local route, not an address: connections to the peer are delivered inside this
            # host (to the relay bound there), yet the peer's address is not one of this host's
            # interface addresses, which programs that check "is this address my own?" (the
            # agent refuses an SSH target on its own host) would otherwise believe.
            ip(
                "-n",
                ns,
                "route",
                "add",
                "local",
                f"{peer.address}/32",
                "dev",
                "lo",
                "table",
                "local",
            )

    def _sysctl(self, netns: str, *settings: str) -> None:
        run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", *settings])

    # using
    def command(self, netns: str, argv: Sequence[str]) -> list[str]:
        """argv run inside a namespace (a host's or the bridge's)."""
        known = {h.netns for h in self.plan.hosts} | {self.plan.bridge_netns}
        if netns not in known:
            raise TestbedError(f"{netns!r} is not a namespace of this testbed")
        return ["ip", "netns", "exec", netns, *argv]

    def popen(self, netns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside a namespace; it is stopped when the testbed goes down."""
        if not self._up:
            raise TestbedError("the testbed is not up")
        proc: subprocess.Popen[Any] = subprocess.Popen(self.command(netns, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def netns_of(self, host_name: str) -> str:
        return self.plan.host(host_name).netns

    # taking down
    def down(self) -> None:
        """Stop processes, remove namespaces, the blackhole and the journal. Idempotent."""
        if not self._up:
            return
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        errors = []
        existing = set(list_netns())
        for ns in [*(h.netns for h in self.plan.hosts), self.plan.bridge_netns]:
            if ns in existing:
                try:
                    kill_namespace_processes(ns)
                    ip("netns", "del", ns)
                except IpError as exc:
                    errors.append(str(exc))
        # Last, after every testbed address is gone.
        if blackhole_present(self.plan.subnet):
            try:
                ip("route", "del", "blackhole", self.plan.subnet)
            except IpError as exc:
                errors.append(str(exc))
        self.journal.unlink(missing_ok=True)
        self._up = False
        if errors:
            raise IpError("testbed teardown incomplete: " + " | ".join(errors))
        log.info("testbed down")


def _stop(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
