"""The job pipeline: from a submitted spec to a trained global model (the FL Initializer).

created -> placing -> launching -> assigning -> training -> completed | failed | cancelled.

- placing: the optimizer's choice over the catalog, restricted to linked clouds that have a
  provider; with none linked, every offer is placed and the local provider stands in.
- launching: the provider starts a SuperLink (TLS from fedsky's CA, SuperNode authentication);
  the job gets its own bus identity `agg-<job id>` for the ServerApp's metrics.
- assigning: per participant, the orchestrator picks a VM; the agent re-checks it and makes the
  task's SuperNode keys (node and standby), the controller registers both public keys with the
  SuperLink and tells the agent to start the SuperNode.
- training: `flwr run` starts the fedsky app; each round's metrics and weights arrive over the
  bus and go to the Model Manager. A participant whose SuperNode fails, whose VM stops or whose
  agent goes silent is moved to its next eligible VM with the standby key, after the failed node
  is unregistered (its pending messages then fail at once).

Every end state stops the SuperNodes, terminates the aggregator and revokes the job's
certificate. A controller restarted mid-job fails the job cleanly (see `recover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fedsky.controller.bus.consumer import BusUnavailable, ControllerBus
from fedsky.controller.clouds.base import (
    AggregatorHandle,
    AggregatorProvider,
    AggregatorSpec,
    ProviderError,
)
from fedsky.controller.clouds.local import LocalProvider, pki_tls_issuer
from fedsky.controller.clouds.superlink import SuperLinkControl, prepare_app_dir
from fedsky.controller.config import ControllerConfig
from fedsky.controller.inventory import store as inventory
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.models.registry import Registry
from fedsky.controller.orchestrator.core import (
    AttemptState,
    FailureReason,
    MinResources,
    OrchestratorError,
    QueueStore,
    candidates_from_inventory,
    check_feasible,
)
from fedsky.controller.security.enrollment import record_certificate, revoke_common_name
from fedsky.controller.security.pki import Pki, write_private_key
from fedsky.controller.store import Store
from fedsky.shared.files import atomic_write
from fedsky.shared.flower.runconfig import settings_for_job
from fedsky.shared.flower.transfer import AggregatorFeed, RoundReady, RunEnded
from fedsky.shared.ids import aggregator_id
from fedsky.shared.jobspec import JobSpec
from fedsky.shared.messages import (
    Command,
    Event,
    PayloadError,
    PrepareTaskCommand,
    RunFinished,
    StartTaskCommand,
    StopTaskCommand,
    utcnow,
)
from fedsky.shared.modelfile import digest, parse_model_bytes
from pydantic import ValidationError

log = logging.getLogger(__name__)

EVENT_TIMEOUT_S = 60.0
RUN_POLL_S = 5.0
FEED_EXPIRE_S = 10.0


class JobRejected(Exception):
    """A submission that cannot become a job; nothing was created or launched."""

    def __init__(self, message: str, *, infeasible: bool = False) -> None:
        super().__init__(message)
        self.infeasible = infeasible


class JobFailure(Exception):
    """A job that cannot go on; the message is the job's error, safe to show."""


@dataclass
class _Participant:
    name: str
    dataset: str
    attempt: int = 0
    task_id: str | None = None
    vm: str | None = None
    node_id: int | None = None
    key_role: str = "node"
    public_keys: dict[str, str] = field(default_factory=dict)
    registered: dict[str, int] = field(default_factory=dict)  # public key text -> node id
    burnt: set[str] = field(default_factory=set)  # keys of failed nodes (unregistered)


@dataclass
class _JobRun:
    job_id: str
    spec: JobSpec
    directory: Path
    participants: dict[str, _Participant]
    provider: AggregatorProvider | None = None
    handle: AggregatorHandle | None = None
    control: SuperLinkControl | None = None
    superlink_ca_pem: str = ""
    run_id: int | None = None
    cancel_requested: bool = False
    finished: asyncio.Future[RunFinished] | None = None
    failures: asyncio.Queue[tuple[str, FailureReason, str]] = field(default_factory=asyncio.Queue)
    # One task per started SuperNode, following its events; cancelled when the job ends.
    followers: list[asyncio.Task[None]] = field(default_factory=list)


def model_files_dir(config: ControllerConfig) -> Path:
    return config.state_dir / "model-files"


def store_model_file(config: ControllerConfig, data: bytes) -> dict[str, Any]:
    """Check an uploaded model file and keep it by digest; ModelFileError if it does not load."""
    model = parse_model_bytes(data)
    sha = digest(data)
    directory = model_files_dir(config)
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    path = directory / f"{sha}.safetensors"
    if not path.exists():
        atomic_write(path, data, mode=0o640)
    arch = model.architecture
    return {
        "digest": sha,
        "size": len(data),
        "input_shape": list(arch.input_shape),
        "num_classes": arch.num_classes,
    }


