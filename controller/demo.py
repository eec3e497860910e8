"""`make demo`: the original study's case study end to end on this machine.

1. A controller with its managed Mosquitto (mutual TLS), and three hospitals (US, Asia, Europe),
   each an agent on a libvirt test node holding the study's five VMs, enrolled with a CSR.
2. `fedctl vms`: what the hospitals' private clouds hold.
3. `fedctl place` for the cost:latency weights 9:1, 5:5 and 1:9 against the baseline.
4. A federated job on the digits data split across the three hospitals, per-round metrics as it
   trains, and the best round's weights written to a file.

Everything it started is stopped at the end unless `--keep` is given.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from fedsky.controller.onebox import STUDY_HOSPITALS, Onebox, OneboxError
from fedsky.shared.jobspec import MaxCost, Placement
from fedsky.shared.net import free_port

if TYPE_CHECKING:
    from fedsky.shared.modelfile import ExampleName


def _show_metrics(url: str) -> None:
    """What `curl -s URL | grep '^fedsky_'` shows."""
    import urllib.request

    print(f"$ curl -s {url} | grep '^fedsky_'", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 (our own listener)
            text = answer.read().decode()
    except OSError as exc:
        print(f"(metrics not reachable: {exc})", flush=True)
        return
    for line in text.splitlines():
        if (
            line.startswith("fedsky_") and not line.startswith("fedsky_round_duration_seconds_")
        ) or line.startswith(
            ("fedsky_round_duration_seconds_count", "fedsky_round_duration_seconds_sum")
        ):
            print(line, flush=True)


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _show(box: Onebox, *args: str) -> str:
    print(f"$ fedctl {' '.join(args)}", flush=True)
    done = box.fedctl(*args, check=False, timeout=600)
    out = done.stdout + (done.stderr if done.returncode else "")
    print(out.rstrip(), flush=True)
    return done.stdout


DEMO_ROUNDS = 5


# The case study's limits: 85,000 KRW a month, 250 ms, cost:latency 9:1.
DEMO_PLACEMENT = Placement(
    max_cost=MaxCost(amount=85000, currency="KRW", per="month"),
    max_latency_ms=250,
    cost_weight=0.9,
)


def example_job_spec(
    directory: Path,
    *,
    name: str,
    participants: Sequence[str],
    rounds: int,
    placement: Placement = DEMO_PLACEMENT,
    example: ExampleName = "digits",
    learning_rate: float = 0.05,
) -> Path:
    """A job spec (and its model file, `<example>-cnn.safetensors`) in `directory`: one of
    fedsky's example networks trained on the dataset of the same name across `participants`.
    The demo's case study is the digits CNN; the testbed's runs use these too."""
    from fedsky.shared.modelfile import make_example

    model = directory / f"{example}-cnn.safetensors"
    make_example(example, model)
    spec = directory / f"{name}.toml"
    names = ", ".join(f'"{n}"' for n in participants)
    limits = [f"cost_weight = {placement.cost_weight}", f'method = "{placement.method}"']
    if placement.max_cost is not None:
        limits.append(f'max_cost = "{placement.max_cost}"')
    if placement.max_latency_ms is not None:
        limits.append(f"max_latency_ms = {placement.max_latency_ms}")
    if placement.offer is not None:
        limits.append(f'offer = "{placement.offer}"')
    for key in ("train_s", "eval_s"):
        if (value := getattr(placement, key)) is not None:
            limits.append(f"{key} = {value}")
    spec.write_text(
        "\n".join(
            [
                f'name = "{name}"',
                f"participants = [{names}]",
                f'model = "{model.name}"',
                f'dataset = "{example}"',
                'selection_metric = "f1"',
                "[hyperparameters]",
                f"rounds = {rounds}",
                "local_epochs = 1",
                "batch_size = 32",
                f"learning_rate = {learning_rate}",
                "[resources]",
                "vcpus = 2",
                "memory_gib = 4",
                "disk_gib = 20",
                "[placement]",
                *limits,
                "",
            ]
        )
    )
    return spec


def digits_datasets(index: int, count: int) -> str:
    """An agent's `[datasets.digits]`: its own non-IID slice (`index` of `count`) of
    scikit-learn's digits; only the name travels."""
    return (
        "[datasets.digits]\n"
        'kind = "digits"\n'
        f'partition = {{ index = {index}, count = {count}, scheme = "label-skew", seed = 7 }}\n'
    )


