"""The agent's inventory against libvirt's real test driver, and the host probe against psutil."""

from __future__ import annotations

import os
from pathlib import Path

import libvirt
import psutil
import pytest
from fedsky.agent.inventory import HostProbe, InventoryError, LibvirtInventory
from fedsky.agent.testnode import STUDY_VMS, NodeVm, vm_uuid, write_test_node

_STATE_NAMES = {1: "running", 3: "paused", 5: "shutoff", 6: "crashed"}


@pytest.fixture
def node(tmp_path: Path) -> str:
    return write_test_node(tmp_path / "node.xml", hospital="hospital-us")


def test_snapshot_is_the_study_five_vms(node: str) -> None:
    vms = {vm.name: vm for vm in LibvirtInventory(uri=node).snapshot()}
    got = {n: (v.state, v.vcpus, v.memory_mib, v.disk_gib) for n, v in vms.items()}
    assert got == {
        "vm-001": ("running", 4, 8192, 40.0),
        "vm-002": ("running", 2, 4096, 20.0),
        "vm-003": ("shutoff", 4, 8192, 40.0),
        "vm-004": ("shutoff", 2, 4096, 20.0),
        "vm-005": ("running", 1, 2048, 10.0),
    }
    for name, vm in vms.items():
        assert vm.uuid == vm_uuid("hospital-us", name)
        # libvirt knows addresses of running domains only (from its network's leases).
        assert bool(vm.addresses) == (vm.state == "running")


def test_snapshot_equals_what_libvirt_says(node: str) -> None:
    """Compare with libvirt's own answers, read over a separate connection."""
    ours = {vm.uuid: vm for vm in LibvirtInventory(uri=node).snapshot()}
    conn = libvirt.open(node)
    try:
        doms = conn.listAllDomains(0)
        assert {d.UUIDString() for d in doms} == set(ours)
        for dom in doms:
            vm = ours[dom.UUIDString()]
            state, max_kib, _cur_kib, vcpus, _ = dom.info()
            assert vm.name == dom.name()
            assert vm.state == _STATE_NAMES[state]
            assert vm.memory_mib == max_kib // 1024
            assert vm.vcpus == vcpus
            # Disk capacity: the volume behind each disk path in the domain's XML.
            path = dom.XMLDesc(0).split("<source file='", 1)[1].split("'", 1)[0]
            capacity = conn.storageVolLookupByPath(path).info()[1]
            assert vm.disk_gib == pytest.approx(capacity / 2**30)
            if state == 1:
                leases = dom.interfaceAddresses(libvirt.VIR_DOMAIN_INTERFACE_ADDRESSES_SRC_LEASE)
                addrs = sorted(a["addr"] for i in leases.values() for a in i["addrs"])
                assert vm.addresses == addrs
    finally:
        conn.close()


def test_faults_act_on_the_inventory_connection(node: str) -> None:
    inv = LibvirtInventory(uri=node)
    assert inv.apply_fault(action="destroy", vm="vm-001") == "shutoff"
    assert inv.apply_fault(action="suspend", vm="vm-002") == "paused"
    states = {vm.name: vm.state for vm in inv.snapshot()}
    assert states["vm-001"] == "shutoff"
    assert states["vm-002"] == "paused"
    assert inv.states()[vm_uuid("hospital-us", "vm-001")] == "shutoff"
    # A shut-off domain reports its configured vCPUs and no addresses.
    vm1 = next(vm for vm in inv.snapshot() if vm.name == "vm-001")
    assert (vm1.vcpus, vm1.addresses) == (4, [])
    assert inv.apply_fault(action="start", vm="vm-003") == "running"
    with pytest.raises(InventoryError, match="vm-999"):
        inv.apply_fault(action="destroy", vm="vm-999")


def test_reconnects_when_the_connection_drops(node: str) -> None:
    inv = LibvirtInventory(uri=node)
    assert len(inv.snapshot()) == 5
    # Close the connection under the inventory, as a restarted libvirtd would.
    assert inv._conn is not None
    inv._conn.close()
    assert len(inv.snapshot()) == 5
    assert len(inv.states()) == 5


def test_unreachable_libvirt_is_an_inventory_error(tmp_path: Path) -> None:
    inv = LibvirtInventory(uri=f"test://{tmp_path}/missing.xml")
    with pytest.raises(InventoryError, match="cannot connect to libvirt"):
        inv.snapshot()


def test_other_node_contents(tmp_path: Path) -> None:
    vms = (NodeVm("db", "paused", 8, 16, 100), NodeVm("web", "crashed", 2, 1, 5))
    uri = write_test_node(tmp_path / "n.xml", hospital="h", vms=vms)
    got = {
        vm.name: (vm.state, vm.vcpus, vm.memory_mib, vm.disk_gib)
        for vm in LibvirtInventory(uri=uri).snapshot()
    }
    assert got == {"db": ("paused", 8, 16384, 100.0), "web": ("crashed", 2, 1024, 5.0)}


def test_host_probe(tmp_path: Path) -> None:
    host = HostProbe(disk_path=tmp_path).snapshot()
    mem = psutil.virtual_memory()
    disk = psutil.disk_usage(str(tmp_path))
    assert host.cpu_count == psutil.cpu_count()
    assert 0.0 <= host.cpu_percent <= 100.0
    assert host.memory_total_mib == mem.total // 2**20
    assert 0 < host.memory_available_mib <= host.memory_total_mib
    assert host.disk_total_gib == pytest.approx(disk.total / 2**30, abs=0.01)
    assert host.load_1m == pytest.approx(os.getloadavg()[0], abs=5.0)


def test_study_vms_match_the_case_study() -> None:
    running = [vm for vm in STUDY_VMS if vm.state == "running"]
    fit = [vm for vm in running if vm.vcpus >= 2 and vm.memory_gib >= 4]
    assert len(STUDY_VMS) == 5
    assert [vm.name for vm in fit] == ["vm-001", "vm-002"]
    assert [vm.name for vm in STUDY_VMS if vm.state == "shutoff"] == ["vm-003", "vm-004"]
