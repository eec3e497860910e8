"""The testbed's network core: plan, namespaces, blackhole, relays, measured RTTs.

These build real namespaces and need root (as here and in CI); without it they fail, loudly.
Each run uses its own name prefix and a subnet apart from the CLI's, so a `--links` run on the
same machine does not collide with them.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fedsky.controller.placement.catalog import load_catalog

from benchmarks.testbed import netns
from benchmarks.testbed.measure import echo_services, measure_links, within_tolerance
from benchmarks.testbed.netns import (
    IpError,
    LeftoversError,
    Testbed,
    blackhole_present,
    cleanup,
    ip,
    list_netns,
)
from benchmarks.testbed.relay import Relays, routes_for
from benchmarks.testbed.topology import (
    SUBNET,
    HospitalSpec,
    Host,
    Link,
    Plan,
    PlanError,
    build_plan,
    host_address,
)
from tests.support.testbed import clear_testbed_leftovers

REPO = Path(__file__).resolve().parents[1]
TEST_SUBNET = "10.214.0.0/16"
PREFIX = f"t{os.getpid() % 100000}-"

CASE = (
    HospitalSpec("hospital-us", "aws:us-east-1", ("vm1", "vm2")),
    HospitalSpec("hospital-asia", "aws:ap-northeast-2", ("vm1", "vm2")),
    HospitalSpec("hospital-eu", "aws:eu-central-1", ("vm1", "vm2")),
)


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.fail("the testbed tests create network namespaces: run them as root")


def _plan(*links: tuple[str, str, float]) -> Plan:
    names = sorted({n for a, b, _ in links for n in (a, b)})
    hosts = tuple(
        Host(n, PREFIX + n, "vm", host_address(TEST_SUBNET, "vm", i)) for i, n in enumerate(names)
    )
    return Plan(
        hosts=hosts,
        links=tuple(Link(a, b, rtt) for a, b, rtt in links),
        subnet=TEST_SUBNET,
        prefix=PREFIX,
    )


def _ours() -> list[str]:
    return [n for n in list_netns() if n.startswith(PREFIX)]


def _assert_clean(plan: Plan) -> None:
    assert _ours() == []
    assert not blackhole_present(plan.subnet)
    assert not (netns.STATE_DIR / f"{plan.bridge_netns}.json").exists()


@pytest.fixture
def clean(root: None) -> object:
    clear_testbed_leftovers(PREFIX)
    yield
    # Whatever a failing test left must not reach the next one.
    cleanup(prefix=PREFIX)
    for subnet in (TEST_SUBNET,):
        if blackhole_present(subnet):
            ip("route", "del", "blackhole", subnet)


# -- the plan (pure) ---------------------------------------------------------------------------


def test_case_study_plan_hosts_addresses_and_links() -> None:
    plan = build_plan(hospitals=CASE, regions=["aws:us-east-1", "aws:eu-central-1"])
    names = [h.name for h in plan.hosts]
    assert names[0] == "ctl"
    assert {"h-hospital-us", "vm-hospital-asia-vm2", "r-aws-eu-central-1"} <= set(names)
    assert all(h.netns == h.name for h in plan.hosts)
    assert len({h.address for h in plan.hosts}) == len(plan.hosts)
    assert all(h.address.startswith("10.213.") for h in plan.hosts)
    assert plan.subnet == SUBNET
    # 3 hospital-controller, 6 hospital-VM, 6 VMs x 2 regions, 2 controller-region
    assert len(plan.links) == 3 + 6 + 12 + 2
    catalog = load_catalog()
    assert plan.link("h-hospital-asia", "ctl").rtt_target_ms == catalog.rtt(
        "aws:ap-northeast-2", "aws:us-east-1"
    )
    assert plan.link("vm-hospital-eu-vm1", "r-aws-us-east-1").rtt_target_ms == catalog.rtt(
        "aws:eu-central-1", "aws:us-east-1"
    )
    assert plan.link("h-hospital-us", "vm-hospital-us-vm2").rtt_target_ms == 1.0
    with pytest.raises(PlanError):
        plan.link("h-hospital-us", "h-hospital-eu")  # hospitals do not talk to each other
    # The controller's location is a parameter.
    moved = build_plan(
        hospitals=CASE, regions=["aws:us-east-1"], controller_location=CASE[2].location
    )
    assert moved.link("h-hospital-eu", "ctl").rtt_target_ms == catalog.rtt(
        "aws:eu-central-1", "aws:eu-central-1"
    )


def test_plan_rejects_bad_input() -> None:
    with pytest.raises(PlanError, match="no RTT"):
        build_plan(hospitals=CASE, regions=["aws:nowhere-1"])
    with pytest.raises(PlanError, match="lowercase"):
        build_plan(hospitals=[HospitalSpec("Bad_Name", "aws:us-east-1", ())], regions=[])
    with pytest.raises(PlanError, match="private"):
        build_plan(hospitals=CASE, regions=[], subnet="8.8.0.0/16")
    with pytest.raises(PlanError, match="twice"):
        Plan(hosts=(Host("a", "a", "vm", "10.213.3.1"),) * 2, links=())


# -- namespaces --------------------------------------------------------------------------------


def test_up_down_leaves_nothing_and_blackholes_the_subnet(clean: None) -> None:
    plan = _plan(("a", "b", 10.0))
    target = plan.host("b").address
    with Testbed(plan):
        assert sorted(_ours()) == sorted([PREFIX + "a", PREFIX + "b", plan.bridge_netns])
        assert blackhole_present(plan.subnet)
        assert not [line for line in ip("link").splitlines() if "tbv" in line or "tb0" in line]
        # The kernel refuses to route to a blackhole: `ip route get` fails or says so.
        got = subprocess.run(["ip", "route", "get", target], capture_output=True, text=True)
        assert got.returncode != 0 or "blackhole" in got.stdout or "unreachable" in got.stdout
        # Only with the blackhole in place (checked above) is a connect from here tried at all.
        with socket.socket() as sock:
            sock.settimeout(2)
            with pytest.raises(OSError, match=r"Invalid argument|unreachable") as caught:
                sock.connect((target, 7))
            assert caught.value.errno in (errno.EINVAL, errno.ENETUNREACH, errno.EHOSTUNREACH)
    _assert_clean(plan)


def test_refuses_to_start_over_leftovers_until_cleaned(clean: None) -> None:
    plan = _plan(("a", "b", 10.0))
    ip("netns", "add", PREFIX + "b")
    with pytest.raises(LeftoversError, match=PREFIX + "b"), Testbed(plan):
        pass
    assert PREFIX + "b" in list_netns()  # refusing touches nothing
    assert PREFIX + "b" in cleanup(plan).namespaces
    with Testbed(plan):
        pass
    _assert_clean(plan)


def test_a_journal_names_its_run_by_pid_and_start_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A machine that starts the same steps the same way gives the next run the same pid: a
    # journal is a live run's only when its pid also started when that run did.
    monkeypatch.setattr(netns, "STATE_DIR", tmp_path)
    started = netns.process_start_ticks(1)
    assert started is not None

    def journal(name: str, pid: int, ticks: int | None) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"pid": pid, "started": ticks, "namespaces": []}))
        return path

    live = journal("live", 1, started)
    reused = journal("reused", 1, started + 1)
    ours = journal("ours", os.getpid(), netns.process_start_ticks(os.getpid()))
    old = journal("old", 1, None)  # written before journals had a start time
    found = netns.find_leftovers()
    assert live not in found.journals
    assert old not in found.journals
    assert reused in found.journals
    assert ours in found.journals  # this process's own testbed still up is one it failed to end


def test_failure_during_setup_tears_down(clean: None, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(("a", "b", 10.0), ("a", "c", 10.0))
    real = Testbed._make_host

    def fail_on_c(self: Testbed, index: int, host: Host) -> None:
        if host.name == "c":
            netns.ip("link", "set", "no-such-device", "up")  # a real `ip` failure
        real(self, index, host)

    monkeypatch.setattr(Testbed, "_make_host", fail_on_c)
    with pytest.raises(IpError, match="ip link set no-such-device up"), Testbed(plan):
        pass
    _assert_clean(plan)


def test_sigterm_tears_down(clean: None) -> None:
    plan = _plan(("a", "b", 10.0))
    script = textwrap.dedent(
        f"""
        import os, signal, sys, time
        from benchmarks.testbed.netns import Testbed
        from benchmarks.testbed.topology import Host, Link, Plan
        plan = Plan(hosts=(Host("a", "{PREFIX}a", "vm", "10.214.3.1"),
                           Host("b", "{PREFIX}b", "vm", "10.214.3.2")),
                    links=(Link("a", "b", 10.0),), subnet="{TEST_SUBNET}", prefix="{PREFIX}")
        with Testbed(plan):
            print("up", flush=True)
            time.sleep(30)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "up"
    assert blackhole_present(TEST_SUBNET)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 128 + signal.SIGTERM
    _assert_clean(plan)


