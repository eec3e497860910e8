"""Where the time of a federated round goes: the fedsky app run by bare `flwr run`.

    python -m benchmarks.fl_overhead [--nodes 3] [--rounds 3] [--model digits] [--json]

Sets up what a fedsky job runs on, by hand: a SuperLink with TLS and SuperNode authentication,
N SuperNodes on label-skewed partitions of the digits data, then times `flwr run APP --stream`
of the fedsky app (FedAvg, exact federated metrics, file sink). Prints:

1. Set-up: SuperLink start, SuperNodes online.
2. The run: wall time of `flwr run`, the rounds' own durations (from the ServerApp), and the
   time outside rounds (app start, end of run).
3. One message's life at a SuperNode, averaged over nodes and rounds, from the SuperNodes' own
   log lines time-stamped as they are written: waiting for it (the SuperNode polls every 3 s;
   the ServerApp waits for the slowest node), receiving it, the SuperExec starting a
   `flwr-clientapp` process up to the end of Flower's imports, the rest of that process (the
   fedsky ClientApp: its imports, torch, the data, training or evaluation, the reply handed
   back), sending the reply.
4. Fixed costs a fresh ClientApp process pays, each measured in its own new interpreter.

`run_bare()` is the reusable part: the fedsky-job side of the comparison calls it for the
bare figure.
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
from pathlib import Path
from typing import TextIO

from fedsky.controller.pki import Pki
from fedsky.controller.providers.base import AggregatorSpec
from fedsky.controller.providers.local import LocalProvider, free_port, pki_tls_issuer
from fedsky.controller.providers.superlink import prepare_app_dir
from fedsky.shared.datasets import BundledDatasetSpec, ImageFolderSpec, Partition, write_catalog
from fedsky.shared.flower.runconfig import RunSettings
from fedsky.shared.flower.sink import read_file_sink
from fedsky.shared.modelfile import make_example
from fedsky.shared.supernode import generate_node_key, supernode_command

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


def _synthetic_xray(root: Path, *, seed: int, per_class: int = 40) -> ImageFolderSpec:
    """Grey 64x64 noise images in the chest X-ray layout, for the 26 MB model (timing only)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", per_class // 4)):
        for cls in ("normal", "covid"):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(d / f"{k}.png")
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
) -> BareResult:
    pki = Pki.init(work / "pki")
    provider = LocalProvider(work_dir=work / "aggregators", issue_tls=pki_tls_issuer(pki))
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
            catalog = write_catalog(
                d / "datasets.json",
                {
                    "digits": BundledDatasetSpec(
                        kind="digits",
                        partition=Partition(index=i, count=nodes, scheme="label-skew", seed=11),
                    ),
                    "xray": _synthetic_xray(d / "xray", seed=i),
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
                node_config={"torch-threads": 1},
                executable=f"{bin_dir}/flower-supernode",
                bin_dir=bin_dir,
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
        res = await asyncio.to_thread(
            subprocess.run,
            control.run_command(app_dir=app, run_config_file=run_config, stream=True),
            env=control.env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        wall = time.monotonic() - t2
        if res.returncode != 0:
            raise RuntimeError(f"flwr run failed: {res.stdout[-2000:]} {res.stderr[-2000:]}")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("digits", "xray"), default="digits")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedsky-fl-overhead-"))
    try:
        result = asyncio.run(
            run_bare(nodes=args.nodes, rounds=args.rounds, model=args.model, work=work)
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        _print(result)
        if args.keep:
            print(f"  logs in {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
