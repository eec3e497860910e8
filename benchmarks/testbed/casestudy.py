"""`python -m benchmarks.testbed --case-study`: the original study's case study, measured.

One job -- fedsky's 26 MB CNN (the `xray` example) on 64x64 grey images made here, the same
examples, epochs and rounds every time -- placed by fedsky for the study's baseline (an
`m5.xlarge` in `us-east-1`, pinned with the job spec's `placement.offer`) and for the cost:latency
weightings 9:1, 5:5 and 1:9 (the demo's limits), and run across the testbed: the controller, each
hospital's agent and VMs, and the aggregator booted in the chosen region's host by its own
start-up script. Every link is delayed as the catalog's RTT table says, and the region hosts'
links are shaped to `LINK_CLASSES_MBPS` with tc tbf.

The controller's model is given the same figures: the links (`[placement]
participant_link_mbps` and `aggregator_link_mbps`) and the participants' work per round,
measured here before the jobs: the job's model and data run through Flower on this machine's
loopback (`local_round`: a SuperLink and a SuperNode per hospital, sharing this machine's cores
as the testbed's hosts do), less what the model counts as the loopback's transfers. The
ClientApp's work alone (`fedsky.shared.flower.calibrate`, one process per hospital at once) is
measured too and reported beside it: it leaves out Flower's per-message costs (docs/placement.md).

Per row, the controller's prediction beside the run: the median of the job's recorded round
durations, and the cost per job from the catalog's prices with the measured hours (the rounds
at that median) and the measured egress (every byte the aggregator's region host sent on any
link, counted by the relays). A one-round warm-up job first installs the client payload in the
VMs, so that no row's rounds share the machine with an install.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from fedsky.agent import payload
from fedsky.controller.cli.client import ApiError, ControllerUnavailable
from fedsky.controller.demo import DEMO_PLACEMENT, example_job_spec
from fedsky.controller.onebox import OneboxError
from fedsky.controller.placement.defaults import BASELINE_OFFER, DEFAULT_KRW_PER_USD
from fedsky.controller.placement.model import (
    DEFAULT_PARAMS,
    JobProfile,
    egress_usd,
    hours,
    round_time_s,
)
from fedsky.shared.datasets import write_catalog
from fedsky.shared.flower.calibrate import Calibration, Workload, calibrate
from fedsky.shared.jobspec import Placement as PlacementLimits

from benchmarks.fl_overhead import run_bare, synthetic_xray
from benchmarks.testbed.hosts import TestbedBox
from benchmarks.testbed.relay import Relays
from benchmarks.testbed.smoke import (
    CASE_STUDY,
    DEFAULT_WHEELHOUSE,
    SmokeError,
    ensure_wheelhouse,
    federation_on_testbed,
    job_regions,
    wait_job,
)
from benchmarks.testbed.topology import SUBNET, HospitalSpec, Host, Role, build_plan

HOSPITALS: tuple[HospitalSpec, ...] = CASE_STUDY.hospitals
CASE_ROUNDS = 3
# Training images per class at each hospital (a quarter as many again for evaluation).
IMAGES_PER_CLASS = 64
LEARNING_RATE = 0.01
# The link classes, Mbit/s: an aggregator's region host (shared by its participants' copies of
# the weights). The hospitals' own uplinks are not shaped: at 1 Gbit/s they are not the limit.
LINK_CLASSES_MBPS: Mapping[Role, float] = {"region": 200.0}
PARTICIPANT_LINK_MBPS = 1000.0
TESTBED_PARAMS = replace(
    DEFAULT_PARAMS,
    link_mbps=PARTICIPANT_LINK_MBPS,
    aggregator_link_mbps=LINK_CLASSES_MBPS["region"],
)
# The rows: the baseline (pinned) and the study's weightings (cost weight).
ROWS: tuple[tuple[str, float | None], ...] = (
    ("baseline", None),
    ("0.9", 0.9),
    ("0.5", 0.5),
    ("0.1", 0.1),
)
# What the original study reports against its baseline (fractions).
STUDY_CHANGES: Mapping[str, str] = {
    "0.9": "study: -41% cost",
    "0.1": "study: -19% cost, -7% time",
}
CURRENCY = "KRW"
MAX_ERROR = 0.10  # what each row's time and cost errors must stay within
JOB_TIMEOUT_S = 600.0
PAYLOAD_TIMEOUT_S = 600.0
PAYLOAD_VENV = "/opt/fedsky/venv"  # where the agent installs the client payload in a VM
WARM_UP_ROUNDS = 1
# The local round's calibration: its rounds, and what the model takes the loopback to be.
# Six: a round's waits for the SuperNodes' fixed 3 s polls fall differently in each round, and
# the median of three rounds varied by 4 s from one run to the next (18.7, 19.3, 23.0 s).
LOCAL_ROUNDS = 6
LOOPBACK_RTT_MS = 0.1
LOOPBACK_VCPUS = 2.0
MACHINE_END_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class Row:
    label: str
    weight_cost: float | None
    limits: PlacementLimits


@dataclass(frozen=True)
class LocalRound:
    """The job's round on this machine without the WAN: measured, and what of it the model
    puts down to the network."""

    round_s: float
    network_s: float

    @property
    def calibration(self) -> Calibration:
        # Everything but the network is the participants' per-round work as Flower runs it:
        # training, evaluation and each message's process start and polling. The model adds
        # it once per round (as training); the evaluation's share is in it.
        work = max(0.0, self.round_s - self.network_s)
        return Calibration(train_s=round(work, 2), eval_s=0.0, concurrency=len(HOSPITALS))


def local_round(work: Path, *, model_mb: float, per_class: int) -> LocalRound:
    """Run the job's model and data through Flower on this machine's loopback (a SuperLink
    with TLS and node authentication, a SuperNode per hospital, `LOCAL_ROUNDS` rounds) and
    take the median round; the model's own figure for the loopback's transfers is the part it
    counts as network."""
    work.mkdir(parents=True, exist_ok=True)
    bare = asyncio.run(
        run_bare(
            nodes=len(HOSPITALS),
            rounds=LOCAL_ROUNDS,
            model="xray",
            work=work,
            measure_fixed_costs=False,
            torch_threads=None,  # torch's default, as a job's SuperNodes run
            xray_per_class=per_class,
        )
    )
    n = len(HOSPITALS)
    network = round_time_s(
        JobProfile(model_mb=model_mb, rounds=1, train_s=0.0, eval_s=0.0),
        np.full((n, 1), LOOPBACK_RTT_MS),
        np.array([LOOPBACK_VCPUS]),
    )
    return LocalRound(
        round_s=round(statistics.median(bare.rounds_s), 2), network_s=round(float(network[0]), 2)
    )


def row_limits(weight_cost: float | None, calibration: Calibration) -> PlacementLimits:
    """The job's `[placement]` for a row: the baseline pinned without limits, or the demo's
    limits with the row's weighting; the measured training and evaluation seconds in both."""
    measured = {"train_s": calibration.train_s, "eval_s": calibration.eval_s}
    if weight_cost is None:
        return PlacementLimits(offer=":".join(BASELINE_OFFER), **measured)
    return DEMO_PLACEMENT.model_copy(update={"cost_weight": weight_cost, **measured})


