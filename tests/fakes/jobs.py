"""Small fakes of what the job pipeline talks to, for its unit tests (no sockets, no processes).

The store, the inventory, the orchestrator's queue and the PKI are the real ones on a temporary
SQLite file; only the bus (with a scripted agent behind it), the aggregator provider, its
SuperLink control surface, the Model Manager and the broker's revocation are stand-ins.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fedsky.controller.bus.consumer import BusUnavailable
from fedsky.controller.clouds.base import (
    AggregatorFiles,
    AggregatorHandle,
    AggregatorSpec,
    ProviderError,
)
from fedsky.controller.clouds.local import LocalProvider, pki_tls_issuer
from fedsky.controller.clouds.settings import CloudsConfig
from fedsky.controller.config import ControllerConfig
from fedsky.controller.inventory import store as inventory
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.context import JobContext
from fedsky.controller.jobs.records import JobRun
from fedsky.controller.orchestrator.policy import Policy
from fedsky.controller.orchestrator.store import QueueStore
from fedsky.controller.security.pki import Pki
from fedsky.controller.store import Store
from fedsky.shared.jobspec import JobSpec
from fedsky.shared.messages import (
    AgentStatus,
    Command,
    Event,
    FailureKind,
    HostInfo,
    PrepareTaskCommand,
    Report,
    StartTaskCommand,
    StopTaskCommand,
    VmInfo,
)

HOSPITALS = {"hospital-us": "aws:us-east-1", "hospital-eu": "aws:eu-west-1"}
VMS = ("vm-001", "vm-002", "vm-003")
MODEL_DIGEST = "ab" * 32
# The documentation range: never routed, only ever a string in these tests.
ALLOWED_SOURCES = ("203.0.113.0/24",)

# What the scripted agent does with a command: a list of (kind, detail) events to send back.
Reply = list[tuple[str, str] | tuple[str, str, FailureKind]]
Behaviour = Callable[[str, Command], Reply | None]


@functools.cache
def key_text(agent: str, job_id: str, generation: int, role: str) -> str:
    """A real P-384 node key (OpenSSH), one per (agent, job, generation, role): the controller
    issues the SuperNode's certificate over it."""
    key = ec.generate_private_key(ec.SECP384R1())
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        .decode()
    )


class ScriptedAgents:
    """The bus, with every hospital's agent answering as a healthy one would unless told not to.

    `behave(agent, command)` may return the events to send instead (or `None` for the default);
    events reach the stages through the context's waiters, as the driver routes them.
    """

    def __init__(self, ctx_ref: Callable[[], JobContext]) -> None:
        self._ctx = ctx_ref
        self.sent: list[tuple[str, Command]] = []
        self.behave: Behaviour = lambda agent, command: None
        self.aggregator_handler: Any = None
        self.listeners: list[Any] = []
        self.down = False  # the broker cannot be reached: every command raises BusUnavailable
        # Like the real agent: one key pair per job and role, new ones only when asked.
        self.key_generation: dict[tuple[str, str], int] = {}

    def add_event_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    async def send_command(self, agent_id: str, command: Command) -> None:
        if self.down:
            raise BusUnavailable("the broker is not reachable; the command was not sent")
        self.sent.append((agent_id, command))
        reply = self.behave(agent_id, command)
        if reply is None:
            reply = self._healthy(command)
        task_id = getattr(command, "task_id", None)
        keys: dict[str, str] = {}
        if isinstance(command, PrepareTaskCommand):
            slot = (agent_id, command.job_id)
            generation = self.key_generation.get(slot, 0) + (
                1 if command.fresh_keys or slot not in self.key_generation else 0
            )
            self.key_generation[slot] = generation
            keys = {
                role: key_text(agent_id, command.job_id, generation, role)
                for role in ("node", "standby")
            }
        for kind, detail, *failure_kind in reply:
            event = Event(
                agent_id=agent_id,
                kind=kind,  # type: ignore[arg-type]
                task_id=task_id,
                detail=detail,
                failure_kind=failure_kind[0] if failure_kind else None,
                public_keys=keys if kind == "task_acknowledged" else {},  # type: ignore[arg-type]
            )
            asyncio.get_running_loop().call_soon(self.deliver, event)

    def deliver(self, event: Event) -> None:
        """As the bus does: to the listeners (a job manager's `on_event`), else straight to
        the stages' waiters."""
        if not self.listeners:
            self._ctx().route_event(event)
        for listener in self.listeners:
            asyncio.get_running_loop().create_task(listener(event))

    @staticmethod
    def _healthy(command: Command) -> Reply:
        if isinstance(command, PrepareTaskCommand):
            return [("task_acknowledged", "")]
        if isinstance(command, StartTaskCommand):
            return [("task_running", "")]
        if isinstance(command, StopTaskCommand):
            return [("task_stopped", command.reason)]
        return []

    def commands(self, kind: type[Command]) -> list[tuple[str, Command]]:
        return [(a, c) for a, c in self.sent if isinstance(c, kind)]