class JobManager:
    """Drives every active job as one task of the controller's TaskGroup."""

    def __init__(
        self,
        *,
        config: ControllerConfig,
        store: Store,
        pki: Pki,
        bus: ControllerBus,
        registry: Registry,
        clouds: Any = None,
        broker: Any = None,
    ) -> None:
        self.config = config
        self.store = store
        self.pki = pki
        self.bus = bus
        self.registry = registry
        self.clouds = clouds
        # The managed broker (None with an external one: its operator reloads it, see the docs).
        self.broker = broker
        self._crl_dirty = False
        self.queue = QueueStore(store)
        self.jobs_dir = config.state_dir / "jobs"
        self.local = LocalProvider(work_dir=self.jobs_dir, issue_tls=pki_tls_issuer(pki))
        self._feed = AggregatorFeed()
        self._runs: dict[str, _JobRun] = {}
        self._drivers: dict[str, asyncio.Task[None]] = {}
        self._waiters: dict[str, asyncio.Queue[Event]] = {}  # task id -> its events
        self._group: asyncio.TaskGroup | None = None
        bus.add_event_listener(self._on_event)
        bus.aggregator_handler = self._on_aggregator

    # --- life cycle -------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            await self.recover()
            group.create_task(self._expire_feed(), name="jobs-feed-expiry")
            await asyncio.Event().wait()

    async def recover(self) -> None:
        """Fail, cleanly, every job a previous controller left active.

        Its aggregator is terminated through the persisted provider reference and its agents are
        told to stop their SuperNodes; nothing is left running or hanging.
        """
        jobs = await self.store.run(jobstore.list_jobs, states=jobstore.ACTIVE_STATES)
        for job in jobs:
            job_id = job["id"]
            log.warning(
                "job %s was %s when the controller stopped: failing it", job_id, job["state"]
            )
            await self.store.run(
                jobstore.set_state,
                job_id,
                "failed",
                error=f"the controller restarted while the job was {job['state']}",
                message=f"failed: the controller restarted while the job was {job['state']}",
            )
            await self._cleanup(job_id, job=job)

    async def _expire_feed(self) -> None:
        while True:
            await asyncio.sleep(FEED_EXPIRE_S)
            for ready in self._feed.expire():
                await self._record_round(ready)

    # --- submission -------------------------------------------------------------------------

    async def submit(self, *, spec_data: Mapping[str, Any], model_digest: str) -> str:
        try:
            spec = JobSpec.model_validate(dict(spec_data))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "spec"
            raise JobRejected(f"invalid job spec: key '{where}': {first.get('msg')}") from None
        model_path = model_files_dir(self.config) / f"{model_digest}.safetensors"
        if not model_path.is_file():
            raise JobRejected(f"no uploaded model file with digest {model_digest}")
        locations = await self.store.run(inventory.location_of, spec.participants)
        missing = [p for p in spec.participants if p not in locations]
        if missing:
            raise JobRejected(f"not enrolled: {', '.join(missing)}")
        agents = {a["id"]: a for a in await self.store.run(inventory.list_agents)}
        revoked = [p for p in spec.participants if agents[p]["state"] == "revoked"]
        if revoked:
            raise JobRejected(f"revoked: {', '.join(revoked)}")
        minimum = _minimum(spec)
        candidates = await self._candidates_by_participant(spec.participants)
        feasible = check_feasible(minimum, candidates)
        if not feasible.ok:
            raise JobRejected(
                f"no VM can run this job for every participant:\n{feasible.message}",
                infeasible=True,
            )
        job_id = jobstore.new_job_id(spec.name)
        await self.store.run(
            jobstore.create_job,
            job_id=job_id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            model_digest=model_digest,
        )
        await self.registry.record_job(
            job_id=job_id,
            name=spec.name,
            selection_metric=spec.selection_metric,
            thresholds=(),
            hyperparameters=spec.hyperparameters.model_dump(mode="json"),
            model_digest=model_digest,
            participants=list(spec.participants),
            datasets={p: spec.dataset_for(p) for p in spec.participants},
            retention=None,
        )
        self._start_driver(job_id, spec)
        return job_id

    def _start_driver(self, job_id: str, spec: JobSpec) -> None:
        assert self._group is not None, "the job manager is not running"
        self._drivers[job_id] = self._group.create_task(
            self._drive(job_id, spec), name=f"job-{job_id}"
        )

    async def cancel(self, job_id: str) -> bool:
        """Cancel an active job; returns once its SuperNodes and aggregator are stopped."""
        driver = self._drivers.get(job_id)
        run = self._runs.get(job_id)
        if driver is None or run is None or driver.done():
            return bool(
                await self.store.run(
                    jobstore.set_state, job_id, "cancelled", message="cancelled by the operator"
                )
            )
        run.cancel_requested = True
        driver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(driver)
        return True

    # --- the driver -------------------------------------------------------------------------

    async def _drive(self, job_id: str, spec: JobSpec) -> None:
        run = _JobRun(
            job_id=job_id,
            spec=spec,
            directory=self.jobs_dir / job_id,
            participants={
                p: _Participant(name=p, dataset=spec.dataset_for(p)) for p in spec.participants
            },
        )
        self._runs[job_id] = run
        state: jobstore.JobState = "failed"
        error: str | None = None
        message: str | None = None
        try:
            await self._set(job_id, "placing")
            placement = await self._place(run)
            await self._set(job_id, "launching")
            await self._launch(run, placement)
            await self._set(job_id, "assigning")
            await self._assign_all(run)
            await self._set(job_id, "training")
            outcome = await self._train(run)
            if outcome.status != "completed":
                raise JobFailure(outcome.reason or "the run failed")
            state, message = "completed", f"completed {outcome.rounds_completed} round(s)"
        except asyncio.CancelledError:
            if run.cancel_requested:
                state, message = "cancelled", "cancelled by the operator"
            else:
                error = "the controller stopped during the job"
            await self._finish(run, state, error=error, message=message)
            raise
        except JobFailure as exc:
            error, message = str(exc), f"failed: {exc}"
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job_id)
            error = f"internal error: {type(exc).__name__}"
        await self._finish(run, state, error=error, message=message)

    async def _finish(
        self, run: _JobRun, state: jobstore.JobState, *, error: str | None, message: str | None
    ) -> None:
        """Clean up first, then record the end state: a job shown as ended has nothing running."""
        await self._cleanup(run.job_id, run=run, final_state=state)
        await self.store.run(jobstore.set_state, run.job_id, state, error=error, message=message)

    async def _set(self, job_id: str, state: jobstore.JobState, message: str | None = None) -> None:
        if not await self.store.run(jobstore.set_state, job_id, state, message=message):
            raise asyncio.CancelledError  # cancelled meanwhile

    async def _log(self, job_id: str, message: str, level: str = "info") -> None:
        await self.store.run(jobstore.log_job, job_id, message, level)

    # --- placing ----------------------------------------------------------------------------

    async def _place(self, run: _JobRun) -> dict[str, Any]:
        from fedsky.controller.placement import (
            JobProfile,
            Limits,
            PlacementError,
            load_catalog,
            parse_cost_limit,
            place,
        )

        spec = run.spec
        locations = await self.store.run(inventory.location_of, spec.participants)
        agents = {a["id"]: a for a in await self.store.run(inventory.list_agents)}
        measured = {p: agents[p]["rtt_ms"] for p in spec.participants if agents[p]["rtt_ms"]}
        linked: list[str] = []
        if self.clouds is not None:
            linked = list(await self.clouds.linked_clouds())
        model_mb = (
            model_files_dir(self.config)
            / f"{_digest_of(await self.store.run(jobstore.get_job, run.job_id))}.safetensors"
        ).stat().st_size / 1e6
        pl = spec.placement
        limits = Limits(
            max_cost=parse_cost_limit(str(pl.max_cost))
            if pl.max_cost
            else parse_cost_limit("1000000 USD/month"),
            max_latency_ms=pl.max_latency_ms or 60_000.0,
            cost_weight=pl.cost_weight,
        )
        try:
            result = await asyncio.to_thread(
                place,
                participants={p: locations[p] for p in spec.participants},
                job=JobProfile(model_mb=max(model_mb, 0.001), rounds=spec.hyperparameters.rounds),
                limits=limits,
                catalog=load_catalog(),
                measured_rtt=measured or None,
                clouds=linked or None,
            )
        except PlacementError as exc:
            raise JobFailure(f"placement: {exc}") from None
        if result.choice is None:
            raise JobFailure(f"no feasible placement: {result.reason}")
        choice = result.choice
        summary = result.to_json()
        provider_name = choice.offer.cloud if choice.offer.cloud in linked else "local"
        placement = {
            "choice": summary["choice"],
            "baseline": summary["baseline"],
            "provider": provider_name,
            "linked_clouds": linked,
            "measured_rtt": measured,
        }
        await self.store.run(
            jobstore.update_job, run.job_id, placement_json=json.dumps(placement, default=str)
        )
        where = choice.label
        if provider_name == "local":
            note = (
                " (no cloud is linked: the local provider stands in for it)"
                if not linked
                else " (the local provider stands in)"
            )
        else:
            note = ""
        await self._log(
            run.job_id,
            f"placed on {where}: {choice.round_time_s:.1f} s per round, {choice.cost:.2f} {choice.currency}{note}",
        )
        return placement

    # --- launching --------------------------------------------------------------------------

    async def _launch(self, run: _JobRun, placement: Mapping[str, Any]) -> None:
        choice = placement["choice"]
        provider: AggregatorProvider
        if placement["provider"] == "local":
            provider = self.local
        else:
            try:
                provider = await self.clouds.provider_for_launch(
                    placement["provider"], region=choice["region"]
                )
            except ProviderError as exc:
                raise JobFailure(str(exc)) from None
        run.provider = provider
        spec = AggregatorSpec(
            job_id=run.job_id,
            cloud=choice["cloud"],
            region=choice["region"],
            instance_type=choice["instance_type"],
            allowed_sources=await self._allowed_sources(run, provider),
            labels={"fedsky-job": run.job_id},
        )
        try:
            handle = await provider.launch(spec)
        except ProviderError as exc:
            raise JobFailure(f"launching the aggregator: {exc}") from None
        run.handle = handle
        await self.store.run(
            jobstore.update_job,
            run.job_id,
            provider=provider.name,
            provider_ref=handle.ref,
            aggregator_json=json.dumps(
                {
                    "provider": handle.provider,
                    "ref": handle.ref,
                    "region": handle.region,
                    "address": handle.address,
                    "account": getattr(provider, "account_name", None),
                }
            ),
        )
        address = handle.address or await provider.address(handle)
        await self._log(run.job_id, f"aggregator up at {address} ({provider.name})")
        run.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        ca = run.directory / "superlink-ca.crt"
        atomic_write(ca, self.pki.ca_cert_pem, mode=0o644)
        run.superlink_ca_pem = self.pki.ca_cert_pem.decode()
        run.control = SuperLinkControl(
            flwr_home=run.directory / "control", address=address, root_ca=ca
        )
        if provider is self.local:
            # A cloud VM made its own bus key and got its certificate with its enrolment token.
            self._issue_aggregator_identity(run)

    async def _allowed_sources(self, run: _JobRun, provider: AggregatorProvider) -> tuple[str, ...]:
        """Who may reach the job's SuperLink: its sites and the controller.

        A cloud SuperLink is opened to the public addresses of the participants' VMs, the
        controller's (`broker.public_host` when it is a public IP address) and the networks in
        `clouds.allowed_sources`: where hospitals behind NAT and the controller reach the
        internet from, which the controller cannot see for itself.
        """
        if provider is self.local:
            return ("127.0.0.1/32",)  # a SuperLink on this machine: no network rule to write
        sources = list(self.config.clouds.allowed_sources)
        addresses = [self.config.broker_public_host]
        for participant in run.spec.participants:
            for vm in await self.store.run(inventory.list_vms, participant):
                addresses.extend(vm["addresses"])
        for address in addresses:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                continue  # a host name: list its addresses in clouds.allowed_sources
            if ip.is_global:
                sources.append(str(ipaddress.ip_network(ip)))
        if not sources:
            raise JobFailure(
                "no address is allowed to reach a cloud aggregator: none of the job's VMs has a "
                "public address; set clouds.allowed_sources to the networks the hospitals and "
                "the controller reach the internet from"
            )
        return tuple(dict.fromkeys(sources))

    def _issue_aggregator_identity(self, run: _JobRun) -> None:
        """The ServerApp's own bus certificate (`agg-<job>`), revoked when the job ends."""
        agg = aggregator_id(run.job_id)
        issued = self.pki.issue(common_name=agg, kind="aggregator", days=30)
        assert issued.key_pem is not None
        bus_dir = self.local.paths(run.job_id).bus_dir
        bus_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_private_key(bus_dir / "agg.key", issued.key_pem, overwrite=True)
        atomic_write(bus_dir / "agg.crt", issued.cert_pem, mode=0o644)
        atomic_write(bus_dir / "ca.crt", self.pki.ca_cert_pem, mode=0o644)
        self.store.call(record_certificate, issued)

    # --- assigning --------------------------------------------------------------------------

    async def _candidates_by_participant(self, participants: list[str]) -> dict[str, list[Any]]:
        tasks = await self.queue.active_tasks_async()
        now = datetime.now(UTC)
        out = {}
        for p in participants:
            rows = await self.store.run(inventory.list_vms, p)
            out[p] = candidates_from_inventory(rows, now=now, tasks=tasks)
        return out

    async def _assign(
        self, run: _JobRun, part: _Participant, *, failure: tuple[FailureReason, str] | None = None
    ) -> None:
        """Put `part` on a VM, failing over to the next one until it runs or tries run out."""
        policy = self.config.orchestrator
        minimum = _minimum(run.spec)
        while True:
            candidates = (await self._candidates_by_participant([part.name]))[part.name]
            if failure is None and part.attempt == 0:
                decision = await self.queue.assign_async(
                    job_id=run.job_id,
                    participant=part.name,
                    candidates=candidates,
                    minimum=minimum,
                    policy=policy,
                    now=time.time(),
                )
            else:
                reason, detail = failure or (FailureReason.SUPERNODE_ERROR, "")
                decision = await self.queue.fail_over_async(
                    job_id=run.job_id,
                    participant=part.name,
                    reason=reason,
                    detail=detail,
                    candidates=candidates,
                    minimum=minimum,
                    policy=policy,
                    now=time.time(),
                )
            if decision.chosen is None:
                if decision.retry_at is not None:
                    await self._log(run.job_id, f"{part.name}: {decision.summary}; retrying later")
                    await asyncio.sleep(max(0.5, decision.retry_at - time.time()))
                    failure = None if part.attempt == 0 else failure
                    continue
                raise JobFailure(f"{part.name}: {decision.summary}")
            part.attempt += 1
            part.vm = decision.chosen.vm
            try:
                await self._start_on_vm(run, part)
                await self.queue.mark_async(
                    job_id=run.job_id, participant=part.name, state="running", now=time.time()
                )
                return
            except _AttemptFailed as exc:
                await self._log(
                    run.job_id,
                    f"{part.name}: attempt {part.attempt} on {part.vm} failed: {exc.detail}",
                    "warning",
                )
                failure = (exc.reason, exc.detail)

    async def _assign_all(self, run: _JobRun) -> None:
        """Assign every participant at once; the first that cannot be placed stops the rest."""
        try:
            async with asyncio.TaskGroup() as group:
                for part in run.participants.values():
                    group.create_task(self._assign(run, part), name=f"assign-{part.name}")
        except* JobFailure as failures:
            raise failures.exceptions[0] from None

    async def _start_on_vm(self, run: _JobRun, part: _Participant) -> None:
        assert run.control is not None
        assert run.handle is not None
        assert part.vm is not None
        task_id = await self.store.run(
            jobstore.create_task,
            job_id=run.job_id,
            participant=part.name,
            attempt=part.attempt,
            vm=part.vm,
        )
        part.task_id = task_id
        waiter: asyncio.Queue[Event] = asyncio.Queue()
        self._waiters[task_id] = waiter
        # Keys: the first attempt uses the node key, a failover the pre-registered standby; past
        # those the agent makes a fresh pair (an unregistered key cannot register again).
        fresh = part.attempt > 2
        ack = await self._command(
            part.name,
            PrepareTaskCommand(
                expires_at=_expiry(self.config),
                task_id=task_id,
                job_id=run.job_id,
                vm=part.vm,
                dataset=part.dataset,
                fresh_keys=fresh,
            ),
            waiter,
            want=("task_acknowledged",),
        )
        part.public_keys = {str(k): v for k, v in ack.public_keys.items()}
        for role in ("node", "standby"):
            key = part.public_keys.get(role)
            if key and key not in part.registered and key not in part.burnt:
                path = run.directory / "keys" / f"{part.name}-{part.attempt}-{role}.pub"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(key + "\n")
                try:
                    part.registered[key] = await run.control.register_node(
                        path, name=f"{part.name}-{role}"
                    )
                except ProviderError as exc:
                    raise _AttemptFailed(
                        FailureReason.SUPERNODE_ERROR, f"registering its node key: {exc}"
                    ) from None
        chosen_role: str | None = next(
            (
                r
                for r in ("node", "standby")
                if part.public_keys.get(r) in part.registered
                and part.public_keys[r] not in part.burnt
            ),
            None,
        )
        if chosen_role is None:
            raise _AttemptFailed(FailureReason.SUPERNODE_ERROR, "no usable node key")
        role = part.key_role = chosen_role
        part.node_id = part.registered[part.public_keys[role]]
        assert part.vm is not None
        await self.store.run(
            jobstore.set_task_state,
            task_id,
            "acknowledged",
            node_id=str(part.node_id),
            key_role=role,
        )
        assert run.handle.address is not None
        await self._command(
            part.name,
            StartTaskCommand(
                expires_at=_expiry(self.config),
                task_id=task_id,
                job_id=run.job_id,
                vm=part.vm,
                dataset=part.dataset,
                superlink=run.handle.address,
                ca_pem=run.superlink_ca_pem,
                key=role,
            ),
            waiter,
            want=("task_running",),
        )
        await self.store.run(jobstore.set_task_state, task_id, "running")
        run.followers.append(
            asyncio.get_running_loop().create_task(
                self._follow_task(run, part, task_id, waiter), name=f"follow-{task_id}"
            )
        )

    async def _command(
        self, agent: str, command: Command, waiter: asyncio.Queue[Event], *, want: tuple[str, ...]
    ) -> Event:
        try:
            await self.bus.send_command(agent, command)
        except BusUnavailable as exc:
            raise _AttemptFailed(FailureReason.AGENT_UNRESPONSIVE, str(exc)) from None
        timeout = self.config.orchestrator.ack_timeout_s
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await waiter.get()
                    if event.kind in want:
                        return event
                    if event.kind == "task_failed":
                        if event.detail.startswith("dataset "):
                            # Another VM of the same hospital has the same datasets: no retry.
                            raise JobFailure(f"{agent}: {event.detail}")
                        reason = (
                            FailureReason.VM_LEFT_RUNNING
                            if event.detail.startswith("vm-")
                            else FailureReason.SUPERNODE_ERROR
                        )
                        raise _AttemptFailed(reason, event.detail)
                    if event.kind == "command_rejected":
                        raise _AttemptFailed(
                            FailureReason.SUPERNODE_ERROR, f"command rejected: {event.detail}"
                        )
        except TimeoutError:
            raise _AttemptFailed(
                FailureReason.AGENT_UNRESPONSIVE, f"{agent} did not answer within {timeout:g} s"
            ) from None

    async def _follow_task(
        self, run: _JobRun, part: _Participant, task_id: str, waiter: asyncio.Queue[Event]
    ) -> None:
        """After start: a failure of this task while the job trains triggers a failover."""
        while True:
            event = await waiter.get()
            if event.kind in ("task_failed", "task_finished"):
                state = "failed" if event.kind == "task_failed" else "finished"
                await self.store.run(jobstore.set_task_state, task_id, state, reason=event.detail)
                if part.task_id == task_id and event.kind == "task_failed":
                    reason = (
                        FailureReason.VM_LEFT_RUNNING
                        if event.detail.startswith("vm-")
                        else FailureReason.SUPERNODE_ERROR
                    )
                    await run.failures.put((part.name, reason, event.detail))
                return
            if event.kind == "task_stopped":
                await self.store.run(
                    jobstore.set_task_state, task_id, "stopped", reason=event.detail
                )
                return

    # --- training ---------------------------------------------------------------------------

    async def _train(self, run: _JobRun) -> RunFinished:
        assert run.control is not None
        assert run.handle is not None
        spec = run.spec
        model_digest = _digest_of(await self.store.run(jobstore.get_job, run.job_id))
        assert run.provider is not None
        # Paths on the aggregator's host: the controller's for `local`, the VM's for a cloud.
        files = run.provider.aggregator_files(
            run.job_id, model_file=model_files_dir(self.config) / f"{model_digest}.safetensors"
        )
        settings = settings_for_job(
            spec,
            job_id=run.job_id,
            model_file=files.model_file,
            model_sha256=model_digest,
            sink="mqtt",
            mqtt={
                "host": self.config.broker_public_host,
                "port": self.config.broker.port,
                "ca": files.ca,
                "cert": files.cert,
                "key": files.key,
                "prefix": self.config.bus.topic_prefix,
            },
        )
        run.finished = asyncio.get_running_loop().create_future()
        app_dir = prepare_app_dir(run.directory / "app")
        try:
            run.run_id = await run.control.start_run(
                app_dir=app_dir,
                settings=settings,
                run_config_file=run.directory / "run-config.toml",
            )
        except ProviderError as exc:
            raise JobFailure(f"the aggregator did not start the Flower run: {exc}") from None
        await self._log(
            run.job_id, f"Flower run {run.run_id} started: {spec.hyperparameters.rounds} round(s)"
        )
        while True:
            failure_wait: asyncio.Future[Any] = asyncio.ensure_future(run.failures.get())
            finished: asyncio.Future[Any] = run.finished
            done, _ = await asyncio.wait(
                {finished, failure_wait},
                timeout=RUN_POLL_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if run.finished in done:
                failure_wait.cancel()
                return run.finished.result()
            if failure_wait in done:
                name, reason, detail = failure_wait.result()
                await self._failover(run, run.participants[name], reason, detail)
                continue
            failure_wait.cancel()
            await self._check_run(run)
            await self._check_agents(run)

    async def _check_run(self, run: _JobRun) -> None:
        """A run that ended without its RunFinished (the ServerApp crashed) fails the job."""
        assert run.control is not None
        assert run.run_id is not None
        try:
            status = await run.control.run_status(run.run_id)
        except ProviderError as exc:
            assert run.provider is not None
            assert run.handle is not None
            if not await run.provider.healthy(run.handle):
                raise JobFailure(f"the aggregator stopped answering: {exc}") from None
            return
        if status.startswith("finished") and run.finished is not None and not run.finished.done():
            # Give the last messages a moment to arrive before calling it.
            await asyncio.sleep(RUN_POLL_S)
            if not run.finished.done():
                raise JobFailure(f"the Flower run ended ({status}) without reporting its result")

    async def _check_agents(self, run: _JobRun) -> None:
        agents = {a["id"]: a for a in await self.store.run(inventory.list_agents)}
        for part in run.participants.values():
            if part.task_id and agents.get(part.name, {}).get("state") != "online":
                await self._failover(
                    run, part, FailureReason.AGENT_UNRESPONSIVE, f"{part.name} is offline"
                )

    async def _failover(
        self, run: _JobRun, part: _Participant, reason: FailureReason, detail: str
    ) -> None:
        assert run.control is not None
        await self._log(run.job_id, f"{part.name}: {detail}; moving it to its next VM", "warning")
        failed_key = part.public_keys.get(part.key_role)
        if part.node_id is not None:
            with contextlib.suppress(ProviderError):
                await run.control.unregister_node(part.node_id)
        if failed_key:
            part.burnt.add(failed_key)
        old_task = part.task_id
        part.task_id = None
        if old_task:
            await self.store.run(jobstore.set_task_state, old_task, "failed", reason=detail)
            with contextlib.suppress(BusUnavailable):
                await self.bus.send_command(
                    part.name,
                    StopTaskCommand(
                        expires_at=_expiry(self.config), task_id=old_task, reason="failed over"
                    ),
                )
        try:
            await self._assign(run, part, failure=(reason, detail))
        except JobFailure as exc:
            if (
                len([p for p in run.participants.values() if p.task_id])
                >= run.spec.min_participants
            ):
                await self._log(run.job_id, f"{exc}; the job carries on without it", "warning")
                return
            raise

    # --- the aggregator's messages ----------------------------------------------------------

    async def _on_aggregator(self, sender: str, channel: str, payload: bytes) -> None:
        if channel != "metrics":
            raise PayloadError("bad_channel", channel)
        for item in self._feed.feed(sender, payload):
            if isinstance(item, RoundReady):
                await self._record_round(item)
            elif isinstance(item, RunEnded):
                await self._run_ended(item.message)

    async def _record_round(self, ready: RoundReady) -> None:
        metrics = ready.metrics
        job_id = metrics.job_id
        try:
            job = await self.store.run(jobstore.get_job, job_id)
        except jobstore.JobNotFound:
            raise PayloadError("no_job", f"job {job_id} is not known") from None
        if job["state"] != "training":
            raise PayloadError("job_not_training", f"job {job_id} is {job['state']}")
        await self.registry.record_round_message(metrics, weights=ready.weights)
        await self.store.run(jobstore.update_job, job_id, rounds_done=metrics.round)
        await self._log(
            job_id,
            f"round {metrics.round}/{metrics.num_rounds}: accuracy {metrics.accuracy:.4f} loss {metrics.loss:.4f} "
            f"f1 {metrics.f1:.4f} recall {metrics.recall:.4f} precision {metrics.precision:.4f} "
            f"({len(metrics.participants)} sites, {metrics.duration_s:.1f} s)",
        )

    async def _run_ended(self, message: RunFinished) -> None:
        run = self._runs.get(message.job_id)
        if run is None or run.finished is None or run.finished.done():
            return
        run.finished.set_result(message)

    async def _on_event(self, event: Event) -> None:
        if event.task_id is None:
            return
        waiter = self._waiters.get(event.task_id)
        if waiter is not None:
            waiter.put_nowait(event)

    # --- cleanup ----------------------------------------------------------------------------

    async def _cleanup(
        self,
        job_id: str,
        *,
        run: _JobRun | None = None,
        job: Mapping[str, Any] | None = None,
        final_state: str | None = None,
    ) -> None:
        """Stop every SuperNode, terminate the aggregator, revoke the job's certificate."""
        if job is None:
            job = await self.store.run(jobstore.get_job, job_id)
        assert job is not None
        tasks: list[dict[str, Any]] = job.get("tasks") or []
        if not tasks:
            tasks = await self.store.run(jobstore.list_tasks, job_id)
        for task in tasks:
            if task["state"] in ("assigned", "acknowledged", "starting", "running"):
                with contextlib.suppress(BusUnavailable):
                    await self.bus.send_command(
                        task["participant"],
                        StopTaskCommand(
                            expires_at=_expiry(self.config),
                            task_id=task["id"],
                            reason=f"job {final_state or job['state']}",
                        ),
                    )
                await self.store.run(
                    jobstore.set_task_state, task["id"], "stopped", reason="the job ended"
                )
            self._waiters.pop(task["id"], None)
        # End the participants' attempts so their VMs count as free again.
        outcome: AttemptState = "succeeded" if final_state == "completed" else "cancelled"
        for participant in job["spec"]["participants"]:
            with contextlib.suppress(OrchestratorError):
                await self.queue.mark_async(
                    job_id=job_id, participant=participant, state=outcome, now=time.time()
                )
        handle = run.handle if run else _handle_from(job)
        provider = run.provider if run else None
        if handle is not None:
            try:
                if provider is None:
                    provider = await self._provider_for_handle(handle, job)
                await provider.terminate(handle)
                await self._log(job_id, f"aggregator terminated ({handle.provider} {handle.ref})")
            except Exception as exc:  # a leak is worse than a noisy log: say it loudly
                log.error(
                    "job %s: terminating its aggregator %s failed: %s", job_id, handle.ref, exc
                )
                await self._log(job_id, f"terminating the aggregator failed: {exc}", "error")
        with contextlib.suppress(Exception):
            if await self.store.run(revoke_common_name, self.pki, aggregator_id(job_id)):
                self._crl_dirty = True
        await self._enforce_revocations(ending=job_id)
        if final_state is None:
            final_state = str((await self.store.run(jobstore.get_job, job_id))["state"])
        with contextlib.suppress(Exception):
            await self.registry.finish_job(job_id=job_id, status=final_state)
        if run is not None:
            for follower in run.followers:
                follower.cancel()
        self._runs.pop(job_id, None)
        self._drivers.pop(job_id, None)

    async def _enforce_revocations(self, *, ending: str) -> None:
        """Restart the managed broker so it loads the CRL with the ended jobs' certificates.

        Mosquitto 2.0 applies a new CRL only on restart, and a restart drops every connection:
        it waits until no other job is running so that no aggregator loses its bus mid-round.
        Agents reconnect within seconds (their sessions and queued commands are kept).
        """
        if not self._crl_dirty or self.broker is None:
            return
        if any(job_id != ending for job_id in self._runs):
            return
        self._crl_dirty = False
        try:
            await self.broker.restart()
        except Exception as exc:
            self._crl_dirty = True
            log.error("restarting the broker to apply revocations failed: %s", exc)

    async def _provider_for_handle(
        self, handle: AggregatorHandle, job: Mapping[str, Any]
    ) -> AggregatorProvider:
        if handle.provider == "local":
            return self.local
        account = (job.get("aggregator") or {}).get("account")
        if self.clouds is None or not account:
            raise ProviderError(f"no linked account to terminate {handle.provider} {handle.ref}")
        provider: AggregatorProvider = await self.clouds.provider(account)
        return provider

    # --- reading ----------------------------------------------------------------------------

    async def explain(self, job_id: str) -> dict[str, Any]:
        return await self.queue.explain_async(job_id)


class _AttemptFailed(Exception):
    def __init__(self, reason: FailureReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _minimum(spec: JobSpec) -> MinResources:
    r = spec.resources
    return MinResources(vcpus=r.vcpus, memory_gib=r.memory_gib, disk_gib=r.disk_gib)


def _expiry(config: ControllerConfig) -> datetime:
    return utcnow() + timedelta(seconds=config.bus.command_ttl_s)


def _digest_of(job: Mapping[str, Any]) -> str:
    return str(job["model_digest"])


def _handle_from(job: Mapping[str, Any]) -> AggregatorHandle | None:
    agg = job.get("aggregator")
    if not agg:
        return None
    return AggregatorHandle(
        provider=str(agg["provider"]),
        job_id=str(job["id"]),
        ref=str(agg["ref"]),
        region=str(agg.get("region") or ""),
        address=agg.get("address"),
    )
