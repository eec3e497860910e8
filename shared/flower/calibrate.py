"""How long a participant's ClientApp takes per round on this machine, measured.

Placement's round time adds the links' transfer times to the local training and evaluation a
participant does each round; those two come from here rather than a constant. Each phase is
timed as the ClientApp runs it: a fresh Python process (Flower starts one per message) that
reads the model file and the site's dataset, builds the network, loads the weights, trains the
job's epochs (or evaluates) and encodes the weights it would send back. With `concurrency` N,
N such processes run at once and the slowest counts: N participants sharing one machine's
cores, as the testbed's VMs do.

    python -m fedsky.shared.flower.calibrate --model m.safetensors --datasets datasets.json \
        --dataset xray --site hospital-us --epochs 1 --batch-size 32

prints the `[placement]` lines a job spec takes (`train_s`, `eval_s`); `--json` for scripts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

PHASES = ("train", "evaluate")
Phase = Literal["train", "evaluate"]
CHILD_TIMEOUT_S = 3600.0


class CalibrationError(RuntimeError):
    """A calibration process failed; the message says which and why."""


@dataclass(frozen=True)
class Workload:
    """What one participant does per round: the job's model, the site's data, the job's
    hyperparameters."""

    model: Path
    datasets: Path  # the site's dataset catalog
    dataset: str
    site: str
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.01
    optimizer: str = "sgd"
    threads: int = 0  # torch threads; 0: torch's own choice, as a job's SuperNodes run

    def argv(self, phase: Phase) -> list[str]:
        return [
            sys.executable, "-m", "fedsky.shared.flower.calibrate", "--child", phase,
            "--model", str(self.model), "--datasets", str(self.datasets),
            "--dataset", self.dataset, "--site", self.site,
            "--epochs", str(self.epochs), "--batch-size", str(self.batch_size),
            "--lr", str(self.learning_rate), "--optimizer", self.optimizer,
            "--threads", str(self.threads),
        ]  # fmt: skip


@dataclass(frozen=True)
class Calibration:
    train_s: float
    eval_s: float
    concurrency: int

    def job_spec_lines(self) -> str:
        return f"train_s = {self.train_s:.1f}\neval_s = {self.eval_s:.1f}\n"


def _timed(phase: Phase, workload: Workload) -> float:
    argv = workload.argv(phase)
    started = time.monotonic()
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
    )
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CalibrationError(f"the calibration's {phase} process failed: {tail}")
    return elapsed


def calibrate(*, workloads: Sequence[Workload], repeats: int = 1) -> Calibration:
    """Time each phase for every workload at once (one process each); the slowest counts, the
    fastest of `repeats` tries."""
    if not workloads:
        raise CalibrationError("nothing to calibrate: no workload")
    best: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=len(workloads)) as pool:
        for phase in PHASES:
            for _ in range(max(1, repeats)):
                times = list(pool.map(lambda w, p=phase: _timed(p, w), workloads))
                best[phase] = min(best.get(phase, float("inf")), max(times))
    return Calibration(
        train_s=round(best["train"], 2),
        eval_s=round(best["evaluate"], 2),
        concurrency=len(workloads),
    )


def _child(phase: Phase, w: Workload) -> None:
    """One ClientApp message's work, as client_app.py does it."""
    import torch
    from fedsky.shared.datasets import load_catalog, load_dataset
    from fedsky.shared.flower.training import evaluate, train
    from fedsky.shared.modelfile import (
        build_module,
        load_weights,
        module_weights,
        read_model_file,
        to_array_record,
    )

    if w.threads > 0:
        torch.set_num_threads(w.threads)
    model = read_model_file(w.model)
    architecture = model.architecture
    spec = load_catalog(w.datasets).resolve(w.dataset, site=w.site)
    data = load_dataset(
        spec,
        input_shape=architecture.input_shape,
        num_classes=architecture.num_classes,
        class_names=architecture.class_names,
    )
    module = build_module(architecture)
    load_weights(module, model.weights)
    if phase == "train":
        train(
            module,
            data.x_train,
            data.y_train,
            epochs=w.epochs,
            batch_size=w.batch_size,
            learning_rate=w.learning_rate,
            optimizer=w.optimizer,
            seed=0,
        )
        to_array_record(module_weights(module))
    else:
        evaluate(module, data.x_eval, data.y_eval, num_classes=architecture.num_classes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fedsky.shared.flower.calibrate",
        description="Measure a participant's local training and evaluation time per round.",
    )
    parser.add_argument("--model", type=Path, required=True, help="the job's model file")
    parser.add_argument("--datasets", type=Path, required=True, help="the site's dataset catalog")
    parser.add_argument("--dataset", required=True, help="the job's dataset name")
    parser.add_argument("--site", default="calibration")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="participants sharing this machine's cores"
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    workload = Workload(
        model=args.model,
        datasets=args.datasets,
        dataset=args.dataset,
        site=args.site,
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        optimizer=args.optimizer,
        threads=args.threads,
    )
    if args.child:
        _child(args.child, workload)
        return 0
    for name in ("model", "datasets"):
        if not getattr(args, name).is_file():
            print(f"error: {getattr(args, name)} is not a file", file=sys.stderr)
            return 2
    try:
        result = calibrate(workloads=[workload] * max(1, args.concurrency), repeats=args.repeats)
    except CalibrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(result)))
    else:
        print("# [placement] of the job spec, measured on this machine")
        print(result.job_spec_lines(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