def run_demo(*, root: Path, keep: bool) -> int:
    extra = {
        name: digits_datasets(i, len(STUDY_HOSPITALS)) for i, name in enumerate(STUDY_HOSPITALS)
    }
    metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
    box = Onebox(
        root=root,
        report_interval_s=10.0,
        poll_interval_s=1.0,
        agent_extra=extra,
        controller_extra=f'[metrics]\nlisten = "{metrics_url.split("/")[2]}"',
    )
    started = time.monotonic()
    try:
        _say("Starting the controller with its managed broker (mutual TLS) in " + str(root))
        box.init_ca()
        box.start_controller()
        for name, location in STUDY_HOSPITALS.items():
            _say(
                f"Enrolling {name} ({location}): key and CSR at the hospital, signed by the operator"
            )
            box.add_agent(name, location)
            box.start_agent(name)
        box.wait_agents_online(list(STUDY_HOSPITALS))
        _say("The hospitals' agents")
        _show(box, "agents")
        _say("Their VMs, as libvirt reports them")
        _show(box, "vms")
        participants = [f"--participant={n}={loc}" for n, loc in STUDY_HOSPITALS.items()]
        for weight, label in ((0.9, "9:1"), (0.5, "5:5"), (0.1, "1:9")):
            _say(f"Aggregator placement, cost:latency {label}")
            _show(
                box,
                "place",
                *participants,
                "--model-mb=26",
                "--rounds=20",
                "--max-cost=85000 KRW/month",
                "--max-latency-ms=250",
                f"--cost-weight={weight}",
            )
        _say("The controller's metrics for monitoring (Prometheus format), before the job")
        _show_metrics(metrics_url)
        _say("A federated job on digits across the three hospitals (data never leaves them)")
        spec = example_job_spec(
            root, name="digits-case-study", participants=list(STUDY_HOSPITALS), rounds=DEMO_ROUNDS
        )
        print(f"$ fedctl job submit {spec} --follow", flush=True)
        done = box.fedctl(
            "job", "submit", str(spec), "--follow", "--json", check=False, timeout=900
        )
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            raise OneboxError("the federated job did not complete")
        import json

        job = json.loads(done.stdout)
        print(done.stderr.strip()[-6000:])
        _say("Per-round global metrics (from the summed confusion matrices)")
        _show(box, "models", "list", job["id"])
        _say("The best round by F1, and the model downloaded with its signed metadata")
        _show(box, "models", "best", job["id"], "--metric", "f1")
        out = root / "best-model.safetensors"
        _show(box, "models", "download", job["id"], "--best", "--metric", "f1", "-o", str(out))
        _show(box, "models", "verify", str(out))
        print(f"\nbest model: {out}")
        _say("The metrics after the job: jobs, placements, attempts, rounds, reports")
        _show_metrics(metrics_url)
        _say(f"Done in {time.monotonic() - started:.0f} s")
        if keep:
            print(f"Still running. fedctl --config {box.controller_config} agents")
            print(
                f"Stop with: kill -TERM -{box.controller.pid if box.controller else '?'} and the agents"
            )
        return 0
    except OneboxError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        if not keep:
            box.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedsky-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--keep", action="store_true", help="leave the controller and agents running"
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="where to keep the demo's state (default: a new temporary directory)",
    )
    args = parser.parse_args(argv)
    root = args.dir or Path(tempfile.mkdtemp(prefix="fedsky-demo-"))
    return run_demo(root=root.resolve(), keep=args.keep)


if __name__ == "__main__":
    sys.exit(main())
