"""Where the time of a federated round goes: the fedsky app run bare (what `flwr run` sends).

    python -m benchmarks.fl_overhead [--nodes 3] [--rounds 3] [--model digits] [--json]

Sets up what a fedsky job runs on, by hand: a SuperLink with TLS and SuperNode authentication,
N SuperNodes on label-skewed partitions of the digits data, then times a run of the fedsky app
(FedAvg, exact federated metrics, file sink) started and followed through the Control API with
the controller's certificate (the aggregator's front refuses a plain `flwr run`). Prints:

1. Set-up: SuperLink start, SuperNodes online.
2. The run: its wall time, the rounds' own durations (from the ServerApp), and the
   time outside rounds (app start, end of run).
3. One message's life at a SuperNode, averaged over nodes and rounds, from the SuperNodes' own
   log lines time-stamped as they are written: waiting for it (the SuperNode polls every 3 s;
   the ServerApp waits for the slowest node), receiving it, the SuperExec starting a
   `flwr-clientapp` process up to the end of Flower's imports, the rest of that process (the
   fedsky ClientApp: its imports, torch, the data, training or evaluation, the reply handed
   back), sending the reply.
4. Fixed costs a fresh ClientApp process pays, each measured in its own new interpreter.

Then the same app, data, model and rounds as a fedsky job (`--no-job` skips it): a controller
with its managed broker and one agent per hospital on libvirt test nodes (`Onebox`), each agent
with the same partition as a dataset, and `fedctl job submit SPEC --follow --json` timed from
start to end. Printed: both wall times, their ratio, the job's fixed start-up (submit to the
start of round 1, from the job log) and where it goes (placing, launching the aggregator,
assigning: per-participant VM choice, keys, registration, SuperNode start; `flwr run`; the
ServerApp up to its first round), and the time after the last round (the job's end, clean-up,
`--follow` noticing). The aim: job wall time within 1.1x of bare plus a fixed start-up under
10 s.

`run_bare()` and `run_job()` are the reusable parts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from fedsky.controller.clouds.base import AggregatorSpec
from fedsky.controller.clouds.local import LocalProvider, pki_tls_issuer
from fedsky.controller.clouds.superlink import prepare_app_dir
from fedsky.controller.onebox import STUDY_HOSPITALS, Onebox
from fedsky.controller.security.pki import Pki
from fedsky.shared.datasets import BundledDatasetSpec, ImageFolderSpec, Partition, write_catalog
from fedsky.shared.flower.runconfig import RunSettings
from fedsky.shared.flower.sink import read_file_sink
from fedsky.shared.modelfile import make_example
from fedsky.shared.net import free_port
from fedsky.shared.supernode import SUPERNODE_EXECUTABLE, generate_node_key, supernode_command

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EVENTS = {
    "Receiving:": "receiving",
    "Received successfully": "received",
    "Start `flwr-clientapp` process": "spawned",  # logged by the new process after Flower's imports
    "Sending:": "sending",
    "Sent successfully": "sent",
}


@dataclass
class Timeline:
    """Time-stamped events of one SuperNode, from its own output."""

    events: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def follow(self, stream: TextIO, log: TextIO) -> None:
        for line in stream:
            now = time.time()
            log.write(f"{now:.3f} {line}")
            clean = _ANSI.sub("", line)
            for marker, name in _EVENTS.items():
                if marker in clean:
                    with self.lock:
                        self.events.append((now, name))


@dataclass
class BareResult:
    nodes: int
    rounds: int
    model: str
    superlink_start_s: float
    nodes_online_s: float
    flwr_run_wall_s: float
    rounds_s: list[float]
    outside_rounds_s: float
    accuracy: list[float]
    phase_s: dict[str, float]  # mean per message at a SuperNode
    fixed_costs_s: dict[str, float]


def _spawn(
    argv: list[str], env: dict[str, str], log_path: Path
) -> tuple[subprocess.Popen[str], Timeline, TextIO]:
    proc = subprocess.Popen(
        argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    tl = Timeline()
    log = open(log_path, "w")  # noqa: SIM115 - the caller closes it
    threading.Thread(target=tl.follow, args=(proc.stdout, log), daemon=True).start()
    return proc, tl, log


def _phases(timelines: list[Timeline]) -> dict[str, float]:
    parts: dict[str, list[float]] = {
        "wait_for_message": [],
        "receive": [],
        "spawn_and_flwr_imports": [],
        "fedsky_clientapp": [],
        "send_reply": [],
    }
    for tl in timelines:
        last_sent: float | None = None
        cur: dict[str, float] = {}
        for t, name in tl.events:
            cur[name] = t
            if name == "sent" and {"receiving", "received", "spawned", "sending"} <= cur.keys():
                if last_sent is not None:
                    parts["wait_for_message"].append(cur["receiving"] - last_sent)
                parts["receive"].append(cur["received"] - cur["receiving"])
                parts["spawn_and_flwr_imports"].append(cur["spawned"] - cur["received"])
                parts["fedsky_clientapp"].append(cur["sending"] - cur["spawned"])
                parts["send_reply"].append(cur["sent"] - cur["sending"])
                last_sent = t
                cur = {}
    return {k: round(statistics.fmean(v), 3) for k, v in parts.items() if v}


def synthetic_xray(root: Path, *, seed: int, per_class: int = 40) -> ImageFolderSpec:
    """Grey 64x64 images in the chest X-ray layout for the 26 MB model: noise, with a brighter
    patch in the "covid" class so that training has something to learn."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", per_class // 4)):
        for label, cls in enumerate(("normal", "covid")):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                pixels = rng.integers(0, 200, (64, 64), dtype=np.uint8)
                pixels[20:44, 20:44] += np.uint8(55 * label)
                Image.fromarray(pixels).save(d / f"{k}.png")
    return ImageFolderSpec(kind="image-folder", root=root)