@dataclass
class FakeProvider:
    """An aggregator provider that launches nothing; `fail_launch` makes launch fail."""

    name: str = "aws"
    account_name: str = "acme-aws"
    fail_launch: str | None = None
    launch_gate: asyncio.Event | None = None
    launched: list[AggregatorSpec] = field(default_factory=list)
    terminated: list[AggregatorHandle] = field(default_factory=list)
    healthy_answer: bool = True

    def aggregator_files(self, job_id: str, *, model_file: Path) -> AggregatorFiles:
        base = Path("/opt/fedsky/aggregator")
        return AggregatorFiles(
            model_file=base / "model.safetensors",
            ca=base / "ca.crt",
            cert=base / "agg.crt",
            key=base / "agg.key",
        )

    async def launch(self, spec: AggregatorSpec) -> AggregatorHandle:
        self.launched.append(spec)
        if self.launch_gate is not None:
            await self.launch_gate.wait()
        if self.fail_launch:
            raise ProviderError(self.fail_launch)
        return AggregatorHandle(
            provider=self.name,
            job_id=spec.job_id,
            ref=f"i-{spec.job_id}",
            region=spec.region,
            address="198.51.100.7:9092",
        )

    async def healthy(self, handle: AggregatorHandle) -> bool:
        return self.healthy_answer

    async def address(self, handle: AggregatorHandle) -> str:
        return handle.address or ""

    async def terminate(self, handle: AggregatorHandle) -> None:
        self.terminated.append(handle)


@dataclass
class FakeClouds:
    provider_: FakeProvider = field(default_factory=FakeProvider)
    linked: list[str] = field(default_factory=lambda: ["aws"])
    refuse_launch: str | None = None
    place_gate: asyncio.Event | None = None

    async def linked_clouds(self) -> list[str]:
        if self.place_gate is not None:
            await self.place_gate.wait()
        return self.linked

    async def provider_for_launch(self, cloud: str, *, region: str) -> FakeProvider:
        if self.refuse_launch:
            raise ProviderError(self.refuse_launch)
        return self.provider_

    async def provider(self, name: str) -> FakeProvider:
        return self.provider_


@dataclass
class FakeControl:
    """The SuperLink's control surface: node registry and runs, in memory."""

    ids: Any = field(default_factory=lambda: itertools.count(101))
    registered: dict[int, str] = field(default_factory=dict)
    unregistered: list[int] = field(default_factory=list)
    status: str = "running"
    runs_started: int = 0
    run_gate: asyncio.Event | None = None

    async def register_node(self, public_key: Path, *, name: str | None = None) -> int:
        node_id = int(next(self.ids))
        self.registered[node_id] = public_key.read_text().strip()
        return node_id

    async def unregister_node(self, node_id: int) -> None:
        self.unregistered.append(node_id)

    async def start_run(self, *, app_dir: Path, settings: Any, run_config_file: Path) -> int:
        self.runs_started += 1
        return 7

    async def run_status(self, run_id: int) -> str:
        return self.status


@dataclass
class FakeModels:
    jobs: list[str] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)

    async def record_job(self, *, job_id: str, **_: Any) -> None:
        self.jobs.append(job_id)

    async def record_round_message(self, message: Any, *, weights: bytes | None) -> None:
        return None

    async def finish_job(self, *, job_id: str, status: str) -> None:
        self.finished[job_id] = status


@dataclass
class FakeRevocations:
    revoked: int = 0
    ended: list[bool] = field(default_factory=list)  # others_running, per ended job

    def job_certificate_revoked(self, identity: str = "") -> None:
        self.revoked += 1

    async def job_ended(self, *, others_running: bool) -> None:
        self.ended.append(others_running)


