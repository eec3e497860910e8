"""Every payload on the bus, as a versioned pydantic model.

Versioning: each payload carries `schema` as "MAJOR.MINOR". A newer minor version's unknown
fields are ignored (models use `extra="ignore"`); another major version is refused. Decoding
never raises anything but `PayloadError`, whose `reason` is a short category that the consumer
counts and logs once per sender.

Minor versions: 1.1 adds `Event.failure_kind`, why a task failed as one of `FailureKind`; 1.2
`RoundMetrics.phases`; 1.3 certificate renewal (`certificate_requested` events with
`Event.csr_pem`, the `certificate_issued` command).
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

from fedsky.shared.ids import AGENT_ID_PATTERN
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_MAJOR = 1
# 1.1: task_failed kinds; 1.2: round phases; 1.3: certificate renewal; 1.4: what a hospital
# allows (task_awaiting_approval, the approval note, the policy's failure kinds) and the node
# certificate in start_task.
SCHEMA_VERSION = "1.4"
MAX_PAYLOAD_BYTES = 1 << 20  # 1 MiB: a report of 4,096 VMs fits many times over.

VmState = Literal[
    "nostate", "running", "blocked", "paused", "shutdown", "shutoff", "crashed", "pmsuspended"
]
VM_STATES: tuple[VmState, ...] = (
    "nostate",
    "running",
    "blocked",
    "paused",
    "shutdown",
    "shutoff",
    "crashed",
    "pmsuspended",
)

AgentId = Annotated[str, Field(pattern=AGENT_ID_PATTERN)]
ShortText = Annotated[str, Field(max_length=256)]
Detail = Annotated[str, Field(max_length=2048)]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class PayloadError(ValueError):
    """A payload that cannot be accepted; `reason` is a short category for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_: str = Field(default=SCHEMA_VERSION, alias="schema", pattern=r"^\d{1,3}\.\d{1,3}$")

    @field_validator("schema_")
    @classmethod
    def _same_major(cls, value: str) -> str:
        major = int(value.split(".", 1)[0])
        if major != SCHEMA_MAJOR:
            raise ValueError(
                f"schema major version {major} is not supported (this is {SCHEMA_MAJOR})"
            )
        return value

    def encode(self) -> bytes:
        return self.model_dump_json(by_alias=True).encode()


# --- Agent reports -----------------------------------------------------------------------------


class VmInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    name: ShortText
    uuid: Annotated[str, Field(pattern=r"^[0-9a-fA-F-]{32,36}$")]
    state: VmState
    vcpus: Annotated[int, Field(ge=0, le=4096)]
    memory_mib: Annotated[int, Field(ge=0, le=1 << 30)]
    disk_gib: Annotated[float, Field(ge=0, le=1 << 30)]
    addresses: Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=32)] = []