def fixed_costs() -> dict[str, float]:
    """Seconds a new interpreter spends on each import or first call (median of 3)."""
    probes = {
        "python_start": "pass",
        "import_flwr_clientapp_runtime": "import flwr.supernode.cli.flwr_clientapp",
        "import_fedsky_client_app": "import fedsky.shared.flower.client_app",
        "import_torch": "import torch",
        "torch_optim_first_use": "import torch; t=__import__('time').perf_counter(); "
        "torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1); "
        "print(__import__('time').perf_counter()-t)",
        "import_sklearn_datasets": "import sklearn.datasets",
    }
    out: dict[str, float] = {}
    for name, code in probes.items():
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            res = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True
            )
            total = time.perf_counter() - t0
            runs.append(float(res.stdout.strip()) if name == "torch_optim_first_use" else total)
        out[name] = round(statistics.median(runs), 3)
    base = out["python_start"]
    for name in list(out):
        if name.startswith("import_"):
            out[name] = round(out[name] - base, 3)
    return out


async def run_bare(
    *,
    nodes: int = 3,
    rounds: int = 3,
    model: str = "digits",
    work: Path,
    measure_fixed_costs: bool = True,
    torch_threads: int | None = 1,
    xray_per_class: int = 40,
) -> BareResult:
    """`torch_threads=None` leaves torch its default, as a fedsky job's SuperNodes do."""
    pki = Pki.init(work / "pki")
    pki.write_controller_identity()  # the front serves Control to the controller only
    provider = LocalProvider(
        work_dir=work / "aggregators",
        issue_tls=pki_tls_issuer(pki),
        control_identity=pki.controller_identity,
    )
    t0 = time.monotonic()
    handle = await provider.launch(
        AggregatorSpec(job_id="bench", cloud="local", region="local", instance_type="local")
    )
    superlink_start = time.monotonic() - t0
    control = provider.control(handle)
    procs: list[subprocess.Popen[str]] = []
    timelines: list[Timeline] = []
    logs: list[TextIO] = []
    bin_dir = str(Path(sys.executable).parent)
    try:
        t1 = time.monotonic()
        for i in range(nodes):
            site = f"hospital-{i}"
            d = work / site
            keys = generate_node_key(d / "keys")
            await control.register_node(keys.public_key, name=site)
            # The node certificate a fedsky job's SuperNode gets (the front asks for it).
            node_cert = d / "node.crt"
            node_cert.write_bytes(pki.issue_node(site, keys.public_text()).cert_pem)
            catalog = write_catalog(
                d / "datasets.json",
                {
                    "digits": BundledDatasetSpec(
                        kind="digits",
                        partition=Partition(index=i, count=nodes, scheme="label-skew", seed=11),
                    ),
                    "xray": synthetic_xray(d / "xray", seed=i, per_class=xray_per_class),
                },
            )
            cmd = supernode_command(
                superlink=str(handle.address),
                root_ca=provider.tls("bench").ca_file,
                private_key=keys.private_key,
                site=site,
                dataset_config=catalog,
                runtime_port=free_port(),
                flwr_home=d / "flwr-home",
                node_config={"torch-threads": torch_threads} if torch_threads else {},
                executable=f"{bin_dir}/{SUPERNODE_EXECUTABLE}",
                bin_dir=bin_dir,
                node_cert=node_cert,
            )
            proc, tl, log = _spawn(cmd.argv, {**os.environ, **cmd.env}, d / "supernode.log")
            logs.append(log)
            procs.append(proc)
            timelines.append(tl)
        while sum(n.status == "online" for n in await control.list_nodes()) < nodes:
            if time.monotonic() - t1 > 120:
                raise RuntimeError("SuperNodes did not come online within 120 s")
            await asyncio.sleep(0.25)
        nodes_online = time.monotonic() - t1

        model_file = work / f"{model}.safetensors"
        make_example(model, model_file)  # type: ignore[arg-type]
        sink = work / "sink"
        settings = RunSettings.model_validate(
            {
                "job-id": "bench",
                "num-rounds": rounds,
                "min-participants": nodes,
                "expected-participants": nodes,
                "model-file": str(model_file),
                "dataset": "xray" if model == "xray" else "digits",
                "sink": "file",
                "sink-dir": str(sink),
                "learning-rate": 0.05,
                "round-timeout-s": 600,
            }
        )
        run_config = work / "run.toml"
        run_config.write_text(settings.to_toml())
        app = prepare_app_dir(work / "app")
        t2 = time.monotonic()
        # The run started and followed through the Control API with the controller's
        # certificate, as a fedsky job's is: the aggregator's front serves Control to nothing
        # else (a plain `flwr run` is refused there).
        run_id = await control.start_run(app_dir=app, settings=settings, run_config_file=run_config)
        status = await control.run_status(run_id)
        while not status.startswith("finished"):
            if time.monotonic() - t2 > 3600:
                raise RuntimeError(f"run {run_id} did not finish within an hour ({status})")
            await asyncio.sleep(0.2)
            status = await control.run_status(run_id)
        wall = time.monotonic() - t2
        if status != "finished:completed":
            raise RuntimeError(f"the run ended {status}")
        done, end = read_file_sink(sink)
        if end is None or end.status != "completed":
            raise RuntimeError(f"the run did not complete: {end}")
        durations = [r.duration_s for r in done]
        return BareResult(
            nodes=nodes,
            rounds=rounds,
            model=model,
            superlink_start_s=round(superlink_start, 3),
            nodes_online_s=round(nodes_online, 3),
            flwr_run_wall_s=round(wall, 3),
            rounds_s=[round(d, 3) for d in durations],
            outside_rounds_s=round(wall - sum(durations), 3),
            accuracy=[round(r.accuracy, 4) for r in done],
            phase_s=_phases(timelines),
            fixed_costs_s=fixed_costs() if measure_fixed_costs else {},
        )
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for log in logs:
            log.close()
        await provider.terminate(handle)


