"""`python -m benchmarks.testbed --smoke`: one federated job across the testbed's hosts.

The controller (with its managed Mosquitto, the broker bound to and advertised as ctl's address)
runs in `ctl`; each hospital's agent in `h-<hospital>` on a libvirt test node whose domains are
the hospital's VM hosts; each VM host `vm-<hospital>-<vm>` runs an sshd, and the agent starts the
participant's SuperNode in the chosen VM over SSH, its host key pinned before the job. Links are
measured before the job; while it trains, every SuperNode process on this machine is found in
/proc and its namespace read from outside with `ip netns identify PID`.

The aggregator: the controller's own SuperLink (the `onprem` provider) bound to ctl's address,
so the VM hosts get links to `ctl` for the SuperLink port. This is a stand-in: the issue's target
is a `testbed` provider that runs the AWS start-up script in the chosen region's host
(`"started_by": "user-data"`); the JSON says `"started_by": "controller"` and names the stand-in.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsky.controller.cli.client import ApiError, ControllerUnavailable
from fedsky.controller.onebox import OneboxError
from fedsky.controller.placement.catalog import load_catalog

from benchmarks.testbed.hosts import BROKER_PORT, SSH_PORT, SUPERLINK_PORT, TestbedBox
from benchmarks.testbed.measure import ECHO_PORT, echo_services, measure_links, within_tolerance
from benchmarks.testbed.netns import Testbed, TestbedError, run
from benchmarks.testbed.relay import Relays, routes_for
from benchmarks.testbed.topology import SUBNET, HospitalSpec, Link, Plan, PlanError, build_plan

log = logging.getLogger(__name__)

SMOKE_HOSPITALS = (
    HospitalSpec("hospital-us", "aws:us-east-1", ("vm1", "vm2")),
    HospitalSpec("hospital-eu", "aws:eu-central-1", ("vm1", "vm2")),
)
SMOKE_ROUNDS = 2
JOB_TIMEOUT_S = 240.0
STARTED_BY = "controller"  # the stand-in aggregator; "user-data" once the testbed provider exists
_SUPERNODE = "flower-supernode"
_SUPERLINK = "flower-superlink"
_SITE = re.compile(r'(?:^|\s)site="?([a-z0-9-]+)"?')


class SmokeError(TestbedError):
    """The smoke run failed; the message says where."""


def smoke_plan(
    hospitals: Sequence[HospitalSpec] = SMOKE_HOSPITALS, *, subnet: str = SUBNET, prefix: str = ""
) -> Plan:
    """Controller, hospital hosts and VM hosts; each VM also talks with `ctl`, where the
    stand-in aggregator's SuperLink runs (RTT from the catalog, hospital to controller)."""
    base = build_plan(hospitals=hospitals, regions=(), subnet=subnet, prefix=prefix)
    catalog = load_catalog()
    ctl = base.host("ctl")
    extra = []
    for host in base.hosts:
        if host.role == "vm":
            rtt = catalog.rtt(host.location, ctl.location)
            if rtt is None:
                raise PlanError(f"the catalog has no RTT between {host.location} and ctl")
            extra.append(Link(host.name, ctl.name, rtt))
    return Plan(hosts=base.hosts, links=(*base.links, *extra), subnet=subnet, prefix=prefix)


def services(plan: Plan) -> dict[str, list[int]]:
    """The ports relayed on every link: the broker and the SuperLink on ctl, sshd on the VMs,
    and the echo port of the RTT probes."""
    out: dict[str, list[int]] = {h: list(p) for h, p in echo_services(plan, ECHO_PORT).items()}
    out.setdefault("ctl", []).extend([BROKER_PORT, SUPERLINK_PORT])
    for host in plan.hosts:
        if host.role == "vm":
            out.setdefault(host.name, []).append(SSH_PORT)
    return out


# -- SuperNodes, seen from outside ----------------------------------------------------------


@dataclass
class Sighting:
    kind: str  # flower-supernode or flower-superlink
    site: str
    pid: int
    netns: str
    first_s: float


