"""The fedsky ServerApp: FedAvg from the model file's initial weights, exact federated metrics.

Every round: send the global weights to every connected participant for training, average the
returned weights by training examples (FedAvg), send the new weights out for evaluation, sum the
participants' confusion matrices and compute accuracy, macro F1, recall and precision from the
sum (so they equal the figures of the union of the evaluation sets), the loss weighted by
evaluation examples; then hand the round to the sink. A phase that falls short of
min-participants because nodes failed or fell silent waits for their replacements (fedsky's
failover starts one with the site's standby key) and re-sends to them, so a round can still
complete with every site.

The loop is ours rather than `FedAvg.start` because: Flower's node sampling waits for nodes
without a deadline; its `send_and_receive` polls every 3 s (we poll from 0.1 s up); and a round
must know which *sites* took part (what each ClientApp reports, not node ids, which change on
failover) and fail with a reason a person can act on.

A reply's weights are pulled on a short backoff (`pull_replies_promptly`): a SuperNode makes its
reply visible before it has pushed the weights, and Flower's grid then waits 1 s, 2 s, 4 s ...
between tries, so a 26 MB update that finished arriving over a WAN link at 3.2 s was taken at
about 7 s.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from fedsky.shared.datasets import scrub
from fedsky.shared.flower.runconfig import RunSettings, TaskConfig
from fedsky.shared.flower.sink import FileSink, MqttSink, NullSink, Sink
from fedsky.shared.ids import InvalidIdError, check_agent_id
from fedsky.shared.messages import (
    WEIGHTS_CHUNK_BYTES,
    ClassFigures,
    RoundMetrics,
    RoundPhases,
    RunFinished,
    SiteContribution,
    SiteFailure,
    WeightsRef,
    utcnow,
)
from fedsky.shared.metrics import (
    MetricsError,
    figures,
    format_values,
    metric_values,
    sum_matrices,
    unflatten,
)
from fedsky.shared.modelfile import (
    ModelFile,
    ModelFileError,
    Weights,
    cast_like,
    check_weights,
    digest,
    from_array_record,
    model_bytes,
    parse_model_bytes,
    to_array_record,
)
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    RecordDict,
)
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid import http_grid

log = logging.getLogger(__name__)

app = ServerApp()


# Error codes from 1000 up are the fedsky ClientApp's own answers (client_app.ERR_*); below
# are Flower's (node unavailable, message gone, ClientApp crashed).
FEDSKY_ERROR_CODES = 1000


class RunFailed(RuntimeError):
    """The run cannot go on; the message says why (it is reported to the controller)."""


@dataclass
class _Reply:
    site: str
    metrics: dict[str, float | int | list[int] | list[float]]
    weights: Weights | None = None


@dataclass
class _Phase:
    replies: list[_Reply] = field(default_factory=list)
    failures: list[SiteFailure] = field(default_factory=list)


def make_sink(settings: RunSettings) -> Sink:
    if settings.sink == "file":
        if not settings.sink_dir:
            raise RunFailed("run config sets sink = 'file' but no sink-dir")
        return FileSink(settings.sink_dir)
    if settings.sink == "mqtt":
        missing = [k for k in ("mqtt_ca", "mqtt_cert", "mqtt_key") if not getattr(settings, k)]
        if missing:
            raise RunFailed(
                f"run config sets sink = 'mqtt' but lacks {', '.join(m.replace('_', '-') for m in missing)}"
            )
        return MqttSink(
            job_id=settings.job_id,
            host=settings.mqtt_host,
            port=settings.mqtt_port,
            ca_file=Path(settings.mqtt_ca),
            cert_file=Path(settings.mqtt_cert),
            key_file=Path(settings.mqtt_key),
            prefix=settings.topic_prefix,
            publish_weights=settings.publish_weights,
            publish_timeout_s=settings.publish_timeout_s,
        )
    return NullSink()


def wait_for_nodes(
    grid: Grid,
    *,
    want: int,
    minimum: int,
    timeout_s: float,
    exclude: frozenset[int] = frozenset(),
) -> list[int]:
    """Connected node ids (but `exclude`) once `want` are there, or `minimum` at the deadline."""
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    while True:
        nodes = sorted(set(grid.get_node_ids()) - exclude)
        if len(nodes) >= want:
            return nodes
        if time.monotonic() >= deadline:
            if len(nodes) >= minimum:
                return nodes
            raise RunFailed(
                f"only {len(nodes)} of the {minimum} participants needed are connected after "
                f"waiting {timeout_s:.0f} s"
            )
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)


def exchange(
    grid: Grid, messages: list[Message], *, timeout_s: float
) -> tuple[dict[int, Message], set[int]]:
    """Push `messages`, pull replies until all are in or the deadline; (replies by node, silent nodes)."""
    pushed = list(grid.push_messages(messages))
    if len(pushed) != len(messages):
        # Flower's grid returns no ids when the SuperLink refuses the push (e.g. too large).
        raise RunFailed(
            f"the SuperLink accepted {len(pushed)} of {len(messages)} messages of the round"
        )
    dst = {mid: msg.metadata.dst_node_id for mid, msg in zip(pushed, messages, strict=True) if mid}
    waiting = set(dst)
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout_s
    delay = 0.1
    while waiting and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(waiting)):
            mid = reply.metadata.reply_to_message_id
            if mid in waiting:
                waiting.discard(mid)
                replies[dst[mid]] = reply
        if waiting:
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(1.0, delay * 1.5)
    silent = {dst[m] for m in waiting} | (
        {m.metadata.dst_node_id for m in messages} - set(dst.values())
    )
    return replies, silent


def _site_of(reason: str) -> str | None:
    """The site a fedsky ClientApp names at the start of its error reason ("site: ...")."""
    head, sep, _ = reason.partition(": ")
    try:
        return check_agent_id(head) if sep else None
    except InvalidIdError:
        return None


def _parse_reply(reply: Message, *, train: bool, model: ModelFile) -> _Reply:
    content = reply.content
    try:
        site = check_agent_id(str(content.config_records["site"]["site"]))
    except (KeyError, InvalidIdError, TypeError) as exc:
        raise ValueError(f"reply without a valid site: {exc}") from None
    metrics: dict[str, float | int | list[int] | list[float]] = dict(
        content.metric_records["metrics"]
    )
    n = metrics.get("num-examples")
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"{site}: reply has no positive num-examples")
    weights = None
    if train:
        weights = from_array_record(content.array_records["arrays"], model.architecture)
        try:
            check_weights(model.architecture, weights)
        except ModelFileError as exc:
            raise ValueError(f"{site}: returned weights do not fit the network: {exc}") from None
    return _Reply(site=site, metrics=metrics, weights=weights)


def _phase(
    grid: Grid,
    *,
    settings: RunSettings,
    model: ModelFile,
    arrays: ArrayRecord,
    config: ConfigRecord,
    rnd: int,
    train: bool,
    node_sites: dict[int, str],
    want: int,
) -> _Phase:
    """One phase of a round; re-sent to replacement nodes when failures leave it short.

    A node's answer is final when it is a reply or the fedsky ClientApp's own error (the site
    lacks the dataset, ...: a replacement at that site would say the same). Silence and Flower's
    own errors (the node was unregistered or went offline, the ClientApp process crashed) are
    what failover repairs, so only a phase short for those reasons waits for nodes it has not
    heard from and asks them again.
    """
    name = "train" if train else "evaluate"
    nodes = wait_for_nodes(
        grid, want=want, minimum=settings.min_participants, timeout_s=settings.join_timeout_s
    )
    out = _Phase()
    seen: set[str] = set()
    answered: set[int] = set()  # nodes whose answer is final
    targets = nodes
    resent = 0
    why_stopped = ""
    while True:
        messages = [
            Message(
                RecordDict({"arrays": arrays, "config": config}),
                dst_node_id=node,
                message_type=MessageType.TRAIN if train else MessageType.EVALUATE,
                group_id=str(rnd),
                ttl=settings.round_timeout_s + 60,
            )
            for node in targets
        ]
        replies, silent = exchange(grid, messages, timeout_s=settings.round_timeout_s)
        repairable = len(silent)
        for node, reply in sorted(replies.items()):
            if reply.has_error():
                reason = scrub(str(reply.error.reason or f"error code {reply.error.code}"))[:2000]
                site = node_sites.get(node) or _site_of(reason)
                out.failures.append(SiteFailure(site=site, phase=name, reason=reason))
                if reply.error.code >= FEDSKY_ERROR_CODES:
                    answered.add(node)
                else:
                    repairable += 1
                continue
            answered.add(node)
            try:
                parsed = _parse_reply(reply, train=train, model=model)
            except ValueError as exc:
                out.failures.append(
                    SiteFailure(site=node_sites.get(node), phase=name, reason=str(exc)[:2000])
                )
                continue
            if parsed.site in seen:
                out.failures.append(
                    SiteFailure(
                        site=parsed.site, phase=name, reason="a second node answered for this site"
                    )
                )
                continue
            seen.add(parsed.site)
            node_sites[node] = parsed.site
            out.replies.append(parsed)
        for node in sorted(silent):
            out.failures.append(
                SiteFailure(
                    site=node_sites.get(node),
                    phase=name,
                    reason=f"no reply within the round timeout of {settings.round_timeout_s:.0f} s",
                )
            )
        short = settings.min_participants - len(out.replies)
        if short <= 0:
            return out
        if repairable < short:
            break  # final answers alone leave it short: no replacement can make up for them
        if resent >= settings.phase_retries:
            why_stopped = f" after re-sending {resent} time(s)"
            break
        resent += 1
        log.warning(
            "round %d %s: %d of the %d replies needed are in; waiting up to %.0f s for %d node(s) "
            "to re-send to (re-send %d of %d)",
            rnd,
            name,
            len(out.replies),
            settings.min_participants,
            settings.join_timeout_s,
            short,
            resent,
            settings.phase_retries,
        )
        try:
            targets = wait_for_nodes(
                grid,
                want=short,
                minimum=short,
                timeout_s=settings.join_timeout_s,
                exclude=frozenset(answered),
            )
        except RunFailed:
            why_stopped = (
                f" and no replacement node connected within {settings.join_timeout_s:.0f} s"
            )
            break
    why = "; ".join(f"{f.site or 'unknown site'}: {f.reason}" for f in out.failures) or "no replies"
    raise RunFailed(
        f"round {rnd} {name}: {len(out.replies)} of {len(nodes)} participants answered, "
        f"{settings.min_participants} needed{why_stopped} ({why})"
    )


def fedavg(replies: Iterable[_Reply], reference: Weights) -> Weights:
    """Average the replies' weights, weighted by their training examples."""
    total = 0
    acc: dict[str, np.ndarray] = {
        k: np.zeros(v.shape, dtype=np.float64) for k, v in reference.items()
    }
    for r in replies:
        n = int(r.metrics["num-examples"])  # type: ignore[arg-type]
        total += n
        assert r.weights is not None
        for k in acc:
            acc[k] += r.weights[k].astype(np.float64) * n
    return cast_like({k: v / total for k, v in acc.items()}, reference)