@dataclass
class JobResult:
    nodes: int
    rounds: int
    model: str
    onebox_start_s: float  # controller, broker, agents online (not part of the job)
    submit_wall_s: float  # `fedctl job submit --follow --json`, start to exit
    startup_s: float  # submit to the start of round 1
    stages_s: dict[str, float]  # the start-up, step by step, from the job log
    rounds_s: list[float]
    after_rounds_s: float  # end of the last round to the exit of `fedctl`
    accuracy: list[float]
    log: list[str] = field(default_factory=list)


_ROUND_LINE = re.compile(r"^round (\d+)/\d+: .*\(\d+ sites, ([0-9.]+) s\)$")


def _dataset_toml(name: str, spec: BundledDatasetSpec | ImageFolderSpec) -> str:
    if isinstance(spec, ImageFolderSpec):
        return f'[datasets.{name}]\nkind = "image-folder"\nroot = {json.dumps(str(spec.root))}\n'
    p = spec.partition
    assert p is not None
    return (
        f'[datasets.{name}]\nkind = "{spec.kind}"\n'
        f'partition = {{ index = {p.index}, count = {p.count}, scheme = "{p.scheme}", '
        f"seed = {p.seed} }}\n"
    )


def _job_spec(directory: Path, *, hospitals: list[str], rounds: int, model: str) -> Path:
    """The job: what `run_bare` runs (learning rate 0.05, 1 local epoch, batch 32)."""
    model_file = directory / f"{model}.safetensors"
    make_example(model, model_file)  # type: ignore[arg-type]
    spec = directory / "job.toml"
    spec.write_text(
        f'name = "fl-overhead"\n'
        f"participants = {json.dumps(hospitals)}\n"
        f'model = "{model_file.name}"\n'
        f'dataset = "{"xray" if model == "xray" else "digits"}"\n'
        'selection_metric = "f1"\n'
        "[hyperparameters]\n"
        f"rounds = {rounds}\n"
        "local_epochs = 1\n"
        "batch_size = 32\n"
        "learning_rate = 0.05\n"
        "round_timeout_s = 600\n"
        "[resources]\nvcpus = 2\nmemory_gib = 4\ndisk_gib = 20\n"
        "[placement]\n"
        'max_cost = "85000 KRW/month"\n'
        "max_latency_ms = 250\n"
        "cost_weight = 0.5\n"
    )
    return spec


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def _stages(lines: list[dict[str, Any]], submitted: float) -> tuple[dict[str, float], float]:
    """Start-up steps (seconds after submit, each from the job log) and round 1's start."""
    marks: dict[str, float] = {}
    round1 = None
    for line in lines:
        at, msg = _stamp(line["at"]), str(line["message"])
        for key, prefix in (
            ("created", "job "),
            ("placing", "state: placing"),
            ("placed", "placed on "),
            ("aggregator_up", "aggregator up"),
            ("assigning", "state: assigning"),
            ("training", "state: training"),
            ("flwr_run_started", "Flower run "),
        ):
            if msg.startswith(prefix) and key not in marks:
                marks[key] = at
        m = _ROUND_LINE.match(msg)
        if m and int(m.group(1)) == 1:
            round1 = at - float(m.group(2))  # the line is written at the round's end
    if round1 is None:
        raise RuntimeError("the job log has no line for round 1")
    steps: dict[str, float] = {}
    prev, prev_name = submitted, "submit"
    for key in (
        "created",
        "placing",
        "placed",
        "aggregator_up",
        "assigning",
        "training",
        "flwr_run_started",
    ):
        if key in marks:
            steps[f"{prev_name}->{key}"] = round(marks[key] - prev, 3)
            prev, prev_name = marks[key], key
    steps[f"{prev_name}->round_1_start"] = round(round1 - prev, 3)
    return steps, round1


