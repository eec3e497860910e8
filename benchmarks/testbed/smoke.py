"""`python -m benchmarks.testbed --smoke`: one federated job across the testbed's hosts.

The controller (with its managed Mosquitto and its enrolment listener, bound to and advertised
as ctl's address) runs in `ctl`; each hospital's agent in `h-<hospital>` on a libvirt test node
whose domains are the hospital's VM hosts; each VM host `vm-<hospital>-<vm>` runs an sshd, and
the agent installs the client payload from the controller's pinned artifacts into the chosen VM
and starts the participant's SuperNode there over SSH, its host key pinned before the job.

The aggregator: placement picks an AWS region, and the controller's launcher (the testbed's
cloud, `cloudvm.py`) boots a machine in that region's host `r-aws-<region>` with the start-up
script the AWS provider would give EC2 as user data; the script installs fedsky from the
pinned artifacts, enrols with its one-time token and starts the SuperLink. Region hosts exist
only for the region this job is placed in (the same optimizer, run here first) and the
study's baseline.

Links are measured before the job; while it trains, every SuperNode and SuperLink process on
this machine is found in /proc and its namespace read from outside with `ip netns identify`.
With `failover`, the VM host running one participant's SuperNode is cut off the network after
the first round (its relays stop and their connections are reset, its link goes down) and the
job must complete on another VM of that hospital.
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsky.controller.cli.client import ApiError, ControllerUnavailable
from fedsky.controller.clouds.superlink import AGGREGATOR_EXECUTABLE
from fedsky.controller.demo import DEMO_PLACEMENT, DEMO_ROUNDS, digits_datasets, example_job_spec
from fedsky.controller.jobs.stages.place import job_limits, job_profile, pinned_offer
from fedsky.controller.onebox import STUDY_HOSPITALS, OneboxError
from fedsky.controller.placement import load_catalog, place
from fedsky.controller.placement.model import DEFAULT_PARAMS, ModelParams
from fedsky.controller.security.pki import CA_CERT_FILE
from fedsky.shared.jobspec import Placement as PlacementLimits
from fedsky.shared.jobspec import load_job_spec
from fedsky.shared.supernode import SUPERNODE_EXECUTABLE

from benchmarks.testbed.hosts import (
    BROKER_PORT,
    ENROLL_PORT,
    SSH_PORT,
    SUPERLINK_PORT,
    TestbedBox,
)
from benchmarks.testbed.measure import ECHO_PORT, echo_services, measure_links, within_tolerance
from benchmarks.testbed.netns import HOST_IF, Testbed, TestbedError, ip, run
from benchmarks.testbed.probe import probe_control
from benchmarks.testbed.relay import Relays, routes_for
from benchmarks.testbed.topology import SUBNET, HospitalSpec, Plan, PlanError, build_plan

log = logging.getLogger(__name__)

SMOKE_HOSPITALS = (
    HospitalSpec("hospital-us", "aws:us-east-1", ("vm1", "vm2")),
    HospitalSpec("hospital-eu", "aws:eu-central-1", ("vm1", "vm2")),
)
SMOKE_ROUNDS = 2
FAILOVER_ROUNDS = 4


@dataclass(frozen=True)
class Scenario:
    """A job to run across the testbed: its hospitals (and their VMs), rounds and limits."""

    name: str
    hospitals: tuple[HospitalSpec, ...]
    rounds: int
    placement: PlacementLimits = field(default_factory=PlacementLimits)


SMOKE = Scenario("testbed-smoke", SMOKE_HOSPITALS, SMOKE_ROUNDS)
# `make demo`'s case study (fedsky.controller.demo): the study's three hospitals, the digits job
# with its limits (85,000 KRW a month, 250 ms, cost:latency 9:1). Each hospital's VM hosts are
# the study's two running VMs that meet the job's minimum (its third is too small).
CASE_STUDY = Scenario(
    "digits-case-study",
    tuple(HospitalSpec(n, loc, ("vm-001", "vm-002")) for n, loc in STUDY_HOSPITALS.items()),
    DEMO_ROUNDS,
    DEMO_PLACEMENT,
)
# The clouds the testbed's launcher serves: placement picks among their offers.
TESTBED_CLOUDS = ("aws",)
JOB_TIMEOUT_S = 420.0
_SUPERNODE = SUPERNODE_EXECUTABLE  # what the agents start (fedsky's pinned SuperNode)
# The aggregator host (the SuperLink behind fedsky's front) the start-up script's unit runs.
_SUPERLINK = AGGREGATOR_EXECUTABLE
_SITE = re.compile(r'(?:^|\s)site="?([a-z0-9-]+)"?')
_TERMINAL = {"completed", "failed", "cancelled"}
_REPO = Path(__file__).resolve().parents[2]
DEFAULT_WHEELHOUSE = _REPO / "dist" / "wheelhouse"


class SmokeError(TestbedError):
    """The smoke run failed; the message says where."""


def job_regions(
    hospitals: Sequence[HospitalSpec],
    *,
    model_mb: float,
    rounds: int,
    limits: PlacementLimits | None = None,
    params: ModelParams = DEFAULT_PARAMS,
) -> tuple[str, str | None]:
    """Where the controller will place this job's aggregator, and the study's baseline: the
    same optimizer on the same inputs (the catalog, the hospitals' locations, the job's limits,
    the launcher's clouds). The region hosts are made for these two only."""
    limits = limits or PlacementLimits()
    result = place(
        participants={h.name: h.location for h in hospitals},
        job=job_profile(limits, model_mb=model_mb, rounds=rounds),
        limits=job_limits(limits),
        catalog=load_catalog(),
        clouds=TESTBED_CLOUDS,
        method=limits.method,
        offer=pinned_offer(limits),
        params=params,
    )
    if result.choice is None:
        raise PlanError(f"the job cannot be placed: {result.reason}")
    choice = f"{result.choice.offer.cloud}:{result.choice.offer.region}"
    base = result.baseline
    return choice, (f"{base.offer.cloud}:{base.offer.region}" if base is not None else None)


def smoke_plan(
    hospitals: Sequence[HospitalSpec] = SMOKE_HOSPITALS,
    *,
    regions: Sequence[str],
    subnet: str = SUBNET,
    prefix: str = "",
) -> Plan:
    """Controller, hospital hosts, VM hosts and the given region hosts (RTTs from the catalog)."""
    return build_plan(hospitals=hospitals, regions=regions, subnet=subnet, prefix=prefix)


def services(plan: Plan) -> dict[str, list[int]]:
    """The ports relayed on every link: the broker and the enrolment listener on ctl, the
    SuperLink on the region hosts, sshd on the VMs, and the echo port of the RTT probes."""
    out: dict[str, list[int]] = {h: list(p) for h, p in echo_services(plan, ECHO_PORT).items()}
    for host in plan.hosts:
        ports = {
            "controller": [BROKER_PORT, ENROLL_PORT],
            "region": [SUPERLINK_PORT],
            "vm": [SSH_PORT],
        }.get(host.role, [])
        out.setdefault(host.name, []).extend(ports)
    return out


# -- SuperNodes, seen from outside ----------------------------------------------------------


@dataclass
class Sighting:
    kind: str  # fedsky-flower-supernode or fedsky-aggregator
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
    t0: float = field(default_factory=time.monotonic)
    # The testbed's namespaces: a process in one of them is this run's whatever it dials.
    namespaces: frozenset[str] = frozenset()

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
                kind, address_flag = _SUPERLINK, "--listen"
            else:
                continue
            # Only this run's: one in a testbed namespace, or dialling or listening on a
            # testbed address from anywhere else (which would be a SuperNode out of place).
            pid = int(entry.name)
            netns = run(["ip", "netns", "identify", str(pid)], check=False).strip()
            address = args[args.index(address_flag) + 1] if address_flag in args[:-1] else ""
            if netns not in self.namespaces and not _in_subnet(
                address.rpartition(":")[0] or address, self.subnet
            ):
                continue
            site = ""
            config = args[args.index("--node-config") + 1] if "--node-config" in args[:-1] else ""
            if m := _SITE.search(config):
                site = m.group(1)
            self.seen[pid] = Sighting(kind, site, pid, netns, round(time.monotonic() - self.t0, 1))

    def of(self, kind: str) -> list[Sighting]:
        return [s for s in self.seen.values() if s.kind == kind]


def _in_subnet(address: str, subnet: str) -> bool:
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(subnet)
    except ValueError:
        return False


# -- the run --------------------------------------------------------------------------------


def ensure_wheelhouse(directory: Path, *, rebuild: bool = True) -> dict[str, Any]:
    """The pinned artifacts the run installs from: the aggregator's (for the machine the
    launcher boots) and the client's (for the VMs), built from this checkout with the same
    command as `make artifacts`. Rebuilt unless `rebuild` is False and a manifest is there."""
    if not rebuild and (directory / "manifest.json").exists():
        return {"built": False}
    started = time.monotonic()
    done = subprocess.run(
        [
            str(_REPO / ".venv" / "bin" / "python")
            if (_REPO / ".venv" / "bin" / "python").exists()
            else "python3",
            str(_REPO / "scripts" / "build_artifacts.py"),
            "--role", "aggregator", "--role", "client",
            "--out", str(directory),
        ],
        capture_output=True, text=True, timeout=1200, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise SmokeError(f"building the pinned artifacts failed: {done.stderr.strip()[-2000:]}")
    return {"built": True, "seconds": round(time.monotonic() - started, 1)}


@dataclass
class Cut:
    """The failover run's cut: which VM host went off the network, and when."""

    participant: str
    vm: str
    host: str
    at_s: float  # since the watch started


@contextmanager
def federation_on_testbed(
    plan: Plan,
    hospitals: Sequence[HospitalSpec],
    *,
    root: Path,
    wheelhouse: Path,
    datasets: Sequence[str],
    timings: dict[str, float],
    placement: str = "",
) -> Iterator[tuple[TestbedBox, Testbed, Relays, list[dict[str, Any]]]]:
    """The testbed up with its relays, links measured, the controller in ctl and every
    hospital's agent online (`datasets`: each agent's `[datasets]` TOML, in hospital order);
    everything stopped and taken down on exit. Adds testbed_s, links_s and daemons_s."""
    t0 = time.monotonic()
    with Testbed(plan) as testbed, Relays(testbed) as relays:
        relays.add(routes_for(plan, services(plan)))
        mark = time.monotonic()
        links = measure_links(testbed, port=ECHO_PORT)
        timings["testbed_s"] = round(mark - t0, 1)
        timings["links_s"] = round(time.monotonic() - mark, 1)
        box = TestbedBox(
            root=root,
            testbed=testbed,
            controller_host=plan.host("ctl"),
            region_hosts=[h for h in plan.hosts if h.role == "region"],
            wheelhouse=wheelhouse,
            launcher_clouds=TESTBED_CLOUDS,
            placement=placement,
        )
        try:
            mark = time.monotonic()
            box.init_ca()
            box.start_controller()
            for spec, agent_datasets in zip(hospitals, datasets, strict=True):
                box.add_hospital(
                    spec,
                    agent_host=plan.host(f"h-{spec.name}"),
                    vm_hosts=[plan.host(f"vm-{spec.name}-{vm}") for vm in spec.vms],
                    datasets=agent_datasets,
                )
                box.start_agent(spec.name)
            box.wait_agents_online(
                [h.name for h in hospitals], vms=min(len(h.vms) for h in hospitals)
            )
            timings["daemons_s"] = round(time.monotonic() - mark, 1)
            yield box, testbed, relays, links
        finally:
            box.stop()


def run_smoke(
    *,
    scenario: Scenario = SMOKE,
    rounds: int | None = None,
    failover: bool = False,
    subnet: str = SUBNET,
    prefix: str = "",
    root: Path | None = None,
    keep_dir: bool = False,
    wheelhouse: Path = DEFAULT_WHEELHOUSE,
    rebuild_wheelhouse: bool = True,
) -> dict[str, Any]:
    """Build the testbed, run one job across it, take everything down; the smoke JSON."""
    hospitals = scenario.hospitals
    rounds = rounds or (max(FAILOVER_ROUNDS, scenario.rounds) if failover else scenario.rounds)
    root = root or Path(tempfile.mkdtemp(prefix="fedsky-testbed-"))
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    timings["wheelhouse_s"] = ensure_wheelhouse(wheelhouse, rebuild=rebuild_wheelhouse).get(
        "seconds", 0.0
    )
    job_file = example_job_spec(
        root,
        name=scenario.name,
        participants=[h.name for h in hospitals],
        rounds=rounds,
        placement=scenario.placement,
    )
    model_mb = (job_file.parent / load_job_spec(job_file).model).stat().st_size / 1e6
    chosen, baseline = job_regions(
        hospitals, model_mb=model_mb, rounds=rounds, limits=scenario.placement
    )
    regions = [chosen] + ([baseline] if baseline and baseline != chosen else [])
    plan = smoke_plan(hospitals, regions=regions, subnet=subnet, prefix=prefix)
    watch = SuperNodeWatch(subnet=plan.subnet, namespaces=frozenset(h.netns for h in plan.hosts))
    cut: Cut | None = None
    try:
        with federation_on_testbed(
            plan,
            hospitals,
            root=root,
            wheelhouse=wheelhouse,
            datasets=[digits_datasets(i, len(hospitals)) for i in range(len(hospitals))],
            timings=timings,
        ) as (box, testbed, relays, links):
            try:
                watch.start()
                started = time.monotonic()
                submitted = json.loads(box.fedctl("job", "submit", str(job_file), "--json").stdout)
                job_id = submitted["id"]
                # What a hospital's machine can do to the aggregator, tried before any cut.
                control_probe = _probe_mid_job(box, plan, job_id, root / "probe")
                if failover:
                    cut = _cut_mid_job(box, relays, testbed, plan, job_id, watch)
                job = wait_job(box, job_id, deadline=started + JOB_TIMEOUT_S)
                timings["job_s"] = round(time.monotonic() - started, 1)
                watch.stop()
                result = _result(plan, job, links, watch, box, chosen=chosen, baseline=baseline)
                if job["state"] == "completed":
                    models = box.fedctl("models", "list", job_id, check=False)
                    result["rounds_table"] = models.stdout.rstrip()
                if cut is not None:
                    result["failover"] = _failover(job, watch, cut)
                result["control_probe"] = control_probe
            finally:
                watch.stop()
    except (OneboxError, ApiError, ControllerUnavailable) as exc:
        raise SmokeError(f"{exc} (files under {root})") from None
    timings["total_s"] = round(time.monotonic() - t0, 1)
    result["timings"] = timings
    if not keep_dir:
        shutil.rmtree(root, ignore_errors=True)
    return result


def wait_job(box: TestbedBox, job_id: str, *, deadline: float) -> dict[str, Any]:
    """The job once it has ended; cancelled and SmokeError at the deadline (monotonic)."""
    started = time.monotonic()
    while True:
        job: dict[str, Any] = box.api.get(f"/v1/jobs/{job_id}")
        if job["state"] in _TERMINAL:
            return job
        if time.monotonic() > deadline:
            box.fedctl("job", "cancel", job_id, check=False)
            raise SmokeError(
                f"job {job_id} did not end within {time.monotonic() - started:.0f} s "
                f"({job['state']})"
            )
        time.sleep(1.0)


def _probe_mid_job(box: TestbedBox, plan: Plan, job_id: str, work: Path) -> dict[str, Any]:
    """Once the job's aggregator is up, what a hospital can do to it with Flower's CLI, tried
    from the first participant's VM host (the hospital's machine that reaches the aggregator)
    with only the CA certificate every hospital holds (`probe.py`)."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = box.api.get(f"/v1/jobs/{job_id}")
        address = (job.get("aggregator") or {}).get("address")
        if job["state"] == "training" and address and job["tasks"]:
            break
        if job["state"] in _TERMINAL or time.monotonic() > deadline:
            raise SmokeError(f"job {job_id} had no running aggregator to probe ({job['state']})")
        time.sleep(0.5)
    participant = job["spec"]["participants"][0]
    vm_host = box.vm_hosts.get((participant, _current_vm(job, participant) or ""))
    if vm_host is None:
        raise SmokeError(f"{participant} has no VM host in job {job_id} to probe from")
    ca = box.controller_dir / "state" / "pki" / CA_CERT_FILE
    return probe_control(address=address, ca_file=ca, work=work, netns=vm_host.host.netns)


def _current_vm(job: dict[str, Any], participant: str) -> str | None:
    tasks = [t for t in job["tasks"] if t["participant"] == participant]
    return str(max(tasks, key=lambda t: t["attempt"])["vm"]) if tasks else None


def _cut_mid_job(
    box: TestbedBox,
    relays: Relays,
    testbed: Testbed,
    plan: Plan,
    job_id: str,
    watch: SuperNodeWatch,
) -> Cut:
    """After the first round, cut off the VM host of the first participant's SuperNode."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        job = box.api.get(f"/v1/jobs/{job_id}")
        if job["state"] in _TERMINAL:
            raise SmokeError(
                f"job {job_id} ended ({job['state']}) before the cut: {job.get('error')}"
            )
        if (job.get("rounds_done") or 0) >= 1:
            break
        if time.monotonic() > deadline:
            raise SmokeError(f"job {job_id} completed no round within {JOB_TIMEOUT_S:g} s")
        time.sleep(0.5)
    participant = job["spec"]["participants"][0]
    vm = _current_vm(job, participant)
    vm_host = box.vm_hosts.get((participant, vm or ""))
    if vm is None or vm_host is None:
        raise SmokeError(f"{participant} has no VM in job {job_id} to cut off")
    host = plan.host(vm_host.host.name)
    relays.cut(host)
    ip("-n", host.netns, "link", "set", HOST_IF, "down")
    at = round(time.monotonic() - watch.t0, 1)
    log.info("cut %s (%s's VM %s) at %.1f s", host.netns, participant, vm, at)
    return Cut(participant=participant, vm=vm, host=host.netns, at_s=at)


def _failover(job: dict[str, Any], watch: SuperNodeWatch, cut: Cut) -> dict[str, Any]:
    """Where the cut participant went and how long it was out: from the cut until its next
    SuperNode was seen running in another VM host (from /proc and `ip netns identify`)."""
    again = [
        s
        for s in watch.of(_SUPERNODE)
        if s.site == cut.participant and s.netns != cut.host and s.first_s >= cut.at_s
    ]
    back = min(again, key=lambda s: s.first_s) if again else None
    return {
        "participant": cut.participant,
        "from_vm": cut.vm,
        "to_vm": _current_vm(job, cut.participant),
        "cut_host": cut.host,
        "to_host": back.netns if back else None,
        "out_s": round(back.first_s - cut.at_s, 1) if back else None,
    }


def _started_by(machine: dict[str, Any] | None, superlink: Sighting | None) -> str:
    """ "user-data" when the SuperLink seen running is the service the machine's user data
    started (the pid its systemctl recorded) and the user data ran to its end."""
    if machine is None or superlink is None:
        return "unknown"
    services = machine.get("services") or {}
    if machine.get("user_data_exit") == 0 and superlink.pid in services.values():
        return "user-data"
    return "unknown"


def _result(
    plan: Plan,
    job: dict[str, Any],
    links: list[dict[str, Any]],
    watch: SuperNodeWatch,
    box: TestbedBox,
    *,
    chosen: str,
    baseline: str | None,
) -> dict[str, Any]:
    aggregator = job.get("aggregator") or {}
    region_netns = {h.netns for h in plan.hosts if h.role == "region"}
    superlinks = [s for s in watch.of(_SUPERLINK) if s.netns in region_netns]
    superlink = superlinks[-1] if superlinks else None
    machines = [m for m in box.machines() if m["job"] == job["id"]]
    machine = machines[-1] if machines else None
    participants = []
    for participant in job["spec"]["participants"]:
        vm = _current_vm(job, participant)
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
            "address": aggregator.get("address"),
            "started_by": _started_by(machine, superlink),
            "provider": job.get("provider"),
            "ref": aggregator.get("ref"),
            "placed_on": f"{placement['cloud']}:{placement['region']}" if placement else None,
            "instance_type": placement.get("instance_type"),
            "predicted_region": chosen,
            "baseline_region": baseline,
            "superlink_pid": superlink.pid if superlink else None,
            "user_data_exit": machine.get("user_data_exit") if machine else None,
            "user_data_s": machine.get("user_data_s") if machine else None,
        },
        "participants": participants,
        "supernodes_seen": [
            {"site": s.site, "pid": s.pid, "netns": s.netns, "at_s": s.first_s}
            for s in watch.of(_SUPERNODE)
        ],
        "addresses": {h.netns: h.address for h in plan.hosts},
        "hosts": {
            "controller": plan.host("ctl").netns,
            "agents": sorted(box.agent_netns.values()),
            "vms": [h.netns for h in plan.hosts if h.role == "vm"],
            "regions": sorted(region_netns),
        },
        "links": links,
        # The placement's predicted round time beside each round's measured one (the job's).
        "round_times": job.get("round_times") or [],
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
    vm_hosts = set(result["hosts"]["vms"])
    for s in result["supernodes_seen"]:
        if s["netns"] not in vm_hosts:
            out.append(f"a SuperNode (pid {s['pid']}) ran in {s['netns']!r}, not in a VM host")
    aggregator = result["aggregator"]
    if not aggregator["host"]:
        out.append("the aggregator's SuperLink was not seen running in a region host")
    if aggregator["started_by"] != "user-data":
        out.append(f"the aggregator was started by {aggregator['started_by']!r}, not its user data")
    if (
        aggregator["placed_on"]
        and aggregator["host"]
        and not aggregator["host"].endswith("r-" + aggregator["placed_on"].replace(":", "-"))
    ):
        out.append(f"placed on {aggregator['placed_on']}, yet it ran in {aggregator['host']}")
    for link in result["links"]:
        if not within_tolerance(link["rtt_target_ms"], link["rtt_measured_ms"]):
            out.append(
                f"link {link['from']}-{link['to']}: {link['rtt_measured_ms']} ms measured, "
                f"target {link['rtt_target_ms']} ms"
            )
    if "control_probe" in result:
        probe = result["control_probe"]
        for attempt in probe["attempts"]:
            if not attempt["refused"]:
                out.append(
                    f"{attempt['command']} from {probe['from']} was not refused "
                    f"(exit {attempt['exit_code']}): {attempt['said']}"
                )
        if probe["foreign_code_ran"]:
            out.append("the foreign app's code ran")
    if "failover" in result:
        f = result["failover"]
        if not f["to_vm"] or f["to_vm"] == f["from_vm"]:
            out.append(f"{f['participant']} did not move off {f['from_vm']} (now {f['to_vm']})")
        if f["out_s"] is None:
            out.append(f"{f['participant']}'s SuperNode was not seen again after the cut")
    return out