# -- relays ------------------------------------------------------------------------------------


def test_relayed_links_measure_their_targets(clean: None) -> None:
    plan = _plan(("a", "b", 40.0), ("a", "c", 100.0))
    with Testbed(plan) as testbed, Relays(testbed) as relays:
        assert relays.add(routes_for(plan, echo_services(plan))) == 2  # b and c serve
        links = measure_links(testbed, count=10)
        # Hosts that do not talk cannot reach each other at all.
        reach = subprocess.run(
            testbed.command(PREFIX + "b", ["python3", "-c", _CONNECT % plan.host("c").address]),
            capture_output=True,
            text=True,
        )
        assert reach.returncode != 0, reach.stdout
    _assert_clean(plan)
    measured = {(x["from"], x["to"]): x for x in links}
    for (a, b), target in (
        ((PREFIX + "a", PREFIX + "b"), 40.0),
        ((PREFIX + "a", PREFIX + "c"), 100.0),
    ):
        link = measured[(a, b)]
        assert link["rtt_target_ms"] == target
        assert within_tolerance(target, link["rtt_measured_ms"]), link


_CONNECT = "import socket; socket.create_connection(('%s', 7007), timeout=2)"


# -- link shaping and slow start ---------------------------------------------------------------

_SINK = """
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], 7100)); srv.listen(8)
while True:
    conn, _ = srv.accept()
    while True:  # one exchange after another on the connection, until the sender closes
        head = b""
        while len(head) < 16 and (part := conn.recv(16 - len(head))):
            head += part
        if len(head) < 16:
            break
        want = int(head.decode()); got = 0
        while got < want:
            got += len(conn.recv(1 << 16))
        conn.sendall(b"k")
    conn.close()
"""
_SEND = """
import socket, sys, time
def transfer(s, size):
    s.sendall(f"{size:<16}".encode())
    t = time.monotonic(); s.sendall(b"x" * size)
    if s.recv(1) != b"k":
        raise ConnectionError("no answer")
    return time.monotonic() - t
def connect():
    return socket.create_connection((sys.argv[1], 7100), timeout=30)
for _ in range(100):  # until the sink listens
    try:
        with connect() as s:
            transfer(s, 0)
        break
    except OSError:
        time.sleep(0.1)
size = int(sys.argv[2])
with connect() as s:
    first = transfer(s, size)
    time.sleep(0.6)  # idle past the RTO (RTT + 0.2 s): the window starts over
    again = transfer(s, size)
print(first, again)
"""


