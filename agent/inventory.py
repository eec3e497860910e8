"""The blocking seam: libvirt and psutil, read in a worker thread, returned as frozen snapshots.

Nothing here may run on the event loop: the daemon calls every method through its one
single-thread executor, which also serialises all use of the libvirt connection (a virConnect
must not be used by two threads at once, and the test driver keeps its state per connection).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import libvirt
import psutil
from fedsky.shared.messages import VM_STATES, HostInfo, VmInfo, VmState

log = logging.getLogger(__name__)

_GIB = float(1 << 30)
_MIB = 1 << 20

# Errors that mean the connection itself is gone, not just one domain.
_CONNECTION_ERRORS = frozenset(
    {
        libvirt.VIR_ERR_INVALID_CONN,
        libvirt.VIR_ERR_NO_CONNECT,
        libvirt.VIR_ERR_SYSTEM_ERROR,
        libvirt.VIR_ERR_RPC,
        libvirt.VIR_ERR_INTERNAL_ERROR,
    }
)
# Address sources in order of preference: the DHCP leases of libvirt's networks, the guest
# agent, the host's ARP table. The first that answers with something wins.
_ADDRESS_SOURCES = (
    libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE,
    libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_AGENT,
    libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_ARP,
)
_MAX_ADDRESSES = 32

FaultAction = Literal["destroy", "suspend", "resume", "start"]


def _silence(_ctx: Any, _err: Any) -> None:
    """libvirt prints every error to stderr by default; the agent logs what matters itself."""


libvirt.registerErrorHandler(_silence, None)


class InventoryError(RuntimeError):
    """libvirt could not be read; the message says which URI and why."""


def _state_name(code: int) -> VmState:
    return VM_STATES[code] if 0 <= code < len(VM_STATES) else "nostate"


class LibvirtInventory:
    """The VMs one libvirt URI knows. Reconnects on the next call when the connection drops."""

    def __init__(self, *, uri: str) -> None:
        self._uri = uri
        self._conn: libvirt.virConnect | None = None
        # The executor is single-threaded already; the lock keeps direct callers (tests) honest.
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    @property
    def uri(self) -> str:
        return self._uri

    # --- connection ---------------------------------------------------------------------------

    def _connection(self) -> libvirt.virConnect:
        if self._conn is not None:
            try:
                if self._conn.isAlive() == 1:
                    return self._conn
            except libvirt.libvirtError:
                pass
            log.warning("libvirt connection to %s was lost; reconnecting", self._uri)
            self._drop()
        try:
            # Read-only would do for the inventory, but the fault hook of test configs acts
            # through this same connection, and the test driver keeps its state per connection.
            conn = libvirt.open(self._uri)
        except libvirt.libvirtError as exc:
            raise InventoryError(f"cannot connect to libvirt at {self._uri}: {exc}") from None
        if conn is None:  # older bindings return None instead of raising
            raise InventoryError(f"cannot connect to libvirt at {self._uri}")
        log.info("connected to libvirt at %s", self._uri)
        self._conn = conn
        return conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _with_connection(self, fn: Callable[[libvirt.virConnect], Any]) -> Any:
        """Run `fn` on the connection, retrying once on a fresh one if the connection broke."""
        with self._lock:
            for attempt in (1, 2):
                conn = self._connection()
                try:
                    return fn(conn)
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() not in _CONNECTION_ERRORS or attempt == 2:
                        raise InventoryError(f"libvirt at {self._uri}: {exc}") from None
                    log.warning("libvirt at %s failed (%s); reconnecting", self._uri, exc)
                    self._drop()
            raise AssertionError("unreachable")

    # --- reading ------------------------------------------------------------------------------

    def states(self) -> dict[str, VmState]:
        """UUID -> state of every domain: the cheap poll that detects a change."""

        def read(conn: libvirt.virConnect) -> dict[str, VmState]:
            out: dict[str, VmState] = {}
            for dom in conn.listAllDomains(0):
                try:
                    out[dom.UUIDString()] = _state_name(dom.state()[0])
                except libvirt.libvirtError as exc:
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            return out

        result: dict[str, VmState] = self._with_connection(read)
        return result

    def snapshot(self) -> list[VmInfo]:
        """Every domain with its state and resources, sorted by name."""

        def read(conn: libvirt.virConnect) -> list[VmInfo]:
            vms = []
            for dom in conn.listAllDomains(0):
                try:
                    vms.append(self._vm(conn, dom))
                except libvirt.libvirtError as exc:
                    # A domain undefined between the listing and the query is simply gone.
                    if exc.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
            vms.sort(key=lambda vm: vm.name)
            return vms

        result: list[VmInfo] = self._with_connection(read)
        return result

    def _vm(self, conn: libvirt.virConnect, dom: libvirt.virDomain) -> VmInfo:
        state_code, max_mem_kib, _mem_kib, nr_vcpu, _cpu_time = dom.info()
        state = _state_name(state_code)
        active = dom.isActive() == 1
        try:
            # Running: the vCPUs it has now; otherwise what it will boot with. `maxVcpus()`
            # fails on a shut-off domain.
            flag = libvirt.VIR_DOMAIN_AFFECT_LIVE if active else libvirt.VIR_DOMAIN_AFFECT_CONFIG
            vcpus = int(dom.vcpusFlags(flag))
        except libvirt.libvirtError:
            vcpus = int(nr_vcpu)
        xml = dom.XMLDesc(0)
        return VmInfo(
            name=dom.name(),
            uuid=dom.UUIDString(),
            state=state,
            vcpus=max(0, vcpus),
            memory_mib=int(max_mem_kib) // 1024,
            disk_gib=round(self._disk_bytes(conn, dom, xml) / _GIB, 3),
            addresses=self._addresses(dom) if active else [],
        )

    def _disk_bytes(self, conn: libvirt.virConnect, dom: libvirt.virDomain, xml: str) -> int:
        total = 0
        try:
            root = ET.fromstring(xml)  # noqa: S314 (libvirt's own XML, not untrusted input)
        except ET.ParseError:
            return 0
        for disk in root.iterfind("./devices/disk"):
            if disk.get("device", "disk") != "disk":
                continue  # CD-ROMs and floppies are not the VM's storage
            source = disk.find("source")
            if source is None:
                continue
            total += self._capacity(conn, dom, source)
        return total

    def _capacity(
        self, conn: libvirt.virConnect, dom: libvirt.virDomain, source: ET.Element
    ) -> int:
        pool, volume = source.get("pool"), source.get("volume")
        path = source.get("file") or source.get("dev")
        try:
            if pool and volume:
                return int(
                    conn.storagePoolLookupByName(pool).storageVolLookupByName(volume).info()[1]
                )
            if path:
                return int(conn.storageVolLookupByPath(path).info()[1])
        except libvirt.libvirtError as exc:
            if exc.get_error_code() in _CONNECTION_ERRORS:
                raise
        if path:
            # Not in a storage pool: ask the hypervisor. (The test driver answers a fixed size
            # here, which is why its disks are pool volumes.)
            try:
                return int(dom.blockInfo(path)[0])
            except libvirt.libvirtError as exc:
                if exc.get_error_code() in _CONNECTION_ERRORS:
                    raise
        key = f"{dom.name()}:{path or volume}"
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "size of disk %s of VM %s is unknown; counted as 0", path or volume, dom.name()
            )
        return 0

    def _addresses(self, dom: libvirt.virDomain) -> list[str]:
        for source in _ADDRESS_SOURCES:
            try:
                ifaces = dom.interfaceAddresses(source, 0)
            except libvirt.libvirtError:
                continue  # no leases, no guest agent, ...: try the next source
            found = [
                str(addr["addr"])
                for iface in (ifaces or {}).values()
                for addr in (iface.get("addrs") or [])
                if addr.get("addr")
            ]
            if found:
                return sorted(set(found))[:_MAX_ADDRESSES]
        return []

    # --- faults (test configurations only) ----------------------------------------------------

    def apply_fault(self, *, action: FaultAction, vm: str) -> VmState:
        """Destroy, suspend, resume or start `vm` through this connection; return its new state."""

        def act(conn: libvirt.virConnect) -> VmState:
            try:
                dom = conn.lookupByName(vm)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    raise InventoryError(f"no VM named {vm!r} at {self._uri}") from None
                raise
            if action == "destroy":
                dom.destroy()
            elif action == "suspend":
                dom.suspend()
            elif action == "resume":
                dom.resume()
            else:
                dom.create()
            return _state_name(dom.state()[0])

        result: VmState = self._with_connection(act)
        return result


class HostProbe:
    """The hypervisor host through psutil: CPU, load, memory and the state directory's disk."""

    def __init__(self, *, disk_path: Path) -> None:
        self._disk_path = disk_path
        self._hostname = socket.gethostname()[:256] or "unknown"
        # The first cpu_percent() call only starts the measurement and returns 0.0.
        psutil.cpu_percent(interval=None)

    def snapshot(self) -> HostInfo:
        mem = psutil.virtual_memory()
        try:
            disk = psutil.disk_usage(str(self._disk_path))
            disk_total, disk_free = disk.total / _GIB, disk.free / _GIB
        except OSError:
            disk_total = disk_free = 0.0
        try:
            load_1m = os.getloadavg()[0]
        except OSError:
            load_1m = 0.0
        return HostInfo(
            hostname=self._hostname,
            cpu_count=psutil.cpu_count() or 1,
            cpu_percent=min(100.0, max(0.0, psutil.cpu_percent(interval=None))),
            load_1m=max(0.0, load_1m),
            memory_total_mib=mem.total // _MIB,
            memory_available_mib=mem.available // _MIB,
            disk_total_gib=round(disk_total, 3),
            disk_free_gib=round(disk_free, 3),
        )