class HostInfo(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    hostname: ShortText
    cpu_count: Annotated[int, Field(ge=1, le=65536)]
    cpu_percent: Annotated[float, Field(ge=0, le=100)]
    load_1m: Annotated[float, Field(ge=0)]
    memory_total_mib: Annotated[int, Field(ge=0)]
    memory_available_mib: Annotated[int, Field(ge=0)]
    disk_total_gib: Annotated[float, Field(ge=0)]
    disk_free_gib: Annotated[float, Field(ge=0)]


class TaskSummary(BaseModel):
    """What an agent is running now, as far as it may say (never a local path)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    task_id: ShortText
    job_id: ShortText
    vm: ShortText
    state: Literal["assigned", "starting", "running", "stopping"]
    since: AwareDatetime


class Report(Message):
    agent_id: AgentId
    seq: Annotated[int, Field(ge=0)]
    sent_at: AwareDatetime
    host: HostInfo
    vms: Annotated[list[VmInfo], Field(max_length=4096)]
    task: TaskSummary | None = None
    # Measured round-trip times (ms) to candidate regions, keyed by `cloud:region`.
    rtt_ms: Annotated[
        dict[Annotated[str, Field(max_length=96)], Annotated[float, Field(ge=0, le=60000)]],
        Field(max_length=512),
    ] = {}


class AgentStatus(Message):
    """Retained on the status topic; the offline form is also the MQTT will."""

    agent_id: AgentId
    state: Literal["online", "offline"]
    at: AwareDatetime | None = None
    version: ShortText = ""


# --- Commands and events -----------------------------------------------------------------------


class Command(Message):
    command_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] = Field(default_factory=new_id)
    issued_at: AwareDatetime = Field(default_factory=utcnow)
    expires_at: AwareDatetime

    def expired(self, now: datetime | None = None) -> bool:
        return (now or utcnow()) >= self.expires_at


class PingCommand(Command):
    kind: Literal["ping"] = "ping"


TaskId = Annotated[str, Field(pattern=r"^[a-z0-9-]{1,80}$")]
JobId = Annotated[str, Field(pattern=r"^[a-z0-9-]{1,48}$")]


class PrepareTaskCommand(Command):
    """Ask the agent to check the VM and make this task's SuperNode keys (a node and a standby).

    The agent answers `task_acknowledged` with the public keys in `Event.public_keys`; the
    private keys never leave the hospital.
    """

    kind: Literal["prepare_task"] = "prepare_task"
    task_id: TaskId
    job_id: JobId
    vm: ShortText
    dataset: ShortText
    # Keys are kept per job, so a failover reuses the registered standby; `fresh_keys` asks for a
    # new pair once both are spent (an unregistered key cannot register again).
    fresh_keys: bool = False


class StartTaskCommand(Command):
    """Start the SuperNode for a task on the chosen VM."""

    kind: Literal["start_task"] = "start_task"
    task_id: TaskId
    job_id: JobId
    vm: ShortText
    dataset: ShortText
    superlink: Annotated[str, Field(max_length=300)]  # host:port of the aggregator's Fleet API
    ca_pem: Annotated[str, Field(max_length=65536)]
    key: Literal["node", "standby"] = "node"
    node_config: Annotated[dict[ShortText, ShortText | int | float], Field(max_length=32)] = {}
    # 1.4: the SuperNode's TLS certificate for the aggregator's front (`<agent>.node`, over the
    # public half of `key`); the front serves the Fleet API only to such certificates.
    node_cert_pem: Annotated[str, Field(max_length=16384)] | None = None


class StopTaskCommand(Command):
    kind: Literal["stop_task"] = "stop_task"
    task_id: TaskId
    reason: ShortText = ""


class CertificateIssuedCommand(Command):
    """The agent's renewed certificate (1.3), the answer to its `certificate_requested` event.

    The agent installs it only if the CA signed it for its own name and its pending new key."""

    kind: Literal["certificate_issued"] = "certificate_issued"
    cert_pem: Annotated[str, Field(max_length=16384)]


AnyCommand = Annotated[
    PingCommand
    | PrepareTaskCommand
    | StartTaskCommand
    | StopTaskCommand
    | CertificateIssuedCommand,
    Field(discriminator="kind"),
]


class CommandEnvelope(BaseModel):
    """Wraps the command union so that one `model_validate` picks the right kind."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    command: AnyCommand


EventKind = Literal[
    "pong",
    "command_rejected",
    "task_acknowledged",
    "task_starting",
    "task_running",
    "task_finished",
    "task_failed",
    "task_stopped",
    "certificate_requested",
    # 1.4: the hospital's IT approves each new job by hand (`[policy] approval = "manual"`); the
    # task's acknowledgement or refusal follows their decision.
    "task_awaiting_approval",
]


class FailureKind(StrEnum):
    """Why an agent reports `task_failed`: every way a task fails at the agent (schema 1.1)."""

    # The dataset the command names is not configured at the agent (no VM of it would do).
    DATASET_MISSING = "dataset_missing"
    # The VM was missing or not running when the agent checked it before preparing or starting.
    VM_NOT_RUNNING = "vm_not_running"
    # The VM of a running task left the running state; the agent stopped the SuperNode.
    VM_STOPPED = "vm_stopped"
    # The agent could not reach the VM to start the SuperNode there, or lost it (SSH failed).
    VM_UNREACHABLE = "vm_unreachable"
    # A start for a task the agent has not prepared (e.g. the agent restarted in between).
    NOT_PREPARED = "not_prepared"
    # The SuperNode could not be started (a missing file, a bad setting, no executable).
    START_FAILED = "start_failed"
    # The SuperNode exited with an error or was killed.
    SUPERNODE_EXITED = "supernode_exited"
    # 1.4, the hospital's `[policy]`: its IT denied the job (`agentctl jobs deny`) ...
    DENIED = "denied"
    # ... the job's dataset is not one the hospital lends ...
    NOT_ALLOWED = "not_allowed"
    # ... the VM is not one it lends to fedsky ...
    VM_NOT_ALLOWED = "vm_not_allowed"
    # ... or it already runs as many tasks as it allows at once.
    BUSY = "busy"
    # A reason this side cannot tell apart: a newer minor's new kind, or none given.
    OTHER = "other"


_FAILURE_KINDS = frozenset(k.value for k in FailureKind)

# What agents of schema 1.0, which said why only in words, began their task_failed details with.
_FAILURE_PREFIXES_1_0: tuple[tuple[str, FailureKind], ...] = (
    ("dataset ", FailureKind.DATASET_MISSING),
    ("vm-check:", FailureKind.VM_NOT_RUNNING),
    ("vm-", FailureKind.VM_STOPPED),
)


def _minor(schema: object) -> int | None:
    if not isinstance(schema, str):
        return None
    _, _, minor = schema.partition(".")
    return int(minor) if minor.isdigit() else None


class ApprovalNote(BaseModel):
    """A hospital IT's decision on a job (1.4), on the event that follows it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: JobId
    decision: Literal["approved", "denied"]
    by: ShortText  # who at the hospital: the login that ran `agentctl jobs approve|deny`
    reason: ShortText = ""


class Event(Message):
    agent_id: AgentId
    kind: EventKind
    at: AwareDatetime = Field(default_factory=utcnow)
    command_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")] | None = None
    task_id: ShortText | None = None
    detail: Detail = ""
    # task_acknowledged: the SuperNode public keys (OpenSSH format) by role, "node" and "standby".
    public_keys: Annotated[
        dict[Literal["node", "standby"], Annotated[str, Field(max_length=1024)]],
        Field(max_length=2),
    ] = {}
    # task_failed (1.1): why. Always set on a decoded task_failed event, whatever its minor.
    failure_kind: FailureKind | None = None
    # certificate_requested (1.3): a CSR made with a new key; the event itself comes over the
    # session of the current certificate, which is what vouches for it.
    csr_pem: Annotated[str, Field(max_length=16384)] | None = None
    # task_acknowledged / task_failed (1.4): the hospital IT's decision this event follows.
    approval: ApprovalNote | None = None

    @model_validator(mode="before")
    @classmethod
    def _failure_kind(cls, data: Any) -> Any:
        """Give every task_failed a kind: an unknown kind (a newer minor's) reads as `other`,
        and a 1.0 event's is read from its detail's prefix, the only place 1.0 agents said it."""
        if not isinstance(data, dict):
            return data
        given = data.get("failure_kind")
        if given is None and data.get("kind") != "task_failed":
            return data
        if isinstance(given, str) and given in _FAILURE_KINDS:
            return data
        kind = FailureKind.OTHER
        if given is None and _minor(data.get("schema", SCHEMA_VERSION)) == 0:
            detail = str(data.get("detail", ""))
            kind = next((k for p, k in _FAILURE_PREFIXES_1_0 if detail.startswith(p)), kind)
        return {**data, "failure_kind": kind}


def make_ping(*, ttl: timedelta = timedelta(seconds=60)) -> PingCommand:
    now = utcnow()
    return PingCommand(issued_at=now, expires_at=now + ttl)


# --- Aggregator: round metrics, global weights, end of run -------------------------------------
# All three travel on `Topics.aggregator_metrics(agg_id)`, published by the job's aggregator with
# its own identity (`agg-<job id>`). The global weights (a safetensors file; 26 MB for the original
# study's CNN) are split into `WeightsChunk`s so that every message stays under
# MAX_PAYLOAD_BYTES like any other on the bus: one bound for the broker and every consumer, QoS 1
# per chunk, and a lost chunk costs a re-send of 512 KiB rather than of the whole model.

WEIGHTS_CHUNK_BYTES = 512 * 1024  # raw bytes per chunk; base64 makes about 700 KB of JSON
MAX_CLASSES = 256  # a 256 x 256 confusion matrix of 10-digit counts is still under 1 MiB

Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Ratio = Annotated[float, Field(ge=0, le=1)]


class ClassFigures(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    label: Annotated[int, Field(ge=0, lt=MAX_CLASSES)]
    precision: Ratio
    recall: Ratio
    f1: Ratio
    support: Annotated[int, Field(ge=0)]
    predicted: Annotated[int, Field(ge=0)]


class SiteContribution(BaseModel):
    """One participant's part in a round, as its ClientApp reported it (counts only)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    site: AgentId
    train_examples: Annotated[int, Field(ge=0)]
    eval_examples: Annotated[int, Field(ge=0)] = 0
    train_loss: float | None = None
    eval_loss: float | None = None


class SiteFailure(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    site: AgentId | None = None  # None when the node never said which site it is
    phase: Literal["train", "evaluate"]
    reason: Detail  # scrubbed of local paths at the site


class WeightsRef(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    sha256: Sha256Hex
    size: Annotated[int, Field(ge=0)]
    chunks: Annotated[int, Field(ge=0)]
    format: Literal["safetensors"] = "safetensors"


class RoundPhases(BaseModel):
    """Where a round's time went, measured by the ServerApp: from sending the weights for
    training to the last reply (the participants' downloads, training and uploads), the
    averaging, and the evaluation round trip."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    train_s: Annotated[float, Field(ge=0, le=1e7)]
    aggregate_s: Annotated[float, Field(ge=0, le=1e7)]
    evaluate_s: Annotated[float, Field(ge=0, le=1e7)]


def phase_seconds(phases: RoundPhases) -> dict[str, float]:
    """A round's phases by name: train, aggregate, evaluate."""
    return {"train": phases.train_s, "aggregate": phases.aggregate_s, "evaluate": phases.evaluate_s}


PHASE_NAMES = ("train", "aggregate", "evaluate")


class RoundMetrics(Message):
    """A round's global metrics, computed from the participants' summed confusion matrices."""

    kind: Literal["round_metrics"] = "round_metrics"
    job_id: JobId
    round: Annotated[int, Field(ge=1)]
    num_rounds: Annotated[int, Field(ge=1)]
    accuracy: Ratio
    loss: Annotated[float, Field(ge=0)]  # evaluation loss, weighted by evaluation examples
    f1: Ratio  # macro
    recall: Ratio  # macro
    precision: Ratio  # macro
    train_loss: float | None = None
    per_class: Annotated[list[ClassFigures], Field(max_length=MAX_CLASSES)]
    confusion_matrix: Annotated[
        list[Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_CLASSES)]],
        Field(max_length=MAX_CLASSES),
    ]
    participants: Annotated[list[SiteContribution], Field(max_length=1024)]
    failures: Annotated[list[SiteFailure], Field(max_length=1024)] = []
    started_at: AwareDatetime
    finished_at: AwareDatetime
    duration_s: Annotated[float, Field(ge=0)]
    # Sent by aggregators of schema 1.2 and later.
    phases: RoundPhases | None = None
    weights: WeightsRef | None = None

    @field_validator("confusion_matrix")
    @classmethod
    def _square(cls, value: list[list[int]]) -> list[list[int]]:
        if any(len(row) != len(value) for row in value):
            raise ValueError("confusion matrix must be square")
        return value


class WeightsChunk(Message):
    """One piece of a round's global weights; `data` is base64 of at most WEIGHTS_CHUNK_BYTES."""

    kind: Literal["weights_chunk"] = "weights_chunk"
    job_id: JobId
    round: Annotated[int, Field(ge=1)]
    sha256: Sha256Hex  # of the whole file
    index: Annotated[int, Field(ge=0)]
    count: Annotated[int, Field(ge=1, le=1 << 16)]
    data: Annotated[str, Field(max_length=(WEIGHTS_CHUNK_BYTES * 4) // 3 + 4)]


class RunFinished(Message):
    kind: Literal["run_finished"] = "run_finished"
    job_id: JobId
    status: Literal["completed", "failed"]
    rounds_completed: Annotated[int, Field(ge=0)]
    num_rounds: Annotated[int, Field(ge=1)]
    reason: Detail = ""
    finished_at: AwareDatetime = Field(default_factory=utcnow)


AggregatorMessage = Annotated[
    RoundMetrics | WeightsChunk | RunFinished, Field(discriminator="kind")
]


class _AggregatorEnvelope(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    message: AggregatorMessage


# --- Decoding ----------------------------------------------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _load_json(payload: bytes | bytearray) -> Any:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise PayloadError("too_large", f"{len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise PayloadError("not_json", type(exc).__name__) from None


def _reason(exc: ValidationError) -> str:
    for err in exc.errors():
        # Top-level for plain messages; under the union's tag for commands.
        if "schema" in tuple(err.get("loc", ()))[:3]:
            return "schema_version"
    return "invalid"


def _parsed(payload: bytes | bytearray) -> dict[str, Any]:
    data = _load_json(payload)
    if not isinstance(data, dict):
        raise PayloadError("invalid", "payload is not a JSON object")
    return data


def _validated(model: type[M], data: dict[str, Any], *, skip: int = 0) -> M:
    """Validate, turning any error into PayloadError; `skip` drops a wrapper's location parts."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[skip:]) or "payload"
        raise PayloadError(_reason(exc), f"{where}: {first.get('msg', 'invalid')}") from None


def decode(model: type[M], payload: bytes | bytearray) -> M:
    """Parse `payload` as `model`; raise PayloadError (never anything else) if it is not one."""
    return _validated(model, _parsed(payload))


def decode_command(
    payload: bytes | bytearray,
) -> (
    PingCommand | PrepareTaskCommand | StartTaskCommand | StopTaskCommand | CertificateIssuedCommand
):
    return _validated(CommandEnvelope, {"command": _parsed(payload)}, skip=1).command


def decode_aggregator(payload: bytes | bytearray) -> RoundMetrics | WeightsChunk | RunFinished:
    """Parse a message from a job's aggregator (metrics topic); PayloadError if it is not one."""
    return _validated(_AggregatorEnvelope, {"message": _parsed(payload)}, skip=1).message