def hospital_datasets(root: Path, *, per_class: int) -> tuple[list[str], list[Path]]:
    """Each hospital's images, the agent's dataset TOML for them, and a catalog file of them
    for the calibration."""
    sections, catalogs = [], []
    for i, hospital in enumerate(HOSPITALS):
        spec = synthetic_xray(root / "data" / hospital.name, seed=i, per_class=per_class)
        # The agent's own entry, and each VM's: the images are where its SuperNode runs (the
        # VM hosts share this machine's file system).
        where = ["datasets.xray", *(f"vms.{vm}.datasets.xray" for vm in hospital.vms)]
        sections.append(
            "".join(f'[{w}]\nkind = "image-folder"\nroot = "{spec.root}"\n' for w in where)
        )
        catalogs.append(write_catalog(root / "data" / f"{hospital.name}.json", {"xray": spec}))
    return sections, catalogs


def _wait_payloads(box: TestbedBox) -> None:
    """Every VM has the client payload (the warm-up job installs it where it runs, and the
    agents then install it in their idle VMs): no row pays for an install in its rounds."""
    deadline = time.monotonic() + PAYLOAD_TIMEOUT_S
    marker = f"{PAYLOAD_VENV}/{payload.MARKER_NAME}"
    while missing := [v.host.name for v in box.vm_hosts.values() if not v.own(marker).exists()]:
        if time.monotonic() > deadline:
            raise SmokeError(f"the client payload is not installed in {', '.join(missing)}")
        time.sleep(2.0)


