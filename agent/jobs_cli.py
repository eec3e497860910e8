"""`agentctl jobs`: the hospital IT's say on fedsky's jobs here (`[policy] approval = "manual"`).

    agentctl jobs pending [--json]         the jobs waiting for a decision
    agentctl jobs list [--json]            every job asked about, with its decision
    agentctl jobs approve JOB              let it train here (for the whole job)
    agentctl jobs deny JOB [--reason TEXT] refuse it (the controller is told, with the reason)

The decision is written to the agent's approvals file; the running agent answers the
controller within a second (or at its next start). Exit codes: 0 done, 1 the decision could
not be taken (unknown job, already decided), 69 the approvals file cannot be opened, 78 the
config is invalid.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path

from fedsky.shared import exitcodes

from .policy import Approval, ApprovalBook, Decision, DecisionError, NoApprovalsYet

_REASON_MAX = 256
_STATE_DIR_HELP = "the agent's state directory (default: from the config)"


def who() -> str:
    """The person deciding, as the audit log will name them: the login, and the one behind
    sudo when there is one."""
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = f"uid {os.getuid()}"
    behind = os.environ.get("SUDO_USER")
    return f"{behind} (via sudo as {login})" if behind and behind != login else login


def _when(moment: float | None) -> str:
    if moment is None:
        return "-"
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _print(approvals: list[Approval], *, empty: str) -> None:
    if not approvals:
        print(empty)
        return
    rows = [["JOB", "STATE", "DATASET", "VM", "ASKED", "DECIDED BY", "REASON"]]
    rows += [
        [
            a.job_id,
            a.state,
            a.dataset,
            a.vm,
            _when(a.asked_at),
            a.decided_by or "-",
            a.reason or "-",
        ]
        for a in approvals
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def run_jobs(args: argparse.Namespace, book: ApprovalBook, *, manual: bool) -> int:
    if not manual:
        print(
            'note: this agent\'s [policy] approval is "automatic": jobs start without asking',
            file=sys.stderr,
        )
    try:
        if args.jobs_command in ("pending", "list"):
            state: Decision | None = "pending" if args.jobs_command == "pending" else None
            try:
                approvals = book.jobs(state=state)
            except NoApprovalsYet:
                approvals = []
            if args.json:
                print(json.dumps([a.to_json() for a in approvals], indent=2))
            else:
                _print(approvals, empty="no job waits for a decision" if state else "no job yet")
            return exitcodes.OK
        reason = (getattr(args, "reason", "") or "").strip()
        if len(reason) > _REASON_MAX or not reason.isprintable():
            print(f"--reason: at most {_REASON_MAX} printable characters", file=sys.stderr)
            return exitcodes.USAGE
        decided = book.decide(
            args.job, approve=args.jobs_command == "approve", by=who(), reason=reason
        )
    except DecisionError as exc:
        print(str(exc), file=sys.stderr)
        return exitcodes.FAILED
    except (sqlite3.Error, OSError) as exc:
        print(f"cannot use the approvals file {book.path}: {exc}", file=sys.stderr)
        return exitcodes.UNAVAILABLE
    print(f"job {decided.job_id} {decided.state} by {decided.decided_by}")
    return exitcodes.OK


def add_jobs_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    jobs = sub.add_parser(
        "jobs",
        help="`jobs pending|list|approve JOB|deny JOB`: this hospital's say on fedsky jobs",
        description='With [policy] approval = "manual", each new job waits here until it is '
        "approved or denied.",
    )
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="COMMAND")
    jobs_sub.required = True
    for name, text in (("pending", "jobs waiting for a decision"), ("list", "every job asked")):
        listing = jobs_sub.add_parser(name, help=text)
        listing.add_argument("--json", action="store_true", help="machine-readable output")
        listing.add_argument("--state-dir", type=Path, default=None, help=_STATE_DIR_HELP)
    approve = jobs_sub.add_parser("approve", help="let JOB train here")
    approve.add_argument("job", metavar="JOB")
    deny = jobs_sub.add_parser("deny", help="refuse JOB here")
    deny.add_argument("job", metavar="JOB")
    deny.add_argument("--reason", default="", help="told to the controller and its audit log")
    for decision in (approve, deny):
        decision.add_argument("--state-dir", type=Path, default=None, help=_STATE_DIR_HELP)
        decision.set_defaults(json=False)
