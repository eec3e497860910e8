"""`fedctl models`: rounds of a job, the recommended model, signed download and verification.

Verification runs here, in the CLI, against the controller's public key (fetched from
`/v1/models/signing-key`, or read from a file exported with `fedctl models signing-key -o`), so a
model can also be checked where the controller is out of reach.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fedsky.controller.cli.client import ApiClient
from fedsky.controller.cli.output import (
    api_client,
    call_api,
    fail,
    number_in,
    print_json,
    print_table,
)
from fedsky.controller.models.errors import VerificationError
from fedsky.controller.models.signing import load_public_key, metadata_path_for, verify_download
from fedsky.shared import exitcodes
from fedsky.shared.metrics import METRIC_NAMES, METRICS


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    models = sub.add_parser("models", help="rounds, recommended model, download and verification")
    m_sub = models.add_subparsers(dest="models_command", metavar="ACTION")
    m_sub.required = True

    ls = m_sub.add_parser("list", help="every round of a job: metrics, participants, checkpoint")
    ls.add_argument("job")
    ls.add_argument(
        "--plot", type=Path, metavar="FILE", help="also draw the metric curves (PNG, SVG, PDF)"
    )
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_list)

    best = m_sub.add_parser("best", help="the best round by your criteria, why, and the runners-up")
    best.add_argument("job", nargs="?", help="job id (or --all-jobs)")
    best.add_argument("--all-jobs", action="store_true", help="compare the rounds of every job")
    _criteria_args(best)
    best.add_argument(
        "--runners-up",
        type=number_in(0, 50, whole=True),
        default=3,
        metavar="N",
        help="how many to list (default 3)",
    )
    best.add_argument("--json", action="store_true", help="print JSON")
    best.set_defaults(func=_best)

    dl = m_sub.add_parser(
        "download", help="write a round's weights (safetensors) and signed metadata"
    )
    dl.add_argument("job")
    which = dl.add_mutually_exclusive_group()
    which.add_argument(
        "--round", type=number_in(1, 10_000, whole=True), metavar="N", help="this round"
    )
    which.add_argument(
        "--best", action="store_true", help="the best round by the criteria (the default)"
    )
    _criteria_args(dl)
    dl.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        metavar="FILE",
        help="weights file; the metadata goes beside it as FILE.meta.json",
    )
    dl.set_defaults(func=_download)

    vf = m_sub.add_parser("verify", help="check a downloaded model against its signed metadata")
    vf.add_argument("file", type=Path, help="the weights file")
    vf.add_argument("--meta", type=Path, help="metadata file (default: FILE.meta.json)")
    vf.add_argument(
        "--public-key",
        type=Path,
        metavar="PEM",
        help="the controller's public key (default: ask the running controller)",
    )
    vf.add_argument("--json", action="store_true", help="print the verified metadata as JSON")
    vf.set_defaults(func=_verify)

    key = m_sub.add_parser(
        "signing-key", help="print or export the controller's model signing public key"
    )
    key.add_argument("-o", "--output", type=Path, metavar="FILE", help="write the PEM here")
    key.set_defaults(func=_signing_key)

    pin = m_sub.add_parser("pin", help="keep a round's checkpoint whatever the retention policy")
    pin.add_argument("job")
    pin.add_argument("round", type=number_in(1, 10_000, whole=True))
    pin.add_argument("--unpin", action="store_true", help="let retention prune it again")
    pin.set_defaults(func=_pin)


def _criteria_args(parser: argparse.ArgumentParser) -> None:
    how = parser.add_mutually_exclusive_group()
    how.add_argument(
        "--metric", choices=METRIC_NAMES, help="select by this metric (default: the job's own)"
    )
    how.add_argument(
        "--score",
        metavar="M:W,...",
        help="weighted mix of min-max normalised metrics, e.g. f1:0.7,accuracy:0.3",
    )
    parser.add_argument(
        "--min",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="only rounds with METRIC >= VALUE (repeatable)",
    )
    parser.add_argument(
        "--max",
        action="append",
        default=[],
        metavar="METRIC=VALUE",
        help="only rounds with METRIC <= VALUE (repeatable)",
    )


def _best_path(args: argparse.Namespace, jobs: Sequence[str], all_jobs: bool) -> str:
    query: list[tuple[str, str]] = [("job", j) for j in jobs]
    if all_jobs:
        query.append(("all_jobs", "1"))
    if args.metric:
        query.append(("metric", args.metric))
    if args.score:
        query.append(("score", args.score))
    query += [("min", t) for t in args.min] + [("max", t) for t in args.max]
    query.append(("runners_up", str(getattr(args, "runners_up", 0))))
    return "/v1/models/best?" + urlencode(query)


def _job_path(job: str) -> str:
    return f"/v1/jobs/{quote(job, safe='')}/models"


# The lower panel's curves (the loss first); the upper panel takes matplotlib's own cycle.
_UNBOUNDED_COLOURS = ("tab:red", "tab:purple", "tab:brown", "tab:gray")


def _num(value: Any, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# --- list ----------------------------------------------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    data, code = call_api(lambda: api_client(args).get(_job_path(args.job)))
    if data is None:
        return code
    if args.json:
        print_json(data)
    else:
        job, rounds, recommended = data["job"], data["rounds"], data.get("recommended")
        print(
            f"job {job['job']}{' (' + job['name'] + ')' if job.get('name') else ''}: "
            f"{len(rounds)} rounds, selection metric {job['selection_metric']}, "
            f"retention {job.get('retention')}"
        )
        rows = []
        for r in rounds:
            m, ck = r["metrics"], r.get("checkpoint")
            marks = ("*" if r["round"] == recommended else "") + (
                "pinned" if r.get("pinned") else ""
            )
            rows.append(
                [
                    r["round"],
                    *(_num(m[metric]) for metric in METRIC_NAMES),
                    len(r["participants"]),
                    r["train_examples"],
                    r["eval_examples"],
                    _num(r.get("duration_s"), 1),
                    ck["sha256"][:12] if ck else "pruned",
                    marks,
                ]
            )
        print_table(
            [
                "round",
                *(metric.label for metric in METRICS),
                "sites",
                "train n",
                "eval n",
                "seconds",
                "checkpoint",
                "",
            ],
            rows,
            empty="no rounds recorded yet",
        )
        if recommended is not None:
            print(
                f"* recommended by {job['selection_metric']} "
                f"(`fedctl models best {job['job']}` says why)"
            )
    if args.plot:
        try:
            plot_rounds(data["rounds"], args.plot, title=f"job {data['job']['job']}")
        except (OSError, ValueError) as exc:
            return fail(f"cannot write the plot {args.plot}: {exc}")
        if not args.json:
            print(f"wrote {args.plot}")
    return exitcodes.OK


def plot_rounds(rounds: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Metric curves per round: the ratios on one panel, the unbounded ones (loss) below."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot's import
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    xs = [r["round"] for r in rounds]

    def points(metric: str) -> list[tuple[Any, float]]:
        return [
            (x, r["metrics"][metric])
            for x, r in zip(xs, rounds, strict=True)
            if r["metrics"][metric] is not None
        ]

    for metric in (m for m in METRICS if m.ratio):
        if pts := points(metric.name):
            top.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                markersize=3,
                label=metric.label,
            )
    top.set_ylabel("score")
    top.legend(loc="lower right")
    top.grid(alpha=0.3)
    unbounded = [m for m in METRICS if not m.ratio]
    for i, metric in enumerate(unbounded):
        colour = _UNBOUNDED_COLOURS[i % len(_UNBOUNDED_COLOURS)]
        if pts := points(metric.name):
            bottom.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="o",
                markersize=3,
                color=colour,
                label=metric.label,
            )
    if len(unbounded) > 1:
        bottom.legend(loc="upper right")
    bottom.set_ylabel(" / ".join(m.label for m in unbounded))
    bottom.set_xlabel("round")
    bottom.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)


# --- best ----------------------------------------------------------------------------------------


def _best(args: argparse.Namespace) -> int:
    if bool(args.job) == bool(args.all_jobs):
        return fail("name one JOB or give --all-jobs", exitcodes.USAGE)
    path = _best_path(args, [args.job] if args.job else [], args.all_jobs)
    rec, code = call_api(lambda: api_client(args).get(path))
    if rec is None:
        return code
    if args.json:
        print_json(rec)
    else:
        _print_recommendation(rec, many=args.all_jobs)
    return exitcodes.OK if rec["feasible"] else exitcodes.INFEASIBLE


def _print_recommendation(rec: dict[str, Any], *, many: bool) -> None:
    if not rec["feasible"]:
        print(f"nothing meets the criteria: {rec['reason']}")
        gaps = rec.get("gaps") or []
        if gaps:
            rows = [
                [
                    g["describe"],
                    _num(g["value"]),
                    "" if g["shortfall"] is None else f"{g['shortfall']:.4g}",
                    "" if g["relative"] is None else f"{g['relative']:.1%}",
                    ("job " + str(g["job"]) + " " if many else "") + f"round {g['round']}",
                    "yes" if g["alone"] else "no",
                ]
                for g in gaps
            ]
            print_table(
                ["threshold", "closest value", "short by", "of bound", "where", "alone enough"],
                rows,
            )
        return
    best = rec["best"]
    print(f"best: {('job ' + best['job'] + ' ') if many else ''}round {best['round']}")
    print(f"why:  {rec['reason']}")
    for note in rec.get("notes", []):
        print(f"note: {note}")
    rows = []
    for tag, r in [("best", best)] + [(str(i + 1), r) for i, r in enumerate(rec["runners_up"])]:
        m = r["metrics"]
        rows.append(
            [tag]
            + ([r["job"]] if many else [])
            + [r["round"], f"{r['score']:.4f}"]
            + [_num(m[k]) for k in METRIC_NAMES]
        )
    labels = [metric.label for metric in METRICS]
    print_table(["", *(["job"] if many else []), "round", "score", *labels], rows)


# --- download and verify -------------------------------------------------------------------------


def _temp_beside(path: Path, data: bytes) -> Path:
    """`data` in a new file in `path`'s directory (so that a rename into place is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a model file is not a secret
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _write_atomically(path: Path, data: bytes) -> None:
    os.replace(_temp_beside(path, data), path)