def _wait_machine_ended(box: TestbedBox, job_id: str) -> None:
    """The job's aggregator machine is terminated before the next job boots one."""
    deadline = time.monotonic() + MACHINE_END_TIMEOUT_S
    while True:
        machines = [m for m in box.machines() if m["job"] == job_id]
        if machines and all("terminated_at" in m for m in machines):
            return
        if time.monotonic() > deadline:
            raise SmokeError(f"job {job_id}'s aggregator machine did not end")
        time.sleep(1.0)


def measure_row(
    *,
    job: Mapping[str, Any],
    egress_bytes: int,
    model_mb: float,
    krw_per_usd: float = DEFAULT_KRW_PER_USD,
) -> dict[str, Any]:
    """The controller's prediction and the run's measurement of one completed job."""
    choice = (job.get("placement") or {}).get("choice") or {}
    timed = [r for r in job.get("round_times") or [] if r["measured_s"]]
    rounds = [r["measured_s"] for r in timed]
    phases = [r["phases_s"] for r in timed if r.get("phases_s")]
    if not choice or not rounds:
        raise SmokeError(f"job {job['id']} has no placement or no measured round")
    n = len(job["spec"]["participants"])
    usd_h, usd_gb = float(choice["usd_per_hour"]), float(choice["egress_usd_per_gb"])
    predicted_s = float(choice["round_time_s"])
    # The median round: one round slowed by something else on this shared machine (another
    # VM's install, a neighbour) does not stand for the placement.
    measured_s = statistics.median(rounds)
    job_profile = JobProfile(model_mb=model_mb, rounds=len(rounds))
    predicted_usd = float(
        (
            hours(job_profile, "job", np.array([predicted_s])) * usd_h
            + egress_usd(job_profile, n, np.array([usd_gb]))
        )[0]
    )
    measured_usd = len(rounds) * measured_s / 3600 * usd_h + egress_bytes / 1e9 * usd_gb
    return {
        "cloud": choice["cloud"],
        "region": choice["region"],
        "instance_type": choice["instance_type"],
        "predicted_round_s": round(predicted_s, 2),
        "measured_round_s": round(measured_s, 2),
        "predicted_cost": round(predicted_usd * krw_per_usd, 2),
        "measured_cost": round(measured_usd * krw_per_usd, 2),
        "currency": CURRENCY,
        "rounds": len(rounds),
        "rounds_s": rounds,
        # Each phase's median over the rounds, as the ServerApp timed them.
        "phases_s": {
            name: round(statistics.median(p[name] for p in phases), 2)
            for name in ("train", "aggregate", "evaluate")
        }
        if phases
        else None,
        "egress_bytes": egress_bytes,
    }