def run_job(*, nodes: int = 3, rounds: int = 3, model: str = "digits", work: Path) -> JobResult:
    """The same federation as `run_bare`, as a fedsky job through the controller and agents."""
    locations = list(STUDY_HOSPITALS.values())
    hospitals = {f"hospital-{i}": locations[i % len(locations)] for i in range(nodes)}
    extra = {}
    for i, name in enumerate(hospitals):
        data: BundledDatasetSpec | ImageFolderSpec = BundledDatasetSpec(
            kind="digits", partition=Partition(index=i, count=nodes, scheme="label-skew", seed=11)
        )
        if model == "xray":
            data = synthetic_xray(work / "data" / name, seed=i)
        extra[name] = _dataset_toml("xray" if model == "xray" else "digits", data)
    box = Onebox(root=work / "box", report_interval_s=3.0, poll_interval_s=0.5, agent_extra=extra)
    try:
        t0 = time.monotonic()
        box.start(hospitals)
        onebox_start = time.monotonic() - t0
        spec = _job_spec(work, hospitals=list(hospitals), rounds=rounds, model=model)
        submitted = time.time()
        t1 = time.monotonic()
        done = box.fedctl("job", "submit", str(spec), "--follow", "--json", timeout=3600)
        wall = time.monotonic() - t1
        ended = submitted + wall
        job = json.loads(done.stdout)
        lines: list[dict[str, Any]] = box.api.get(f"/v1/jobs/{job['id']}/logs?after=0")
        text = [f"{ln['at'][11:23]} {ln['message']}" for ln in lines]
        if job["state"] != "completed":
            raise RuntimeError(f"the job did not complete: {job.get('error')}\n" + "\n".join(text))
        stages, round1 = _stages(lines, submitted)
        models = box.api.get(f"/v1/jobs/{job['id']}/models")
        kept = models["rounds"] if isinstance(models, dict) else models
        last_end = max(_stamp(ln["at"]) for ln in lines if _ROUND_LINE.match(str(ln["message"])))
        return JobResult(
            nodes=nodes,
            rounds=rounds,
            model=model,
            onebox_start_s=round(onebox_start, 3),
            submit_wall_s=round(wall, 3),
            startup_s=round(round1 - submitted, 3),
            stages_s=stages,
            rounds_s=[round(float(r["duration_s"]), 3) for r in kept],
            after_rounds_s=round(ended - last_end, 3),
            accuracy=[round(float(r["metrics"]["accuracy"]), 4) for r in kept],
            log=text,
        )
    finally:
        box.stop()