def _fetch_key(client: ApiClient) -> Ed25519PublicKey:
    return load_public_key(client.get("/v1/models/signing-key")["public_key_pem"])


def _download(args: argparse.Namespace) -> int:
    client = api_client(args)
    round_no = args.round
    if round_no is None:
        path = _best_path(args, [args.job], False)
        rec, code = call_api(lambda: client.get(path))
        if rec is None:
            return code
        if not rec["feasible"]:
            return fail(f"nothing to download: {rec['reason']}", exitcodes.INFEASIBLE)
        round_no = rec["best"]["round"]
        print(f"best: round {round_no}: {rec['reason']}")
    base = f"{_job_path(args.job)}/{round_no}"
    fetched, code = call_api(
        lambda: (
            client.download(base + "/weights")[0],
            client.download(base + "/metadata")[0],
            _fetch_key(client),
        )
    )
    if fetched is None:
        return code
    weights, metadata, key = fetched
    out: Path = args.output
    meta_out = metadata_path_for(out)
    # Written beside the target, checked, then renamed: a bad transfer leaves nothing behind.
    try:
        tw, tm = _temp_beside(out, weights), _temp_beside(meta_out, metadata)
    except OSError as exc:
        return fail(f"cannot write {out}: {exc.strerror}")
    try:
        verified = verify_download(tw, tm, key)
        os.replace(tw, out)
        os.replace(tm, meta_out)
    except VerificationError as exc:
        return fail(f"the downloaded model failed verification, nothing written: {exc}")
    except OSError as exc:
        return fail(f"cannot write {out}: {exc.strerror}")
    finally:
        tw.unlink(missing_ok=True)
        tm.unlink(missing_ok=True)
    print(
        f"wrote {out} (job {args.job} round {round_no}, {verified.size} bytes, "
        f"sha256 {verified.sha256})"
    )
    print(
        f"wrote {meta_out} (signed by key {verified.key_id}); "
        f"check later with `fedctl models verify {out}`"
    )
    return exitcodes.OK


