"""The testbed's plan: which hosts exist, their addresses, and which pairs talk at what RTT.

Plain data and one builder, no side effects: `netns.Testbed` turns a `Plan` into namespaces.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from fedsky.controller.placement.catalog import Catalog, load_catalog

# The only addresses the testbed ever uses. It exists only inside the testbed's namespaces;
# while the testbed is up the host namespace gets a blackhole route for it.
SUBNET = "10.213.0.0/16"

# A LAN inside a hospital: the hypervisor host and its VMs.
LAN_RTT_MS = 1.0

Role = Literal["controller", "hospital", "vm", "region"]

# Each role gets a /24-sized block of the subnet so an address says what it is
# (10.213.1.x controller, .2.x hospitals, .3.x VMs, .4.x regions). Block 0 holds the relay's
# address on the bridge.
_ROLE_BLOCK: Mapping[Role, int] = {"controller": 1, "hospital": 2, "vm": 3, "region": 4}
_BLOCK_SIZE = 256
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
# `ip netns` names are file names under /run/netns; keep them readable and bounded.
_MAX_NETNS = 64


class PlanError(ValueError):
    """A plan that cannot be built: the message names the host, link or location at fault."""


@dataclass(frozen=True)
class Host:
    """One emulated machine: a network namespace with one address on the testbed subnet."""

    name: str  # what it is: ctl, h-<hospital>, vm-<hospital>-<vm>, r-<cloud>-<region>
    netns: str  # the namespace's name (the plan's prefix + name)
    role: Role
    address: str
    location: str = ""  # cloud:region, where the role has one


@dataclass(frozen=True)
class Link:
    """A pair of hosts that talk. `a` is the side that usually connects; measured from a to b."""

    a: str  # host name
    b: str
    rtt_target_ms: float


@dataclass(frozen=True)
class HospitalSpec:
    """A hospital as the plan builder takes it: name, location and its VMs' names."""

    name: str
    location: str  # cloud:region of its site, for the catalog's RTTs
    vms: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    """Everything `netns.Testbed` needs. Build one with `build_plan` or by hand (tests)."""

    hosts: tuple[Host, ...]
    links: tuple[Link, ...]
    subnet: str = SUBNET
    prefix: str = ""
    # Access-link bandwidth by host role (the link classes, docs/testbed.md), in Mbit/s: the
    # host's interface is shaped to it both ways (tc tbf), shared by all its connections.
    # A role not named is not shaped.
    bandwidth_mbps: Mapping[Role, float] = field(default_factory=dict)
    _by_name: Mapping[str, Host] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name: dict[str, Host] = {}
        network = _network(self.subnet)
        addresses: set[str] = {relay_address(self.subnet)}
        for host in self.hosts:
            if host.name in by_name:
                raise PlanError(f"host {host.name!r} appears twice")
            if host.netns != self.prefix + host.name:
                raise PlanError(f"host {host.name!r}: netns must be {self.prefix + host.name!r}")
            if ipaddress.ip_address(host.address) not in network:
                raise PlanError(f"host {host.name!r}: {host.address} is outside {self.subnet}")
            if host.address in addresses:
                raise PlanError(f"host {host.name!r}: address {host.address} is taken")
            addresses.add(host.address)
            by_name[host.name] = host
        pairs: set[frozenset[str]] = set()
        for link in self.links:
            for end in (link.a, link.b):
                if end not in by_name:
                    raise PlanError(f"link {link.a}-{link.b}: no host {end!r}")
            pair = frozenset((link.a, link.b))
            if len(pair) != 2 or pair in pairs:
                raise PlanError(f"link {link.a}-{link.b}: a link joins two hosts, once")
            if not link.rtt_target_ms > 0:
                raise PlanError(f"link {link.a}-{link.b}: RTT target must be positive")
            pairs.add(pair)
        for role, mbps in self.bandwidth_mbps.items():
            if role not in _ROLE_BLOCK:
                raise PlanError(f"bandwidth for {role!r}: not a host role")
            if not 0 < mbps <= 100_000:
                raise PlanError(f"bandwidth for {role}: {mbps} Mbit/s is not in (0, 100000]")
        object.__setattr__(self, "_by_name", by_name)

    def host(self, name: str) -> Host:
        try:
            return self._by_name[name]
        except KeyError:
            raise PlanError(f"no host {name!r} in the plan") from None

    @property
    def bridge_netns(self) -> str:
        """The namespace holding the bridge (and the relays' processes)."""
        return f"{self.prefix}tb-br"

    @property
    def relay_address(self) -> str:
        return relay_address(self.subnet)

    def peers(self, name: str) -> list[Host]:
        """The hosts `name` talks with."""
        out = []
        for link in self.links:
            if name in (link.a, link.b):
                out.append(self.host(link.b if link.a == name else link.a))
        return out

    def link(self, a: str, b: str) -> Link:
        for link in self.links:
            if {link.a, link.b} == {a, b}:
                return link
        raise PlanError(f"no link between {a!r} and {b!r}")