SPEC = {
    "name": "unit",
    "model": "model.safetensors",
    "participants": list(HOSPITALS),
    "dataset": "digits",
    "hyperparameters": {"rounds": 2, "local_epochs": 1, "min_participants": 2},
    "resources": {"vcpus": 2, "memory_gib": 2, "disk_gib": 10},
}


@dataclass
class Harness:
    ctx: JobContext
    agents: ScriptedAgents
    clouds: FakeClouds
    control: FakeControl
    models: FakeModels
    revocations: FakeRevocations
    store: Store

    def spec(self, **changes: Any) -> JobSpec:
        return JobSpec.model_validate({**SPEC, **changes})

    async def new_job(self, job_id: str = "unit-0001", **changes: Any) -> JobRun:
        spec = self.spec(**changes)
        await self.store.run(
            jobstore.create_job,
            job_id=job_id,
            name=spec.name,
            spec=spec.model_dump(mode="json"),
            model_digest=MODEL_DIGEST,
        )
        return JobRun.new(job_id=job_id, spec=spec, directory=self.ctx.jobs_dir / job_id)

    async def job(self, job_id: str = "unit-0001") -> dict[str, Any]:
        job: dict[str, Any] = await self.store.run(jobstore.get_job, job_id)
        return job

    async def log_text(self, job_id: str = "unit-0001") -> str:
        rows = await self.store.run(jobstore.job_log, job_id)
        return "\n".join(r["message"] for r in rows)

    def set_online(self, agent: str, online: bool) -> None:
        self.store.call(
            inventory.record_status,
            AgentStatus(agent_id=agent, state="online" if online else "offline"),
            received_at=datetime.now(UTC),
        )


def _host() -> HostInfo:
    return HostInfo(
        hostname="kvm",
        cpu_count=16,
        cpu_percent=10.0,
        load_1m=0.5,
        memory_total_mib=65536,
        memory_available_mib=49152,
        disk_total_gib=1000,
        disk_free_gib=800,
    )


def make_harness(tmp_path: Path, **policy: Any) -> Harness:
    """A job context on real SQLite and a real CA, with two hospitals of three running VMs each."""
    config = ControllerConfig(
        state_dir=tmp_path / "state",
        clouds=CloudsConfig(allowed_sources=ALLOWED_SOURCES),
        orchestrator=Policy(**{"ack_timeout_s": 2.0, **policy}),
    )
    config.state_dir.mkdir(parents=True)
    pki = Pki.init(config.pki_dir)
    store = Store(config.db_path)
    inventory.ensure_schema(store)
    jobstore.ensure_schema(store)
    now = datetime.now(UTC)
    for seq, (agent, location) in enumerate(HOSPITALS.items(), start=1):
        store.call(
            lambda conn, a=agent, loc=location: conn.execute(
                "INSERT INTO agents(id, location, enrolled_at) VALUES (?, ?, ?)",
                (a, loc, now.isoformat()),
            )
        )
        vms = [
            VmInfo(
                name=name,
                uuid=f"{seq}{i}".ljust(32, "0"),
                state="running",
                vcpus=4,
                memory_mib=8192,
                disk_gib=40,
            )
            for i, name in enumerate(VMS)
        ]
        report = Report(agent_id=agent, seq=1, sent_at=now, host=_host(), vms=vms)
        store.call(inventory.record_reports, [(report, now)], history_limit=10)
        store.call(
            inventory.record_status, AgentStatus(agent_id=agent, state="online"), received_at=now
        )
    model = config.state_dir / "model-files" / f"{MODEL_DIGEST}.safetensors"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"\0" * 4096)
    control = FakeControl()
    clouds = FakeClouds()
    models = FakeModels()
    revocations = FakeRevocations()
    holder: dict[str, JobContext] = {}
    agents = ScriptedAgents(lambda: holder["ctx"])
    ctx = JobContext(
        config=config,
        store=store,
        pki=pki,
        bus=agents,
        models=models,
        queue=QueueStore(store),
        local=LocalProvider(work_dir=config.state_dir / "jobs", issue_tls=pki_tls_issuer(pki)),
        make_control=lambda **_: control,
        revocations=revocations,
        clouds=clouds,
    )
    holder["ctx"] = ctx
    return Harness(ctx, agents, clouds, control, models, revocations, store)