def _verify(args: argparse.Namespace) -> int:
    meta = args.meta or metadata_path_for(args.file)
    key: Ed25519PublicKey | None
    if args.public_key:
        try:
            key = load_public_key(args.public_key.read_bytes())
        except (OSError, ValueError) as exc:
            return fail(f"cannot use the public key {args.public_key}: {exc}", exitcodes.USAGE)
    else:
        key, code = call_api(lambda: _fetch_key(api_client(args)))
        if key is None:
            return code
    try:
        verified = verify_download(args.file, meta, key)
    except VerificationError as exc:
        return fail(f"verification FAILED: {exc}")
    md = verified.metadata
    if args.json:
        print_json(
            {"ok": True, "key_id": verified.key_id, "sha256": verified.sha256, "metadata": md}
        )
        return exitcodes.OK
    metrics = ", ".join(
        f"{k} {_num(v)}" for k, v in (md.get("metrics") or {}).items() if v is not None
    )
    print(f"OK: {args.file} matches its signed metadata {meta}")
    print(f"    job {md['job']['id']} round {md['round']}: {metrics}")
    print(f"    sha256 {verified.sha256}, signed by key {verified.key_id}")
    return exitcodes.OK


def _signing_key(args: argparse.Namespace) -> int:
    data, code = call_api(lambda: api_client(args).get("/v1/models/signing-key"))
    if data is None:
        return code
    if args.output:
        try:
            _write_atomically(args.output, data["public_key_pem"].encode())
        except OSError as exc:
            return fail(f"cannot write {args.output}: {exc.strerror}")
        print(f"wrote {args.output} (key {data['key_id']})")
    else:
        print(data["public_key_pem"], end="")
    return exitcodes.OK


def _pin(args: argparse.Namespace) -> int:
    path = f"{_job_path(args.job)}/{args.round}/pin"
    data, code = call_api(lambda: api_client(args).post(path, {"pinned": not args.unpin}))
    if data is None:
        return code
    state = (
        "pinned: its checkpoint is kept"
        if data["pinned"]
        else "unpinned: retention applies to it again"
    )
    print(f"job {args.job} round {args.round} {state}")
    return exitcodes.OK
