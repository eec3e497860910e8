"""A libvirt test-driver node for one hospital: the original study's five VMs.

`libvirt.open("test:///abs/path/node.xml")` serves this file as a hypervisor without libvirtd.
Per hospital: vm-001 running 4 vCPU / 8 GiB / 40 GiB, vm-002 running 2 / 4 / 20, vm-003 and
vm-004 shut off, vm-005 running but below the 2 vCPU / 4 GiB minimum (1 vCPU / 2 GiB). Disks are
volumes of a directory pool (the test driver's `blockInfo` reports a fixed size, volumes report
the capacity written here); NICs sit on a `default` network so libvirt knows their addresses.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from xml.sax.saxutils import escape, quoteattr

_UUID_NAMESPACE = uuid.UUID("6f1d4c8e-4b59-4d3c-9a77-2f6a0c1e5b10")

# The test driver's `<test:runstate>` values (virDomainState).
_RUNSTATE = {"running": 1, "paused": 3, "shutoff": 5, "crashed": 6}


@dataclass(frozen=True)
class NodeVm:
    name: str
    state: Literal["running", "paused", "shutoff", "crashed"]
    vcpus: int
    memory_gib: int
    disk_gib: int


STUDY_VMS: tuple[NodeVm, ...] = (
    NodeVm("vm-001", "running", 4, 8, 40),
    NodeVm("vm-002", "running", 2, 4, 20),
    NodeVm("vm-003", "shutoff", 4, 8, 40),
    NodeVm("vm-004", "shutoff", 2, 4, 20),
    NodeVm("vm-005", "running", 1, 2, 10),
)


def vm_uuid(hospital: str, vm: str) -> str:
    """Stable per hospital and VM, so that three hospitals' vm-001s are distinct machines."""
    return str(uuid.uuid5(_UUID_NAMESPACE, f"{hospital}/{vm}"))


def _mac(hospital: str, vm: str) -> str:
    digest = hashlib.sha256(f"{hospital}/{vm}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def render_test_node(*, hospital: str, pool_dir: Path, vms: Sequence[NodeVm] = STUDY_VMS) -> str:
    """The node XML for `hospital`'s VMs; disks are volumes under `pool_dir` (need not exist)."""
    domains = []
    volumes = []
    for vm in vms:
        path = pool_dir / f"{vm.name}.qcow2"
        runstate = _RUNSTATE[vm.state]
        domains.append(
            f"""  <domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>
    <name>{escape(vm.name)}</name>
    <uuid>{vm_uuid(hospital, vm.name)}</uuid>
    <memory unit='GiB'>{vm.memory_gib}</memory>
    <currentMemory unit='GiB'>{vm.memory_gib}</currentMemory>
    <vcpu placement='static'>{vm.vcpus}</vcpu>
    <os><type arch='x86_64'>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <source file={quoteattr(str(path))}/>
        <target dev='vda' bus='virtio'/>
      </disk>
      <interface type='network'>
        <mac address='{_mac(hospital, vm.name)}'/>
        <source network='default'/>
      </interface>
    </devices>
    <test:runstate>{runstate}</test:runstate>
  </domain>"""
        )
        volumes.append(
            f"""    <volume type='file'>
      <name>{escape(path.name)}</name>
      <key>{escape(str(path))}</key>
      <capacity unit='GiB'>{vm.disk_gib}</capacity>
      <allocation unit='GiB'>{max(1, vm.disk_gib // 4)}</allocation>
      <target><path>{escape(str(path))}</path></target>
    </volume>"""
        )
    total_disk = sum(vm.disk_gib for vm in vms)
    pool_uuid = uuid.uuid5(_UUID_NAMESPACE, f"{hospital}/pool")
    net_uuid = uuid.uuid5(_UUID_NAMESPACE, f"{hospital}/network")
    return "\n".join(
        [
            "<node>",
            "  <cpu><nodes>1</nodes><sockets>1</sockets><cores>16</cores><threads>1</threads>"
            "<active>16</active><mhz>2400</mhz><model>x86_64</model></cpu>",
            "  <memory>67108864</memory>",
            *domains,
            f"""  <network>
    <name>default</name>
    <uuid>{net_uuid}</uuid>
    <forward mode='nat'/>
    <bridge name='virbr0'/>
    <ip address='192.168.122.1' netmask='255.255.255.0'>
      <dhcp><range start='192.168.122.2' end='192.168.122.254'/></dhcp>
    </ip>
  </network>""",
            f"""  <pool type='dir'>
    <name>{escape(hospital)}-pool</name>
    <uuid>{pool_uuid}</uuid>
    <capacity unit='GiB'>{total_disk * 4}</capacity>
    <allocation unit='GiB'>{total_disk}</allocation>
    <available unit='GiB'>{total_disk * 3}</available>
    <target><path>{escape(str(pool_dir))}</path></target>""",
            *volumes,
            "  </pool>",
            "</node>",
            "",
        ]
    )


def write_test_node(
    path: Path, *, hospital: str, vms: Sequence[NodeVm] = STUDY_VMS, pool_dir: Path | None = None
) -> str:
    """Write the node XML for `hospital` to `path` and return its libvirt URI (`test:///...`)."""
    path = path.resolve()
    pool = pool_dir if pool_dir is not None else path.parent / f"{hospital}-images"
    text = render_test_node(hospital=hospital, pool_dir=pool, vms=vms)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return node_uri(path)


def node_uri(path: Path) -> str:
    return f"test://{path.resolve()}"