def _number(metrics: dict[str, float | int | list[int] | list[float]], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, int | float) else None


def _weighted(replies: list[_Reply], key: str) -> float | None:
    pairs = [
        (v, _number(r.metrics, "num-examples") or 0.0)
        for r in replies
        if (v := _number(r.metrics, key)) is not None
    ]
    n = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / n if n else None


def _round_metrics(
    *,
    settings: RunSettings,
    rnd: int,
    model: ModelFile,
    trained: _Phase,
    evaluated: _Phase,
    started_at: datetime,
    duration_s: float,
    weights_blob: bytes | None,
    phases: RoundPhases | None = None,
) -> RoundMetrics:
    k = model.architecture.num_classes
    try:
        cm = sum_matrices(unflatten(r.metrics["confusion"], k) for r in evaluated.replies)  # type: ignore[arg-type]
    except (KeyError, MetricsError) as exc:
        raise RunFailed(
            f"round {rnd}: an evaluation reply has no usable confusion matrix ({exc})"
        ) from None
    fig = figures(cm)
    loss = _weighted(evaluated.replies, "eval-loss")
    sites: dict[str, dict[str, Any]] = {}
    for r in trained.replies:
        sites.setdefault(r.site, {})["train_examples"] = r.metrics["num-examples"]
        sites[r.site]["train_loss"] = r.metrics.get("train-loss")
    for r in evaluated.replies:
        sites.setdefault(r.site, {"train_examples": 0})["eval_examples"] = r.metrics["num-examples"]
        sites[r.site]["eval_loss"] = r.metrics.get("eval-loss")
    ref = None
    if weights_blob is not None:
        ref = WeightsRef(
            sha256=digest(weights_blob),
            size=len(weights_blob),
            chunks=max(1, math.ceil(len(weights_blob) / WEIGHTS_CHUNK_BYTES)),
        )
    return RoundMetrics(
        job_id=settings.job_id,
        round=rnd,
        num_rounds=settings.num_rounds,
        accuracy=fig.accuracy,
        loss=loss if loss is not None else 0.0,
        f1=fig.f1,
        recall=fig.recall,
        precision=fig.precision,
        train_loss=_weighted(trained.replies, "train-loss"),
        per_class=[
            ClassFigures(
                label=c.label,
                precision=c.precision,
                recall=c.recall,
                f1=c.f1,
                support=c.support,
                predicted=c.predicted,
            )
            for c in fig.per_class
        ],
        confusion_matrix=cm,
        participants=[
            SiteContribution.model_validate({"site": s, **v}) for s, v in sorted(sites.items())
        ],
        failures=trained.failures + evaluated.failures,
        started_at=started_at,
        finished_at=utcnow(),
        duration_s=duration_s,
        phases=phases,
        weights=ref,
    )