def _print(r: BareResult) -> None:
    print(
        f"bare `flwr run` of the fedsky app: {r.nodes} SuperNodes, {r.rounds} rounds, {r.model} model"
    )
    print(
        f"  set-up        SuperLink up in {r.superlink_start_s:.1f} s, SuperNodes online in {r.nodes_online_s:.1f} s"
    )
    print(f"  flwr run      {r.flwr_run_wall_s:.1f} s wall")
    print(
        f"  rounds        {', '.join(f'{d:.1f}' for d in r.rounds_s)} s (sum {sum(r.rounds_s):.1f} s)"
    )
    print(f"  outside       {r.outside_rounds_s:.1f} s (app start, end of run)")
    print(f"  accuracy      {', '.join(f'{a:.3f}' for a in r.accuracy)}")
    print("  one message at a SuperNode (mean s):")
    for k, v in r.phase_s.items():
        print(f"    {k:<20} {v:6.2f}")
    if r.fixed_costs_s:
        print("  fixed costs of a new ClientApp process (s):")
        for k, v in r.fixed_costs_s.items():
            print(f"    {k:<32} {v:6.2f}")


def _print_job(job: JobResult, bare: BareResult) -> None:
    print(f"the same as a fedsky job (`fedctl job submit --follow`), {job.nodes} agents")
    print(f"  set-up        controller, broker, agents online in {job.onebox_start_s:.1f} s")
    print(f"  job           {job.submit_wall_s:.1f} s wall")
    print(
        f"  rounds        {', '.join(f'{d:.1f}' for d in job.rounds_s)} s (sum {sum(job.rounds_s):.1f} s)"
    )
    print(f"  start-up      {job.startup_s:.1f} s from submit to the start of round 1:")
    for k, v in job.stages_s.items():
        print(f"    {k:<34} {v:6.2f}")
    print(f"  after rounds  {job.after_rounds_s:.1f} s (job end, clean-up, fedctl noticing)")
    print(f"  accuracy      {', '.join(f'{a:.3f}' for a in job.accuracy)}")
    rounds_bare = sum(bare.rounds_s)
    rounds_job = sum(job.rounds_s)
    print("comparison")
    print(
        f"  wall          bare {bare.flwr_run_wall_s:.1f} s, fedsky job {job.submit_wall_s:.1f} s: "
        f"ratio {job.submit_wall_s / bare.flwr_run_wall_s:.2f}"
    )
    print(
        f"  rounds        bare {rounds_bare:.1f} s, fedsky job {rounds_job:.1f} s: "
        f"ratio {rounds_job / rounds_bare:.2f}"
    )
    print(
        f"  fixed         job start-up {job.startup_s:.1f} s; "
        f"job wall - 1.1 x bare wall = {job.submit_wall_s - 1.1 * bare.flwr_run_wall_s:.1f} s"
    )


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("digits", "xray"), default="digits")
    parser.add_argument("--no-job", action="store_true", help="only the bare `flwr run`")
    parser.add_argument(
        "--repeat", type=int, default=1, help="bare/job pairs to run (medians are printed)"
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedsky-fl-overhead-"))
    pairs: list[tuple[BareResult, JobResult | None, str]] = []
    try:
        for i in range(max(1, args.repeat)):
            # Bare first, with nothing else of fedsky running; in a comparison torch keeps its
            # default threads, as a job's SuperNodes have it, so both run the same ClientApps.
            load_before = _load()
            bare = asyncio.run(
                run_bare(
                    nodes=args.nodes,
                    rounds=args.rounds,
                    model=args.model,
                    work=work / f"bare-{i}",
                    measure_fixed_costs=False,
                    torch_threads=1 if args.no_job else None,
                )
            )
            job = None
            if not args.no_job:
                job = run_job(
                    nodes=args.nodes, rounds=args.rounds, model=args.model, work=work / f"job-{i}"
                )
            pairs.append((bare, job, f"{load_before} -> {_load()}"))
        pairs[-1][0].fixed_costs_s = fixed_costs()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        out = [
            {"bare": asdict(b), "job": asdict(j) if j else None, "load_average": load}
            for b, j, load in pairs
        ]
        print(json.dumps(out if len(out) > 1 else out[0], indent=2))
        return 0
    bare, job, load = pairs[-1]
    _print(bare)
    if job is not None:
        _print_job(job, bare)
    print(f"  load average (1, 5, 15 min) {load}  (other work on this host slows both sides)")
    if len(pairs) > 1 and job is not None:
        print(f"{len(pairs)} pairs (bare wall, job wall, ratio, rounds ratio, start-up):")
        ratios, round_ratios, startups = [], [], []
        for b, j, load in pairs:
            assert j is not None
            ratios.append(j.submit_wall_s / b.flwr_run_wall_s)
            round_ratios.append(sum(j.rounds_s) / sum(b.rounds_s))
            startups.append(j.startup_s)
            print(
                f"  {b.flwr_run_wall_s:6.1f} s {j.submit_wall_s:6.1f} s  {ratios[-1]:.2f}  "
                f"{round_ratios[-1]:.2f}  {j.startup_s:4.1f} s   load {load}"
            )
        print(
            f"  median: wall ratio {statistics.median(ratios):.2f}, rounds ratio "
            f"{statistics.median(round_ratios):.2f}, start-up {statistics.median(startups):.1f} s"
        )
    if args.keep:
        print(f"  logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