@dataclass
class SuperNodeWatch:
    """Polls /proc for SuperNode processes and asks `ip netns identify` where each runs."""

    subnet: str  # the testbed's: only processes dialling or listening on it are this run's
    interval_s: float = 0.5
    seen: dict[int, Sighting] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _t0: float = field(default_factory=time.monotonic)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="supernode-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.scan()
            except OSError as exc:  # a process that ended while being read
                log.debug("scan: %s", exc)

    def scan(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in self.seen:
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            args = [a.decode(errors="replace") for a in argv if a]
            # The program itself: its script is argv[0] or, under the interpreter, argv[1]
            # (the agent's ssh client carries the SuperNode's name only in its remote command).
            names = {Path(a).name for a in args[:2]}
            if _SUPERNODE in names:
                kind, address_flag = _SUPERNODE, "--superlink"
            elif _SUPERLINK in names:
                kind, address_flag = _SUPERLINK, "--host"
            else:
                continue
            # Only this run's: one dialling, or listening on, a testbed address.
            address = args[args.index(address_flag) + 1] if address_flag in args[:-1] else ""
            if not _in_subnet(address.rpartition(":")[0] or address, self.subnet):
                continue
            pid = int(entry.name)
            netns = run(["ip", "netns", "identify", str(pid)], check=False).strip()
            site = ""
            config = args[args.index("--node-config") + 1] if "--node-config" in args[:-1] else ""
            if m := _SITE.search(config):
                site = m.group(1)
            self.seen[pid] = Sighting(kind, site, pid, netns, round(time.monotonic() - self._t0, 1))

    def of(self, kind: str) -> list[Sighting]:
        return [s for s in self.seen.values() if s.kind == kind]


def _in_subnet(address: str, subnet: str) -> bool:
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(subnet)
    except ValueError:
        return False


# -- the run --------------------------------------------------------------------------------


def _datasets(index: int, count: int) -> str:
    return (
        "[datasets.digits]\n"
        'kind = "digits"\n'
        f'partition = {{ index = {index}, count = {count}, scheme = "label-skew", seed = 7 }}\n'
    )


def _job_spec(directory: Path, participants: Sequence[str], rounds: int) -> Path:
    from fedsky.shared.modelfile import make_example

    model = directory / "digits-cnn.safetensors"
    make_example("digits", model)
    spec = directory / "smoke-job.toml"
    names = ", ".join(f'"{n}"' for n in participants)
    spec.write_text(
        "\n".join(
            [
                'name = "testbed-smoke"',
                f"participants = [{names}]",
                f'model = "{model.name}"',
                'dataset = "digits"',
                'selection_metric = "f1"',
                "[hyperparameters]",
                f"rounds = {rounds}",
                "local_epochs = 1",
                "batch_size = 32",
                "learning_rate = 0.05",
                "[resources]",
                "vcpus = 2",
                "memory_gib = 4",
                "disk_gib = 20",
                "",
            ]
        )
    )
    return spec


def run_smoke(
    *,
    hospitals: Sequence[HospitalSpec] = SMOKE_HOSPITALS,
    rounds: int = SMOKE_ROUNDS,
    subnet: str = SUBNET,
    prefix: str = "",
    root: Path | None = None,
    keep_dir: bool = False,
) -> dict[str, Any]:
    """Build the testbed, run one job across it, take everything down; the smoke JSON."""
    plan = smoke_plan(hospitals, subnet=subnet, prefix=prefix)
    root = root or Path(tempfile.mkdtemp(prefix="fedsky-testbed-"))
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    watch = SuperNodeWatch(subnet=plan.subnet)
    try:
        with Testbed(plan) as testbed, Relays(testbed) as relays:
            relays.add(routes_for(plan, services(plan)))
            timings["testbed_s"] = round(time.monotonic() - t0, 1)
            links = measure_links(testbed, port=ECHO_PORT)
            timings["links_s"] = round(time.monotonic() - t0 - timings["testbed_s"], 1)
            box = TestbedBox(root=root, testbed=testbed, controller_host=plan.host("ctl"))
            try:
                box.init_ca()
                box.start_controller()
                for i, spec in enumerate(hospitals):
                    box.add_hospital(
                        spec,
                        agent_host=plan.host(f"h-{spec.name}"),
                        vm_hosts=[plan.host(f"vm-{spec.name}-{vm}") for vm in spec.vms],
                        datasets=_datasets(i, len(hospitals)),
                    )
                    box.start_agent(spec.name)
                box.wait_agents_online(
                    [h.name for h in hospitals], vms=min(len(h.vms) for h in hospitals)
                )
                timings["daemons_s"] = round(time.monotonic() - t0 - sum(timings.values()), 1)
                job_file = _job_spec(root, [h.name for h in hospitals], rounds)
                watch.start()
                started = time.monotonic()
                done = box.fedctl(
                    "job", "submit", str(job_file), "--follow", "--json",
                    check=False, timeout=JOB_TIMEOUT_S,
                )  # fmt: skip
                timings["job_s"] = round(time.monotonic() - started, 1)
                watch.stop()
                try:
                    submitted = json.loads(done.stdout)
                except ValueError:
                    raise SmokeError(
                        f"the job did not report (exit {done.returncode}): {done.stderr[-3000:]}"
                    ) from None
                job = box.api.get(f"/v1/jobs/{submitted['id']}")
                result = _result(plan, job, links, watch, box)
            finally:
                watch.stop()
                box.stop()
    except (OneboxError, ApiError, ControllerUnavailable) as exc:
        raise SmokeError(f"{exc} (files under {root})") from None
    except subprocess.TimeoutExpired:
        raise SmokeError(
            f"the job did not end within {JOB_TIMEOUT_S:g} s (files under {root})"
        ) from None
    timings["total_s"] = round(time.monotonic() - t0, 1)
    result["timings"] = timings
    if not keep_dir:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _result(
    plan: Plan,
    job: dict[str, Any],
    links: list[dict[str, Any]],
    watch: SuperNodeWatch,
    box: TestbedBox,
) -> dict[str, Any]:
    aggregator = job.get("aggregator") or {}
    superlinks = watch.of(_SUPERLINK)
    superlink = superlinks[-1] if superlinks else None
    ctl = plan.host("ctl")
    participants = []
    for participant in job["spec"]["participants"]:
        tasks = [t for t in job["tasks"] if t["participant"] == participant]
        task = max(tasks, key=lambda t: t["attempt"]) if tasks else None
        vm = task["vm"] if task else None
        vm_host = box.vm_hosts.get((participant, vm or ""))
        sightings = [s for s in watch.of(_SUPERNODE) if s.site == participant]
        sighting = sightings[-1] if sightings else None
        participants.append(
            {
                "name": participant,
                "vm": vm,
                "vm_host": vm_host.host.netns if vm_host else None,
                "supernode_host": sighting.netns if sighting else None,
                "supernode_pid": sighting.pid if sighting else None,
                "supernode_netns": sighting.netns if sighting else None,
            }
        )
    placement = (job.get("placement") or {}).get("choice") or {}
    return {
        "job": {
            "id": job["id"],
            "state": job["state"],
            "rounds_completed": job.get("rounds_done"),
            "error": job.get("error"),
        },
        "aggregator": {
            "host": superlink.netns if superlink else None,
            "address": f"{ctl.address}:{SUPERLINK_PORT}",
            "started_by": STARTED_BY,
            "provider": job.get("provider"),
            "pid": superlink.pid if superlink else None,
            "recorded_ref": aggregator.get("ref"),
            "placed_on": f"{placement['cloud']}:{placement['region']}" if placement else None,
            "note": "stand-in: the controller's own SuperLink (onprem) in ctl, not a region "
            "host booted by the start-up script",
        },
        "participants": participants,
        "supernodes_seen": [
            {"site": s.site, "pid": s.pid, "netns": s.netns, "at_s": s.first_s}
            for s in watch.of(_SUPERNODE)
        ],
        "vm_hosts": [h.netns for h in plan.hosts if h.role == "vm"],
        "links": links,
        "client_payload": "this checkout's venv ([executor] remote_bin_dir), not installed "
        "from the pinned artifacts",
    }


def failures(result: dict[str, Any]) -> list[str]:
    """What the smoke run must show and did not (empty: it passed)."""
    out = []
    job = result["job"]
    if job["state"] != "completed":
        out.append(f"job {job['id']} ended {job['state']}: {job.get('error')}")
    if not job.get("rounds_completed"):
        out.append("no round completed")
    for p in result["participants"]:
        if not p["vm_host"] or p["supernode_netns"] != p["vm_host"]:
            out.append(
                f"{p['name']}: SuperNode seen in {p['supernode_netns']!r}, its VM is "
                f"{p['vm_host']!r}"
            )
    vm_hosts = set(result["vm_hosts"])
    for s in result["supernodes_seen"]:
        if s["netns"] not in vm_hosts:
            out.append(f"a SuperNode (pid {s['pid']}) ran in {s['netns']!r}, not in a VM host")
    aggregator_host = result["aggregator"]["host"]
    if not aggregator_host:
        out.append("the aggregator's SuperLink was not seen running in a testbed namespace")
    elif aggregator_host in {s["netns"] for s in result["supernodes_seen"]}:
        out.append("a SuperNode ran on the aggregator's host")
    for link in result["links"]:
        if not within_tolerance(link["rtt_target_ms"], link["rtt_measured_ms"]):
            out.append(
                f"link {link['from']}-{link['to']}: {link['rtt_measured_ms']} ms measured, "
                f"target {link['rtt_target_ms']} ms"
            )
    return out