def with_comparisons(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Errors (|predicted - measured| / measured) and changes against the baseline row, as
    fractions."""
    base = next(r for r in rows if r["label"] == "baseline")
    out = []
    for r in rows:
        time_error = abs(r["predicted_round_s"] - r["measured_round_s"]) / r["measured_round_s"]
        cost_error = abs(r["predicted_cost"] - r["measured_cost"]) / r["measured_cost"]
        out.append(
            {
                **r,
                "error": round(time_error, 4),
                "time_error": round(time_error, 4),
                "cost_error": round(cost_error, 4),
                "cost_change_vs_baseline": round(
                    (r["measured_cost"] - base["measured_cost"]) / base["measured_cost"], 4
                ),
                "time_change_vs_baseline": round(
                    (r["measured_round_s"] - base["measured_round_s"]) / base["measured_round_s"],
                    4,
                ),
            }
        )
    return out


def run_case_study(
    *,
    rounds: int = CASE_ROUNDS,
    images_per_class: int = IMAGES_PER_CLASS,
    subnet: str = SUBNET,
    prefix: str = "",
    root: Path | None = None,
    keep_dir: bool = False,
    wheelhouse: Path = DEFAULT_WHEELHOUSE,
    rebuild_wheelhouse: bool = True,
    warm_up: bool = True,
) -> dict[str, Any]:
    """Calibrate, place every row, run each row's job on one testbed; the case study JSON.
    Without `warm_up` the first rows' rounds may share the machine with payload installs
    (for a check of the output's shape, not of its figures)."""
    root = root or Path(tempfile.mkdtemp(prefix="fedsky-casestudy-"))
    root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    timings["wheelhouse_s"] = ensure_wheelhouse(wheelhouse, rebuild=rebuild_wheelhouse).get(
        "seconds", 0.0
    )
    sections, catalogs = hospital_datasets(root, per_class=images_per_class)
    probe = example_job_spec(
        root, name="calibration", participants=[h.name for h in HOSPITALS], rounds=rounds,
        example="xray", learning_rate=LEARNING_RATE,
    )  # fmt: skip
    model = probe.parent / "xray-cnn.safetensors"
    model_mb = model.stat().st_size / 1e6
    mark = time.monotonic()
    processes = calibrate(
        workloads=[
            Workload(
                model=model,
                datasets=catalog,
                dataset="xray",
                site=h.name,
                learning_rate=LEARNING_RATE,
            )
            for h, catalog in zip(HOSPITALS, catalogs, strict=True)
        ]
    )
    timings["calibration_s"] = round(time.monotonic() - mark, 1)
    mark = time.monotonic()
    local = local_round(root / "local-round", model_mb=model_mb, per_class=images_per_class)
    timings["local_round_s"] = round(time.monotonic() - mark, 1)
    calibration = local.calibration
    rows = [Row(label, w, row_limits(w, calibration)) for label, w in ROWS]
    regions: list[str] = []
    for row in rows:
        chosen, _ = job_regions(
            HOSPITALS, model_mb=model_mb, rounds=rounds, limits=row.limits, params=TESTBED_PARAMS
        )
        regions.append(chosen)
    plan = build_plan(
        hospitals=HOSPITALS,
        regions=list(dict.fromkeys(regions)),
        subnet=subnet,
        prefix=prefix,
        bandwidth_mbps=LINK_CLASSES_MBPS,
    )
    measured: list[dict[str, Any]] = []
    try:
        with federation_on_testbed(
            plan,
            HOSPITALS,
            root=root,
            wheelhouse=wheelhouse,
            datasets=sections,
            timings=timings,
            placement="\n".join(
                [
                    f"participant_link_mbps = {TESTBED_PARAMS.link_mbps}",
                    f"aggregator_link_mbps = {TESTBED_PARAMS.aggregator_link_mbps}",
                ]
            ),
        ) as (box, _testbed, relays, links):
            if warm_up:  # not measured: installs the payload in the VMs the rows will use
                mark = time.monotonic()
                first = Row("warm-up", None, rows[0].limits)
                region_host = plan.host("r-" + regions[0].replace(":", "-"))
                _run_row(box, relays, first, region_host=region_host, root=root,
                         rounds=WARM_UP_ROUNDS, model_mb=model_mb, timings=timings)  # fmt: skip
                _wait_payloads(box)
                timings["warm_up_s"] = round(time.monotonic() - mark, 1)
            for row, region in zip(rows, regions, strict=True):
                host = plan.host("r-" + region.replace(":", "-"))
                measured.append(
                    _run_row(box, relays, row, region_host=host, root=root, rounds=rounds,
                             model_mb=model_mb, timings=timings)
                )  # fmt: skip
    except (OneboxError, ApiError, ControllerUnavailable) as exc:
        raise SmokeError(f"{exc} (files under {root})") from None
    timings["total_s"] = round(time.monotonic() - t0, 1)
    result: dict[str, Any] = {
        "rows": with_comparisons(measured),
        "calibration": {
            "train_s": calibration.train_s,
            "eval_s": calibration.eval_s,
            "local_round_s": local.round_s,
            "local_network_s": local.network_s,
            # The ClientApp's work alone, fresh processes (what the first version used).
            "process_train_s": processes.train_s,
            "process_eval_s": processes.eval_s,
        },
        "job": {"model_mb": round(model_mb, 2), "rounds": rounds, "participants": len(HOSPITALS)},
        "links_mbps": {"participant": PARTICIPANT_LINK_MBPS, **LINK_CLASSES_MBPS},
        "links": links,
        "timings": timings,
    }
    if not keep_dir:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _run_row(
    box: TestbedBox,
    relays: Relays,
    row: Row,
    *,
    region_host: Host,
    root: Path,
    rounds: int,
    model_mb: float,
    timings: dict[str, float],
) -> dict[str, Any]:
    (root / row.label).mkdir(exist_ok=True)
    spec = example_job_spec(
        root / row.label, name=f"case-{row.label}", participants=[h.name for h in HOSPITALS],
        rounds=rounds, placement=row.limits, example="xray", learning_rate=LEARNING_RATE,
    )  # fmt: skip
    started = time.monotonic()
    before = relays.sent_bytes().get(region_host.address, 0)
    job_id = json.loads(box.fedctl("job", "submit", str(spec), "--json").stdout)["id"]
    job = wait_job(box, job_id, deadline=started + JOB_TIMEOUT_S)
    if job["state"] != "completed":
        raise SmokeError(f"row {row.label}: job {job_id} ended {job['state']}: {job.get('error')}")
    _wait_machine_ended(box, job_id)
    egress = relays.sent_bytes().get(region_host.address, 0) - before
    timings[f"job_{row.label}_s"] = round(time.monotonic() - started, 1)
    placed = (job.get("placement") or {}).get("choice") or {}
    if region_host.location != f"{placed.get('cloud')}:{placed.get('region')}":
        raise SmokeError(f"row {row.label}: placed on {placed}, not in {region_host.name}")
    return {
        "label": row.label,
        "weight_cost": row.weight_cost,
        **measure_row(job=job, egress_bytes=egress, model_mb=model_mb),
    }


def table(result: Mapping[str, Any]) -> str:
    """The rows in the original study's form, with its reported changes beside them."""
    job, cal = result["job"], result["calibration"]
    lines = [
        f"Case study on the testbed: {job['rounds']} rounds of the {job['model_mb']:.0f} MB CNN "
        f"across {job['participants']} hospitals; training {cal['train_s']} s and evaluation "
        f"{cal['eval_s']} s per round as calibrated; cost per job in {CURRENCY}.",
        "",
        f"{'row':<9} {'aggregator':<34} {'round s pred':>12} {'meas':>7} {'err':>6} "
        f"{'cost pred':>10} {'meas':>8} {'err':>6} {'cost vs base':>13} {'time vs base':>13}",
    ]
    for r in result["rows"]:
        where = f"{r['cloud']}:{r['region']} {r['instance_type']}"
        lines.append(
            f"{r['label']:<9} {where:<34} {r['predicted_round_s']:>12.1f} "
            f"{r['measured_round_s']:>7.1f} {r['time_error']:>6.1%} {r['predicted_cost']:>10.1f} "
            f"{r['measured_cost']:>8.1f} {r['cost_error']:>6.1%} "
            f"{r['cost_change_vs_baseline']:>+13.1%} {r['time_change_vs_baseline']:>+13.1%}"
            + (f"  ({STUDY_CHANGES[r['label']]})" if r["label"] in STUDY_CHANGES else "")
        )
    return "\n".join(lines)