def load_initial_model(settings: RunSettings) -> ModelFile:
    if not settings.model_file:
        raise RunFailed("run config has no model-file")
    try:
        data = Path(settings.model_file).read_bytes()
    except OSError as exc:
        raise RunFailed(f"the aggregator cannot read the model file: {exc.strerror}") from None
    try:
        model = parse_model_bytes(data)
    except ModelFileError as exc:  # the reason, without the aggregator's own paths
        raise RunFailed(f"the model file does not load: {exc}") from None
    if settings.model_sha256 and model.sha256 != settings.model_sha256:
        raise RunFailed("the model file on the aggregator does not match the job's model digest")
    return model


@dataclass
class Progress:
    rounds_completed: int = 0


def run_federation(
    grid: Grid, settings: RunSettings, sink: Sink, progress: Progress | None = None
) -> None:
    """Run every round, handing each to `sink`. Raises RunFailed with a reason."""
    progress = progress if progress is not None else Progress()
    model = load_initial_model(settings)
    weights = dict(model.weights)
    node_sites: dict[int, str] = {}
    for rnd in range(1, settings.num_rounds + 1):
        started_at = utcnow()
        t0 = time.monotonic()
        task = TaskConfig.for_round(
            settings, architecture_json=model.architecture.to_json(), server_round=rnd
        )
        config = ConfigRecord(dict(task.to_record_values()))
        # Before the first round wait (up to join-timeout-s) for every expected participant;
        # after that, for the minimum: a node that is gone does not hold up every round, and one
        # that comes back (or its replacement) is included as soon as it is connected.
        want = settings.wait_for if rnd == 1 else settings.min_participants
        phase_started = time.monotonic()
        trained = _phase(
            grid,
            settings=settings,
            model=model,
            arrays=to_array_record(weights),
            config=config,
            rnd=rnd,
            train=True,
            node_sites=node_sites,
            want=want,
        )
        trained_at = time.monotonic()
        weights = fedavg(trained.replies, model.weights)
        aggregated_at = time.monotonic()
        evaluated = _phase(
            grid,
            settings=settings,
            model=model,
            arrays=to_array_record(weights),
            config=config,
            rnd=rnd,
            train=False,
            node_sites=node_sites,
            want=settings.min_participants,
        )
        phases = RoundPhases(
            train_s=trained_at - phase_started,
            aggregate_s=aggregated_at - trained_at,
            evaluate_s=time.monotonic() - aggregated_at,
        )
        blob = model_bytes(model.architecture, weights) if settings.sink != "none" else None
        metrics = _round_metrics(
            settings=settings,
            rnd=rnd,
            model=model,
            trained=trained,
            evaluated=evaluated,
            started_at=started_at,
            duration_s=time.monotonic() - t0,
            phases=phases,
            weights_blob=blob,
        )
        log.info(
            "round %d/%d: %s (%d sites, %.1f s)",
            rnd,
            settings.num_rounds,
            format_values(metric_values(metrics)),
            len(metrics.participants),
            metrics.duration_s,
        )
        sink.round_finished(metrics, blob)
        progress.rounds_completed = rnd