def _network(subnet: str) -> ipaddress.IPv4Network:
    try:
        network = ipaddress.IPv4Network(subnet)
    except ValueError as exc:
        raise PlanError(f"subnet {subnet!r}: {exc}") from None
    if not network.is_private:
        raise PlanError(f"subnet {subnet}: must be private")
    if network.num_addresses < _BLOCK_SIZE * (max(_ROLE_BLOCK.values()) + 1):
        raise PlanError(f"subnet {subnet}: too small, use a /21 or larger")
    return network


def relay_address(subnet: str) -> str:
    """The bridge namespace's address: every relayed connection reaches its target from it."""
    return str(_network(subnet)[1])


def host_address(subnet: str, role: Role, index: int) -> str:
    """The address of the `index`-th host (from 0) of a role."""
    if not 0 <= index < _BLOCK_SIZE - 2:
        raise PlanError(f"too many {role} hosts ({index + 1})")
    return str(_network(subnet)[_BLOCK_SIZE * _ROLE_BLOCK[role] + 1 + index])


def region_host_name(location: str) -> str:
    cloud, _, region = location.partition(":")
    return f"r-{cloud}-{region}"


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise PlanError(f"{kind} {name!r}: use lowercase letters, digits and '-'")


def build_plan(
    *,
    hospitals: Sequence[HospitalSpec],
    regions: Iterable[str],
    controller_location: str | None = None,
    catalog: Catalog | None = None,
    subnet: str = SUBNET,
    prefix: str = "",
    lan_rtt_ms: float = LAN_RTT_MS,
    bandwidth_mbps: Mapping[Role, float] | None = None,
) -> Plan:
    """The hosts and links for hospitals (with their VMs) and candidate aggregator regions.

    Pairs that talk: the controller with each hospital host (broker) and each region host
    (launch, enrolment), each hospital host with its VMs (LAN), each VM with each region
    (SuperLink). RTTs come from the catalog; the controller sits at `controller_location`
    (default: the first hospital's).
    """
    if not hospitals:
        raise PlanError("a plan needs at least one hospital")
    if prefix:
        _check_name("prefix", prefix)
    catalog = catalog or load_catalog()
    ctl_location = controller_location or hospitals[0].location
    region_list = list(dict.fromkeys(regions))

    def rtt(a: str, b: str) -> float:
        value = catalog.rtt(a, b)
        if value is None:
            raise PlanError(f"the catalog has no RTT between {a} and {b}")
        return value

    hosts: list[Host] = []
    links: list[Link] = []

    def add(name: str, role: Role, index: int, location: str = "") -> Host:
        if len(prefix + name) > _MAX_NETNS:
            raise PlanError(f"host name {prefix + name!r} is longer than {_MAX_NETNS}")
        host = Host(name, prefix + name, role, host_address(subnet, role, index), location)
        hosts.append(host)
        return host

    ctl = add("ctl", "controller", 0, ctl_location)
    region_hosts = []
    for i, location in enumerate(region_list):
        rtt(location, location)  # fails early on a location the catalog does not know
        region_hosts.append(add(region_host_name(location), "region", i, location))
    vm_index = 0
    for i, hospital in enumerate(hospitals):
        _check_name("hospital", hospital.name)
        h = add(f"h-{hospital.name}", "hospital", i, hospital.location)
        links.append(Link(h.name, ctl.name, rtt(hospital.location, ctl_location)))
        for vm in hospital.vms:
            _check_name("VM", vm)
            v = add(f"vm-{hospital.name}-{vm}", "vm", vm_index, hospital.location)
            vm_index += 1
            links.append(Link(h.name, v.name, lan_rtt_ms))
            for r in region_hosts:
                links.append(Link(v.name, r.name, rtt(hospital.location, r.location)))
    for r in region_hosts:
        links.append(Link(ctl.name, r.name, rtt(ctl_location, r.location)))
    return Plan(
        hosts=tuple(hosts),
        links=tuple(links),
        subnet=subnet,
        prefix=prefix,
        bandwidth_mbps=dict(bandwidth_mbps or {}),
    )
