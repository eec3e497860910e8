"""`fedctl job`: submit a job spec and follow it, list, status, cancel, logs, explain."""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

from fedsky.controller.cli.client import ApiClient
from fedsky.controller.cli.output import api_client, call_api, fail, print_json, print_table
from fedsky.controller.orchestrator.explain import render_explain
from fedsky.shared import exitcodes
from fedsky.shared.config import ConfigError
from fedsky.shared.jobspec import load_job_spec
from fedsky.shared.modelfile import MAX_MODEL_FILE_BYTES

END_STATES = ("completed", "failed", "cancelled")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    job = sub.add_parser("job", help="federated-learning jobs")
    j_sub = job.add_subparsers(dest="job_command", metavar="ACTION")
    j_sub.required = True

    submit = j_sub.add_parser("submit", help="submit a job spec (TOML or YAML) with its model file")
    submit.add_argument("spec", type=Path)
    submit.add_argument("--follow", action="store_true", help="show progress until the job ends")
    submit.add_argument("--json", action="store_true")
    submit.set_defaults(func=_submit)

    ls = j_sub.add_parser("list", help="every job")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    status = j_sub.add_parser("status", help="one job, its participants and tasks")
    status.add_argument("job")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    cancel = j_sub.add_parser(
        "cancel", help="cancel a job: every SuperNode and the aggregator stop"
    )
    cancel.add_argument("job")
    cancel.set_defaults(func=_cancel)

    logs = j_sub.add_parser("logs", help="the job's log")
    logs.add_argument("job")
    logs.add_argument("--follow", action="store_true")
    logs.set_defaults(func=_logs)

    explain = j_sub.add_parser("explain", help="per participant, each VM considered and why")
    explain.add_argument("job")
    explain.add_argument("--json", action="store_true")
    explain.set_defaults(func=_explain)


def _submit(args: argparse.Namespace) -> int:
    try:
        spec = load_job_spec(args.spec)
    except ConfigError as exc:
        return fail(str(exc), exitcodes.USAGE)
    try:
        size = spec.model.stat().st_size
        if size > MAX_MODEL_FILE_BYTES:
            return fail(
                f"{spec.model}: the model file is {size / (1 << 20):.1f} MiB; the controller "
                f"takes model files up to {MAX_MODEL_FILE_BYTES >> 20} MiB",
                exitcodes.USAGE,
            )
        data = spec.model.read_bytes()
    except OSError as exc:
        return fail(f"cannot read the model file {spec.model}: {exc.strerror}", exitcodes.USAGE)
    client = api_client(args)
    model, code = call_api(lambda: client.upload("/v1/model-files", data))
    if model is None:
        return code
    body = {"spec": spec.model_dump(mode="json"), "model_digest": model["digest"]}
    job, code = call_api(lambda: client.post("/v1/jobs", body))
    if job is None:
        return code
    if args.json and not args.follow:
        print_json(job)
        return exitcodes.OK
    print(
        f"job {job['id']} submitted ({spec.name}: {len(spec.participants)} participants, "
        f"{spec.hyperparameters.rounds} rounds)",
        file=sys.stderr if args.json else sys.stdout,
    )
    if not args.follow:
        print(f"follow it with: fedctl job logs {job['id']} --follow")
        return exitcodes.OK
    return _follow(client, job["id"], rounds=spec.hyperparameters.rounds, as_json=args.json)


def _follow(client: ApiClient, job_id: str, *, rounds: int, as_json: bool) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=as_json)
    after = 0
    job: dict[str, Any] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        bar = progress.add_task("rounds", total=rounds)
        while True:
            path = f"/v1/jobs/{job_id}/logs?after={after}"
            lines, code = call_api(functools.partial(client.get, path))
            if lines is None:
                return code
            for line in lines:
                after = max(after, int(line["id"]))
                progress.console.print(f"{line['at'][11:19]} {line['message']}")
            current, code = call_api(lambda: client.get(f"/v1/jobs/{job_id}"))
            if current is None:
                return code
            job = current
            progress.update(bar, completed=job["rounds_done"], description=job["state"])
            if job["state"] in END_STATES:
                break
            time.sleep(1.0)
    if as_json:
        print_json(job)
    else:
        print(f"job {job_id}: {job['state']}" + (f": {job['error']}" if job.get("error") else ""))
    return exitcodes.OK if job["state"] == "completed" else exitcodes.FAILED


def _list(args: argparse.Namespace) -> int:
    jobs, code = call_api(lambda: api_client(args).get("/v1/jobs"))
    if jobs is None:
        return code
    if args.json:
        print_json(jobs)
        return exitcodes.OK
    rows = [
        [
            j["id"],
            j["name"],
            j["state"],
            f"{j['rounds_done']}/{j['spec']['hyperparameters']['rounds']}",
            (j.get("placement") or {}).get("choice", {}).get("instance_type", "")
            if j.get("placement")
            else "",
            j["created_at"][:19],
            (j.get("error") or "")[:60],
        ]
        for j in jobs
    ]
    print_table(
        ["job", "name", "state", "rounds", "aggregator", "created", "error"], rows, empty="no jobs"
    )
    return exitcodes.OK


def _status(args: argparse.Namespace) -> int:
    job, code = call_api(lambda: api_client(args).get(f"/v1/jobs/{args.job}"))
    if job is None:
        return code
    if args.json:
        print_json(job)
        return exitcodes.OK
    print(f"job        {job['id']} ({job['name']})")
    print(f"state      {job['state']}" + (f": {job['error']}" if job.get("error") else ""))
    print(f"rounds     {job['rounds_done']}/{job['spec']['hyperparameters']['rounds']}")
    placement = job.get("placement") or {}
    if placement.get("choice"):
        c = placement["choice"]
        print(
            f"placement  {c['cloud']}:{c['region']} {c['instance_type']} via {placement['provider']}"
        )
    if job.get("aggregator"):
        print(f"aggregator {job['aggregator']['address']} ({job['aggregator']['provider']})")
    rows = [
        [t["participant"], t["attempt"], t["vm"], t["state"], t["key_role"], t["reason"][:60]]
        for t in job["tasks"]
    ]
    print()
    print_table(
        ["participant", "attempt", "vm", "state", "key", "reason"], rows, empty="no tasks yet"
    )
    return exitcodes.OK


def _cancel(args: argparse.Namespace) -> int:
    job, code = call_api(lambda: api_client(args).post(f"/v1/jobs/{args.job}/cancel"))
    if job is None:
        return code
    print(f"job {job['id']}: {job['state']}")
    return exitcodes.OK


def _logs(args: argparse.Namespace) -> int:
    client = api_client(args)
    after = 0
    while True:
        path = f"/v1/jobs/{args.job}/logs?after={after}"
        lines, code = call_api(functools.partial(client.get, path))
        if lines is None:
            return code
        for line in lines:
            after = max(after, int(line["id"]))
            print(f"{line['at']} {line['level']:<7} {line['message']}")
        sys.stdout.flush()
        if not args.follow:
            return exitcodes.OK
        job, code = call_api(lambda: client.get(f"/v1/jobs/{args.job}"))
        if job is None:
            return code
        if job["state"] in END_STATES and not lines:
            return exitcodes.OK
        time.sleep(1.0)


def _explain(args: argparse.Namespace) -> int:
    data, code = call_api(lambda: api_client(args).get(f"/v1/jobs/{args.job}/explain"))
    if data is None:
        return code
    if args.json:
        print_json(data)
    else:
        print(render_explain(data))
    return exitcodes.OK