def _send(testbed: Testbed, src: str, dst: Host, size: int) -> tuple[float, float]:
    """Seconds to send `size` bytes on a new connection, then again on it after an idle RTO."""
    out = subprocess.run(
        testbed.command(PREFIX + src, [sys.executable, "-c", _SEND, dst.address, str(size)]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    first, again = out.stdout.split()
    return float(first), float(again)


def test_links_are_shaped_by_class_and_open_with_slow_start(clean: None) -> None:
    """A region host's link is held to its class's bandwidth (tc tbf), and a relayed transfer
    starts at TCP's initial window and doubles it each RTT, as a real path does, again after
    the connection was idle for an RTO. Both checks
    are lower bounds (what physics allows at best), which a loaded machine cannot break. The
    relays count what each host sent."""
    hosts = (
        Host("a", PREFIX + "a", "vm", host_address(TEST_SUBNET, "vm", 0)),
        Host("b", PREFIX + "b", "region", host_address(TEST_SUBNET, "region", 0)),
        Host("c", PREFIX + "c", "hospital", host_address(TEST_SUBNET, "hospital", 0)),
    )
    plan = Plan(
        hosts=hosts,
        links=(Link("a", "b", 2.0), Link("a", "c", 100.0)),
        subnet=TEST_SUBNET,
        prefix=PREFIX,
        bandwidth_mbps={"region": 40.0},
    )
    with Testbed(plan) as testbed, Relays(testbed) as relays:
        relays.add(routes_for(plan, {"b": [7100], "c": [7100]}))
        for name in ("b", "c"):
            host = plan.host(name)
            testbed.popen(host.netns, [sys.executable, "-c", _SINK, host.address])
        shaped, _ = _send(testbed, "a", plan.host("b"), 4_000_000)
        # 100 kB takes three RTTs at IW10 (14.6 + 29.2 + 58.4 kB), one RTT without slow start;
        # after an idle RTO on the same connection, three again (Linux's slow start after idle).
        opening, reopening = _send(testbed, "a", plan.host("c"), 100_000)
        sent = relays.sent_bytes()
    _assert_clean(plan)
    # What each host sent, counted by the relays whichever side dialled: a's payloads, and the
    # sinks' one-byte answers.
    assert sent[plan.host("a").address] >= 4_100_000
    assert 0 < sent[plan.host("b").address] < 1_000
    assert shaped >= 0.9 * 4_000_000 * 8 / 40e6, shaped  # 0.8 s at 40 Mbit/s
    assert opening >= 0.25, opening
    assert reopening >= 0.25, reopening
    with pytest.raises(PlanError, match="not a host role"):
        Plan(hosts=hosts, links=(), subnet=TEST_SUBNET, prefix=PREFIX, bandwidth_mbps={"x": 1.0})  # type: ignore[dict-item]
    with pytest.raises(PlanError, match="not in"):
        Plan(hosts=hosts, links=(), subnet=TEST_SUBNET, prefix=PREFIX, bandwidth_mbps={"vm": 0})