# Pulling a reply's objects that are still arriving: the first retry after this, doubling up to
# the cap (Flower 1.42's own: 1 s doubling to 10 s).
REPLY_PULL_BACKOFF_S = 0.1
REPLY_PULL_BACKOFF_CAP_S = 1.0


def pull_replies_promptly() -> bool:
    """Give the ServerApp's grid a short backoff for objects still arriving; False (and a
    warning) when this Flower's grid does not pull them the way fedsky knows."""
    current = getattr(http_grid, "pull_objects", None)
    if isinstance(current, functools.partial) and current.func is inflatable_utils.pull_objects:
        return True  # already
    params = inspect.signature(inflatable_utils.pull_objects).parameters
    if current is not inflatable_utils.pull_objects or not {
        "initial_backoff",
        "backoff_cap",
    } <= set(params):
        log.warning("this Flower's grid pulls objects differently: its own backoff stays")
        return False
    http_grid.pull_objects = functools.partial(  # type: ignore[attr-defined]
        inflatable_utils.pull_objects,
        initial_backoff=REPLY_PULL_BACKOFF_S,
        backoff_cap=REPLY_PULL_BACKOFF_CAP_S,
    )
    return True


def _route_logs() -> None:
    # Flower streams what its own logger prints to `flwr run --stream`; send ours the same way.
    ours = logging.getLogger("fedsky")
    if not ours.handlers:
        for handler in logging.getLogger("flwr").handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    _route_logs()
    pull_replies_promptly()
    settings = RunSettings.from_run_config(context.run_config)
    sink: Sink = NullSink()
    progress = Progress()
    failure: str | None = None
    try:
        sink = make_sink(settings)
        run_federation(grid, settings, sink, progress)
    except RunFailed as exc:
        failure = str(exc)
        log.error("run failed: %s", exc)
        raise
    except Exception as exc:
        failure = f"aggregator error: {type(exc).__name__}: {exc}"
        log.exception("aggregator error")
        raise
    finally:
        end = RunFinished(
            job_id=settings.job_id,
            status="failed" if failure else "completed",
            rounds_completed=progress.rounds_completed,
            num_rounds=settings.num_rounds,
            reason=(failure or "")[:2000],
        )
        try:
            sink.run_finished(end)
        except Exception:
            if failure is None:
                raise
            log.exception("could not report the failed run")
        finally:
            sink.close()
