"""The Dynamic Task Orchestrator: which VM runs a participant's part of a job, and what if it fails.

The decisions are plain functions over plain data (`eligible`, `choose`, `fail_over`,
`check_feasible`): they import no bus and no HTTP, take the time as an argument and return the
new queue state instead of writing it, so the controller and the simulator
(`fedsky.controller.orchestrator.simulator`) run the very same code. `QueueStore` at the end is the
one piece that touches the controller's SQLite store: it loads a participant's queue state,
calls the pure functions inside one `BEGIN IMMEDIATE` transaction and saves the result with the
decision and the attempt, so two jobs choosing at once cannot take the same turn.

The policy (filtering, the weighted circular queue, resting, failover) is described in
docs/orchestrator.md.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

from fedsky.controller.store import transaction
from fedsky.shared.messages import HostInfo, Report
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from fedsky.controller.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")

_GIB_PER_MIB = 1.0 / 1024.0


class OrchestratorError(Exception):
    """A request the orchestrator cannot act on (e.g. a failover with no attempt to fail)."""


# --- Inputs ------------------------------------------------------------------------------------


class Policy(BaseModel):
    """The orchestrator's knobs; the defaults suit agents reporting every 10 s.

    Usable as a config section (`extra="forbid"`: a misspelt key is an error, not ignored).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # A VM whose agent's last report is older than this is not trusted to be as reported.
    max_report_age_s: Annotated[float, Field(gt=0)] = 60.0
    # A host busier than this is overloaded: none of its VMs is given more work.
    host_cpu_max_percent: Annotated[float, Field(gt=0, le=100)] = 90.0
    # A host with less free memory than either bound is overloaded (both apply; 0 turns one off).
    host_memory_min_free_gib: Annotated[float, Field(ge=0)] = 0.5
    host_memory_min_free_fraction: Annotated[float, Field(ge=0, le=1)] = 0.05
    # fedsky tasks a VM may run at once; a VM at the limit is skipped.
    max_tasks_per_vm: Annotated[int, Field(ge=1)] = 1
    # A VM whose task failed is not chosen again for this long (any job).
    rest_after_failure_s: Annotated[float, Field(ge=0)] = 120.0
    # Attempts per participant and job, the first one included.
    max_tries: Annotated[int, Field(ge=1, le=100)] = 3
    # No acknowledgement of an assignment within this time: the agent is unresponsive.
    ack_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # No report or task event from the agent running a task for this long: unresponsive.
    unresponsive_after_s: Annotated[float, Field(gt=0)] = 30.0
    # The largest queue weight a VM can get from its free capacity (see `capacity_weight`).
    max_weight: Annotated[int, Field(ge=1, le=64)] = 4


@dataclass(frozen=True, slots=True)
class MinResources:
    """A job's minimum VM resources for training."""

    vcpus: int = 0
    memory_gib: float = 0.0
    disk_gib: float = 0.0

    def describe(self) -> str:
        return (
            f"{self.vcpus} vCPUs, {_num(self.memory_gib)} GiB memory, "
            f"{_num(self.disk_gib)} GiB disk"
        )


@dataclass(frozen=True, slots=True)
class VmCandidate:
    """One VM as the orchestrator sees it: the inventory's figures and the controller's tasks."""

    agent_id: str
    vm: str  # the libvirt name: what the agent is told to use
    state: str  # libvirt's state name
    vcpus: int
    memory_gib: float
    disk_gib: float
    uuid: str = ""
    agent_online: bool = True
    report_age_s: float = 0.0
    host: str = ""
    host_cpu_percent: float = 0.0
    host_memory_available_gib: float | None = None
    host_memory_total_gib: float | None = None
    tasks: int = 0  # fedsky tasks running on this VM now

    @property
    def key(self) -> str:
        """The queue's name for this VM: unique across participants, stable across reports."""
        return f"{self.agent_id}/{self.vm}"


def candidates_from_report(
    report: Report,
    *,
    online: bool,
    now: datetime,
    received_at: datetime | None = None,
    tasks: Mapping[str, int] | None = None,
) -> list[VmCandidate]:
    """The candidates for one agent from its latest report.

    `online` is the inventory's view of the agent (its retained status and report freshness);
    the report's age counts from `received_at` (default: the report's own `sent_at`).
    `tasks` maps a VM key (`agent/vm`) to the fedsky tasks the controller knows run there
    (`QueueStore.active_tasks()`); a task the report itself names counts too.
    """
    age = max(0.0, (now - (received_at or report.sent_at)).total_seconds())
    host = report.host
    known = tasks or {}
    out: list[VmCandidate] = []
    for vm in report.vms:
        key = f"{report.agent_id}/{vm.name}"
        running = known.get(key, 0)
        if report.task is not None and report.task.vm == vm.name and running == 0:
            running = 1
        out.append(
            VmCandidate(
                agent_id=report.agent_id,
                vm=vm.name,
                uuid=vm.uuid,
                state=vm.state,
                vcpus=vm.vcpus,
                memory_gib=vm.memory_mib * _GIB_PER_MIB,
                disk_gib=vm.disk_gib,
                agent_online=online,
                report_age_s=age,
                host=host.hostname,
                host_cpu_percent=host.cpu_percent,
                host_memory_available_gib=host.memory_available_mib * _GIB_PER_MIB,
                host_memory_total_gib=host.memory_total_mib * _GIB_PER_MIB,
                tasks=running,
            )
        )
    return out


def candidates_from_inventory(
    rows: Iterable[Mapping[str, Any]],
    *,
    now: datetime,
    tasks: Mapping[str, int] | None = None,
) -> list[VmCandidate]:
    """The candidates from the inventory's VM rows (`fedsky.controller.inventory.store.list_vms`).

    Each row has the VM's `agent_id, name, uuid, state, vcpus, memory_mib, disk_gib`, the agent's
    `agent_online`, `report_at` (ISO time the last report was received) and `host` (the
    report's HostInfo as a dict, or None). `tasks` as for `candidates_from_report`.
    """
    known = tasks or {}
    out: list[VmCandidate] = []
    for row in rows:
        host = HostInfo.model_validate(row["host"]) if row.get("host") else None
        age = float("inf")
        if row.get("report_at"):
            seen = datetime.fromisoformat(str(row["report_at"]))
            if seen.tzinfo is None:
                seen = seen.replace(tzinfo=UTC)
            age = max(0.0, (now - seen).total_seconds())
        agent_id = str(row["agent_id"])
        name = str(row["name"])
        out.append(
            VmCandidate(
                agent_id=agent_id,
                vm=name,
                uuid=str(row.get("uuid") or ""),
                state=str(row["state"]),
                vcpus=int(row["vcpus"]),
                memory_gib=int(row["memory_mib"]) * _GIB_PER_MIB,
                disk_gib=float(row["disk_gib"]),
                agent_online=bool(row.get("agent_online")),
                report_age_s=age,
                host=host.hostname if host else "",
                host_cpu_percent=host.cpu_percent if host else 0.0,
                host_memory_available_gib=(
                    host.memory_available_mib * _GIB_PER_MIB if host else None
                ),
                host_memory_total_gib=(host.memory_total_mib * _GIB_PER_MIB if host else None),
                tasks=known.get(f"{agent_id}/{name}", 0),
            )
        )
    return out


# --- Queue state -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rest:
    """A VM is not chosen until `until` because a task on it failed."""

    until: float
    reason: str


@dataclass(frozen=True, slots=True)
class QueueState:
    """A participant's circular queue: where it stands, the VMs' credits, the resting VMs.

    `cursor` is the key of the VM taken last: the queue goes on after it. `credits` is the
    weighted round robin's running balance per VM key (see `choose`).
    """

    participant: str
    cursor: str | None = None
    credits: Mapping[str, float] = field(default_factory=dict)
    rests: Mapping[str, Rest] = field(default_factory=dict)


# --- Decisions ---------------------------------------------------------------------------------

Outcome = Literal["taken", "eligible", "skipped"]


@dataclass(frozen=True, slots=True)
class Consideration:
    """One VM looked at for a decision, and why it was taken or not."""

    vm: str
    agent_id: str
    outcome: Outcome
    reasons: tuple[str, ...]
    weight: int = 0

    def text(self) -> str:
        why = "; ".join(self.reasons)
        if self.outcome == "taken":
            return f"taken: {why}"
        if self.outcome == "eligible":
            return f"eligible, not taken: {why}"
        return f"skipped: {why}"


@dataclass(frozen=True, slots=True)
class Decision:
    """The orchestrator's answer for one participant at one moment."""

    participant: str
    attempt: int  # the attempt this decision opens, 1-based
    trigger: str  # "job start" or "failover after ..."
    decided_at: float
    chosen: VmCandidate | None
    considerations: tuple[Consideration, ...]
    summary: str
    # Set when nothing is eligible only because VMs rest after failures: when to ask again.
    retry_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "participant": self.participant,
            "attempt": self.attempt,
            "trigger": self.trigger,
            "decided_at": self.decided_at,
            "chosen": asdict(self.chosen) if self.chosen is not None else None,
            "summary": self.summary,
            "retry_at": self.retry_at,
            "considered": [
                {
                    "vm": c.vm,
                    "agent_id": c.agent_id,
                    "outcome": c.outcome,
                    "reasons": list(c.reasons),
                    "weight": c.weight,
                    "text": c.text(),
                }
                for c in self.considerations
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        chosen = data.get("chosen")
        return cls(
            participant=str(data["participant"]),
            attempt=int(data["attempt"]),
            trigger=str(data["trigger"]),
            decided_at=float(data["decided_at"]),
            chosen=VmCandidate(**chosen) if chosen else None,
            summary=str(data["summary"]),
            retry_at=(float(data["retry_at"]) if data.get("retry_at") is not None else None),
            considerations=tuple(
                Consideration(
                    vm=str(c["vm"]),
                    agent_id=str(c["agent_id"]),
                    outcome=c["outcome"],
                    reasons=tuple(str(r) for r in c["reasons"]),
                    weight=int(c.get("weight", 0)),
                )
                for c in data.get("considered", [])
            ),
        )


class FailureReason(StrEnum):
    """Why a task stopped: the three ways the orchestrator learns of a failure."""

    SUPERNODE_ERROR = "supernode_error"
    VM_LEFT_RUNNING = "vm_left_running"
    AGENT_UNRESPONSIVE = "agent_unresponsive"

    @property
    def text(self) -> str:
        return _FAILURE_TEXT[self]


_FAILURE_TEXT: dict[FailureReason, str] = {
    FailureReason.SUPERNODE_ERROR: "the SuperNode exited with an error",
    FailureReason.VM_LEFT_RUNNING: "the VM left the running state",
    FailureReason.AGENT_UNRESPONSIVE: "the agent stopped answering",
}


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed attempt, as the job pipeline saw it."""

    reason: FailureReason
    vm_key: str
    vm: str
    detail: str = ""


# --- Filtering ---------------------------------------------------------------------------------


ReasonKind = Literal[
    "offline", "not running", "below the minimum", "stale", "overloaded host", "busy", "resting"
]


def reasons_by_kind(
    vm: VmCandidate,
    *,
    minimum: MinResources,
    policy: Policy,
    now: float,
    rest: Rest | None = None,
) -> list[tuple[ReasonKind, str]]:
    """Every reason `vm` cannot take a task now, as (kind, words); empty when it is eligible."""
    reasons: list[tuple[ReasonKind, str]] = []
    if not vm.agent_online:
        reasons.append(("offline", f"agent {vm.agent_id} is offline"))
    if vm.state != "running":
        reasons.append(("not running", f"state is {vm.state}, not running"))
    if vm.vcpus < minimum.vcpus:
        reasons.append(
            ("below the minimum", f"{vm.vcpus} vCPUs, below the {minimum.vcpus} required")
        )
    if vm.memory_gib < minimum.memory_gib:
        reasons.append(
            (
                "below the minimum",
                f"{_num(vm.memory_gib)} GiB memory, "
                f"below the {_num(minimum.memory_gib)} GiB required",
            )
        )
    if vm.disk_gib < minimum.disk_gib:
        reasons.append(
            (
                "below the minimum",
                f"{_num(vm.disk_gib)} GiB disk, below the {_num(minimum.disk_gib)} GiB required",
            )
        )
    if vm.report_age_s > policy.max_report_age_s:
        reasons.append(
            (
                "stale",
                f"last report {vm.report_age_s:.0f} s old "
                f"(limit {_num(policy.max_report_age_s)} s)",
            )
        )
    host = f"host {vm.host}" if vm.host else "host"
    if vm.host_cpu_percent > policy.host_cpu_max_percent:
        reasons.append(
            (
                "overloaded host",
                f"{host} overloaded: CPU at {vm.host_cpu_percent:.0f}% "
                f"(limit {_num(policy.host_cpu_max_percent)}%)",
            )
        )
    low_memory = _host_memory_short(vm, policy)
    if low_memory:
        reasons.append(("overloaded host", f"{host} overloaded: {low_memory}"))
    if vm.tasks >= policy.max_tasks_per_vm:
        reasons.append(
            (
                "busy",
                f"already running {vm.tasks} task{'s' if vm.tasks != 1 else ''} "
                f"(limit {policy.max_tasks_per_vm})",
            )
        )
    if rest is not None and rest.until > now:
        reasons.append(
            (
                "resting",
                f"resting {rest.until - now:.0f} s more after a failure "
                f"({_reason_text(rest.reason)})",
            )
        )
    return reasons


def skip_reasons(
    vm: VmCandidate,
    *,
    minimum: MinResources,
    policy: Policy,
    now: float,
    rest: Rest | None = None,
) -> list[str]:
    """Every reason `vm` cannot take a task now, in words; empty when it is eligible."""
    return [
        text for _, text in reasons_by_kind(vm, minimum=minimum, policy=policy, now=now, rest=rest)
    ]


def eligible(
    vm: VmCandidate,
    *,
    minimum: MinResources,
    policy: Policy,
    now: float,
    rest: Rest | None = None,
) -> bool:
    """Online, running, big enough, freshly reported, host not overloaded, not resting, not full."""
    return not skip_reasons(vm, minimum=minimum, policy=policy, now=now, rest=rest)


def _host_memory_short(vm: VmCandidate, policy: Policy) -> str:
    free = vm.host_memory_available_gib
    if free is None:
        return ""
    need = policy.host_memory_min_free_gib
    total = vm.host_memory_total_gib
    if total:
        need = max(need, policy.host_memory_min_free_fraction * total)
    if free < need:
        return f"{free:.1f} GiB memory free (needs {need:.1f})"
    return ""


def capacity_weight(vm: VmCandidate, *, minimum: MinResources, policy: Policy) -> int:
    """The VM's share of the queue: how many times the job minimum fits in it, scaled by the
    share of its host's CPU that is free, rounded, between 1 and `policy.max_weight`.

    A VM twice the minimum on an idle host gets twice the turns of one that just fits, so
    successive jobs spread by free capacity; with equal weights the queue is plain round robin.
    """
    ratios = [
        have / need
        for have, need in (
            (float(vm.vcpus), float(minimum.vcpus)),
            (vm.memory_gib, minimum.memory_gib),
            (vm.disk_gib, minimum.disk_gib),
        )
        if need > 0
    ]
    fits = min(ratios) if ratios else float(max(vm.vcpus, 1))
    free_cpu = max(0.0, 1.0 - vm.host_cpu_percent / 100.0)
    return max(1, min(policy.max_weight, math.floor(fits * free_cpu + 0.5)))


# --- Choosing ----------------------------------------------------------------------------------


def ring_order(candidates: Iterable[VmCandidate], cursor: str | None) -> list[VmCandidate]:
    """The participant's VMs in queue order, starting with the one after `cursor`.

    The ring is the VMs sorted by key; a cursor whose VM has gone still marks a place in it.
    """
    ordered = sorted(candidates, key=lambda c: c.key)
    if cursor is None:
        return ordered
    start = next((i for i, c in enumerate(ordered) if c.key > cursor), 0)
    return ordered[start:] + ordered[:start]


def choose(
    *,
    participant: str,
    candidates: Sequence[VmCandidate],
    minimum: MinResources,
    policy: Policy,
    state: QueueState,
    now: float,
    attempt: int = 1,
    trigger: str = "job start",
) -> tuple[Decision, QueueState]:
    """Take the next eligible VM from the participant's weighted circular queue.

    Smooth weighted round robin: every eligible VM earns its `capacity_weight` in credit, the
    richest is taken (ties go to the first after the cursor) and pays the eligible total back.
    Credits of VMs that are not eligible stand still, so a VM that comes back resumes its turn
    instead of bursting. Returns the decision and the new state; the caller persists the state.
    """
    rests = {k: r for k, r in state.rests.items() if r.until > now}
    ordered = ring_order(candidates, state.cursor)
    checks: dict[str, list[tuple[ReasonKind, str]]] = {}
    fit: list[VmCandidate] = []
    for vm in ordered:
        found = reasons_by_kind(vm, minimum=minimum, policy=policy, now=now, rest=rests.get(vm.key))
        checks[vm.key] = found
        if not found:
            fit.append(vm)
    reasons = {key: [text for _, text in found] for key, found in checks.items()}
    keep = {c.key for c in candidates}
    credits = {k: v for k, v in state.credits.items() if k in keep}

    if not fit:
        # VMs held back only by a rest are worth waiting for: say when the first one is free.
        waits = [
            rests[vm.key].until for vm in ordered if {k for k, _ in checks[vm.key]} == {"resting"}
        ]
        retry_at = min(waits) if waits else None
        summary = _nothing_eligible(ordered, checks)
        if retry_at is not None:
            summary += f"; a resting VM is free again in {retry_at - now:.0f} s"
        considerations = tuple(
            Consideration(
                vm=vm.vm, agent_id=vm.agent_id, outcome="skipped", reasons=tuple(reasons[vm.key])
            )
            for vm in ordered
        )
        new_state = replace(state, credits=credits, rests=rests)
        decision = Decision(
            participant=participant,
            attempt=attempt,
            trigger=trigger,
            decided_at=now,
            chosen=None,
            considerations=considerations,
            summary=summary,
            retry_at=retry_at,
        )
        return decision, new_state

    weights = {vm.key: capacity_weight(vm, minimum=minimum, policy=policy) for vm in fit}
    total = sum(weights.values())
    for vm in fit:
        credits[vm.key] = credits.get(vm.key, 0.0) + weights[vm.key]
    best = fit[0]
    for vm in fit[1:]:
        if credits[vm.key] > credits[best.key]:
            best = vm
    credits[best.key] -= total
    # Bound the balances so that a long history cannot starve a VM (they stay within one round).
    for vm in fit:
        credits[vm.key] = max(-float(total), min(float(total), credits[vm.key]))

    n_fit = len(fit)
    considerations_list: list[Consideration] = []
    for vm in ordered:
        key = vm.key
        if key == best.key:
            why = (
                f"next in the queue (weight {weights[key]} of {total} "
                f"among {n_fit} eligible VM{'s' if n_fit != 1 else ''})",
            )
            considerations_list.append(
                Consideration(
                    vm=vm.vm,
                    agent_id=vm.agent_id,
                    outcome="taken",
                    reasons=why,
                    weight=weights[key],
                )
            )
        elif key in weights:
            why = (f"{best.vm} was ahead in the queue (weight {weights[key]})",)
            considerations_list.append(
                Consideration(
                    vm=vm.vm,
                    agent_id=vm.agent_id,
                    outcome="eligible",
                    reasons=why,
                    weight=weights[key],
                )
            )
        else:
            considerations_list.append(
                Consideration(
                    vm=vm.vm, agent_id=vm.agent_id, outcome="skipped", reasons=tuple(reasons[key])
                )
            )
    new_state = replace(state, cursor=best.key, credits=credits, rests=rests)
    decision = Decision(
        participant=participant,
        attempt=attempt,
        trigger=trigger,
        decided_at=now,
        chosen=best,
        considerations=tuple(considerations_list),
        summary=f"took {best.vm} on {best.agent_id} ({n_fit} of {len(ordered)} VMs eligible)",
    )
    return decision, new_state


def _nothing_eligible(
    ordered: Sequence[VmCandidate], checks: Mapping[str, list[tuple[ReasonKind, str]]]
) -> str:
    if not ordered:
        return "no eligible VM: the participant reported no VMs"
    # Count each VM once, by its first reason, so that the summary adds up to the VM count.
    kinds: Counter[str] = Counter(checks[vm.key][0][0] for vm in ordered)
    parts = ", ".join(f"{n} {kind}" for kind, n in kinds.most_common())
    return f"no eligible VM among {len(ordered)}: {parts}"


def fail_over(
    *,
    participant: str,
    failure: Failure,
    tries_so_far: int,
    candidates: Sequence[VmCandidate],
    minimum: MinResources,
    policy: Policy,
    state: QueueState,
    now: float,
) -> tuple[Decision, QueueState]:
    """After a failed attempt: rest the failed VM, then take the next eligible one.

    Gives up (a decision with `chosen=None`) once `tries_so_far` reaches `policy.max_tries`.
    """
    rests = dict(state.rests)
    if policy.rest_after_failure_s > 0:
        rests[failure.vm_key] = Rest(
            until=now + policy.rest_after_failure_s, reason=failure.reason.value
        )
    state = replace(state, rests=rests)
    trigger = f"failover after {failure.vm} failed: {failure.reason.text}"
    if failure.detail:
        trigger += f" ({failure.detail})"
    if tries_so_far >= policy.max_tries:
        decision = Decision(
            participant=participant,
            attempt=tries_so_far + 1,
            trigger=trigger,
            decided_at=now,
            chosen=None,
            considerations=(),
            summary=(
                f"gave up: {tries_so_far} tr{'ies' if tries_so_far != 1 else 'y'} made, "
                f"the most allowed (max_tries {policy.max_tries})"
            ),
        )
        return decision, replace(state, rests={k: r for k, r in rests.items() if r.until > now})
    return choose(
        participant=participant,
        candidates=candidates,
        minimum=minimum,
        policy=policy,
        state=state,
        now=now,
        attempt=tries_so_far + 1,
        trigger=trigger,
    )


# --- Feasibility -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Shortfall:
    participant: str
    message: str  # starts with the participant's name


@dataclass(frozen=True, slots=True)
class Feasibility:
    shortfalls: tuple[Shortfall, ...]

    @property
    def ok(self) -> bool:
        return not self.shortfalls

    @property
    def message(self) -> str:
        return "\n".join(s.message for s in self.shortfalls)


def check_feasible(
    minimum: MinResources, vms_by_participant: Mapping[str, Sequence[VmCandidate]]
) -> Feasibility:
    """Can every participant run the job at all? Names each participant that cannot and why.

    Static only: a running VM that meets the minimum must exist. Whether one is free right now
    (online, fresh, host not overloaded, not resting) is `choose`'s answer at assignment time.
    """
    shortfalls: list[Shortfall] = []
    for participant, vms in vms_by_participant.items():
        problem = _shortfall(minimum, vms)
        if problem:
            shortfalls.append(
                Shortfall(participant=participant, message=f"{participant}: {problem}")
            )
    return Feasibility(shortfalls=tuple(shortfalls))


def _meets(vm: VmCandidate, minimum: MinResources) -> bool:
    return (
        vm.vcpus >= minimum.vcpus
        and vm.memory_gib >= minimum.memory_gib
        and vm.disk_gib >= minimum.disk_gib
    )


def _shortfall(minimum: MinResources, vms: Sequence[VmCandidate]) -> str:
    if not vms:
        return "no VMs reported"
    running = [vm for vm in vms if vm.state == "running"]
    if any(_meets(vm, minimum) for vm in running):
        return ""
    idle_fit = sorted(
        (vm for vm in vms if vm.state != "running" and _meets(vm, minimum)), key=lambda v: v.vm
    )
    hint = ""
    if idle_fit:
        names = ", ".join(f"{vm.vm} ({vm.state})" for vm in idle_fit[:3])
        hint = f"; would fit but not running: {names}"
    if not running:
        states = Counter(vm.state for vm in vms)
        listed = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        return f"no VM is running ({listed}){hint}"
    parts: list[str] = []
    dims: tuple[tuple[str, float, Callable[[VmCandidate], float]], ...] = (
        ("vCPUs", float(minimum.vcpus), lambda v: float(v.vcpus)),
        ("GiB memory", minimum.memory_gib, lambda v: v.memory_gib),
        ("GiB disk", minimum.disk_gib, lambda v: v.disk_gib),
    )
    for unit, need, get in dims:
        largest = max(get(vm) for vm in running)
        if largest < need:
            parts.append(
                f"no running VM has {_num(need)} {unit} (largest running: {_num(largest)})"
            )
    if not parts:
        # Every resource is there, but never all in the same VM.
        closest = max(
            running,
            key=lambda v: (
                sum(
                    (
                        v.vcpus >= minimum.vcpus,
                        v.memory_gib >= minimum.memory_gib,
                        v.disk_gib >= minimum.disk_gib,
                    )
                ),
                v.vcpus,
            ),
        )
        parts.append(
            f"no running VM has {minimum.describe()} together (closest: {closest.vm} with "
            f"{closest.vcpus} vCPUs, {_num(closest.memory_gib)} GiB memory, "
            f"{_num(closest.disk_gib)} GiB disk)"
        )
    return "; ".join(parts) + hint


# --- Attempts and explain ----------------------------------------------------------------------

AttemptState = Literal["assigned", "running", "succeeded", "failed", "cancelled"]
ACTIVE_STATES: tuple[AttemptState, ...] = ("assigned", "running")


@dataclass(frozen=True, slots=True)
class Attempt:
    """One VM tried for one participant of one job."""

    job_id: str
    participant: str
    number: int
    agent_id: str
    vm: str
    vm_key: str
    state: AttemptState
    assigned_at: float
    running_at: float | None = None
    ended_at: float | None = None
    reason: str | None = None  # a FailureReason value when state is failed
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def explain_data(
    job_id: str, decisions: Sequence[Decision], attempts: Sequence[Attempt]
) -> dict[str, Any]:
    """The JSON-ready explanation of a job's assignments (`fedctl job explain --json`)."""
    participants: dict[str, dict[str, Any]] = {}
    for d in sorted(decisions, key=lambda d: (d.participant, d.attempt, d.decided_at)):
        entry = participants.setdefault(d.participant, {"attempts": [], "decisions": []})
        entry["decisions"].append(d.to_dict())
    for a in sorted(attempts, key=lambda a: (a.participant, a.number)):
        entry = participants.setdefault(a.participant, {"attempts": [], "decisions": []})
        entry["attempts"].append(a.to_dict())
    return {"job_id": job_id, "participants": dict(sorted(participants.items()))}


def render_explain(data: Mapping[str, Any]) -> str:
    """`explain_data`'s output as text for people: per participant, each attempt, then each
    decision with every VM considered and why it was taken or skipped."""
    lines: list[str] = [f"job {data.get('job_id', '?')}"]
    participants: Mapping[str, Any] = data.get("participants", {})
    if not participants:
        lines.append("  no assignments recorded")
    for name, entry in participants.items():
        attempts = entry.get("attempts", [])
        now_on = next((a["vm"] for a in reversed(attempts) if a["state"] in ACTIVE_STATES), None)
        head = f"{name}: {len(attempts)} attempt{'s' if len(attempts) != 1 else ''}"
        if now_on:
            head += f", on {now_on}"
        lines.append(head)
        for a in attempts:
            lines.append(
                f"  attempt {a['number']} on {a['vm']} ({a['agent_id']}): {_attempt_text(a)}"
            )
        for d in entry.get("decisions", []):
            lines.append(
                f"  decision for attempt {d['attempt']} at {_when(d['decided_at'])} "
                f"({d['trigger']}): {d['summary']}"
            )
            considered = d.get("considered", [])
            width = max((len(c["vm"]) for c in considered), default=0)
            for c in considered:
                lines.append(f"    {c['vm'].ljust(width)}  {c['text']}")
    return "\n".join(lines)


def _attempt_text(a: Mapping[str, Any]) -> str:
    state = a["state"]
    if state == "assigned":
        return f"assigned at {_when(a['assigned_at'])}, not yet running"
    if state == "running":
        return f"running since {_when(a['running_at'] or a['assigned_at'])}"
    took = ""
    if a.get("ended_at") is not None:
        took = f" after {a['ended_at'] - a['assigned_at']:.0f} s"
    if state == "failed":
        why = _reason_text(a.get("reason") or "")
        detail = f" ({a['detail']})" if a.get("detail") else ""
        return f"failed{took}: {why}{detail}"
    return f"{state}{took}"


def _reason_text(reason: str) -> str:
    try:
        return FailureReason(reason).text
    except ValueError:
        return reason or "unknown reason"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    # Simulated clocks start at 0; real ones are Unix time.
    if ts < 1e9:
        return f"t={ts:.1f}s"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _num(x: float) -> str:
    return f"{x:g}" if abs(x) < 1e6 else f"{x:.0f}"


# --- Persistence -------------------------------------------------------------------------------

_SCHEMA: tuple[str, ...] = (
    """CREATE TABLE orchestrator_queue (
        participant TEXT PRIMARY KEY,
        cursor TEXT,
        updated_at REAL NOT NULL
    )""",
    """CREATE TABLE orchestrator_credit (
        participant TEXT NOT NULL,
        vm_key TEXT NOT NULL,
        credit REAL NOT NULL,
        PRIMARY KEY (participant, vm_key)
    )""",
    """CREATE TABLE orchestrator_rest (
        participant TEXT NOT NULL,
        vm_key TEXT NOT NULL,
        until REAL NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (participant, vm_key)
    )""",
    """CREATE TABLE orchestrator_attempt (
        job_id TEXT NOT NULL,
        participant TEXT NOT NULL,
        number INTEGER NOT NULL,
        agent_id TEXT NOT NULL,
        vm TEXT NOT NULL,
        vm_key TEXT NOT NULL,
        state TEXT NOT NULL,
        assigned_at REAL NOT NULL,
        running_at REAL,
        ended_at REAL,
        reason TEXT,
        detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (job_id, participant, number)
    )""",
    "CREATE INDEX orchestrator_attempt_active ON orchestrator_attempt(state, vm_key)",
    """CREATE TABLE orchestrator_decision (
        job_id TEXT NOT NULL,
        participant TEXT NOT NULL,
        seq INTEGER NOT NULL,
        decided_at REAL NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (job_id, participant, seq)
    )""",
)


def _load_state(conn: sqlite3.Connection, participant: str) -> QueueState:
    row = conn.execute(
        "SELECT cursor FROM orchestrator_queue WHERE participant = ?", (participant,)
    ).fetchone()
    credits = {
        str(r["vm_key"]): float(r["credit"])
        for r in conn.execute(
            "SELECT vm_key, credit FROM orchestrator_credit WHERE participant = ?", (participant,)
        )
    }
    rests = {
        str(r["vm_key"]): Rest(until=float(r["until"]), reason=str(r["reason"]))
        for r in conn.execute(
            "SELECT vm_key, until, reason FROM orchestrator_rest WHERE participant = ?",
            (participant,),
        )
    }
    return QueueState(
        participant=participant,
        cursor=(row["cursor"] if row else None),
        credits=credits,
        rests=rests,
    )


def _save_state(conn: sqlite3.Connection, state: QueueState, now: float) -> None:
    p = state.participant
    conn.execute(
        "INSERT INTO orchestrator_queue(participant, cursor, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT(participant) DO UPDATE SET cursor = excluded.cursor, "
        "updated_at = excluded.updated_at",
        (p, state.cursor, now),
    )
    conn.execute("DELETE FROM orchestrator_credit WHERE participant = ?", (p,))
    conn.executemany(
        "INSERT INTO orchestrator_credit(participant, vm_key, credit) VALUES (?, ?, ?)",
        [(p, k, v) for k, v in state.credits.items()],
    )
    conn.execute("DELETE FROM orchestrator_rest WHERE participant = ?", (p,))
    conn.executemany(
        "INSERT INTO orchestrator_rest(participant, vm_key, until, reason) VALUES (?, ?, ?, ?)",
        [(p, k, r.until, r.reason) for k, r in state.rests.items()],
    )


def _row_attempt(r: sqlite3.Row) -> Attempt:
    return Attempt(
        job_id=r["job_id"],
        participant=r["participant"],
        number=int(r["number"]),
        agent_id=r["agent_id"],
        vm=r["vm"],
        vm_key=r["vm_key"],
        state=r["state"],
        assigned_at=float(r["assigned_at"]),
        running_at=r["running_at"],
        ended_at=r["ended_at"],
        reason=r["reason"],
        detail=r["detail"],
    )


def _latest_attempt(conn: sqlite3.Connection, job_id: str, participant: str) -> Attempt | None:
    row = conn.execute(
        "SELECT * FROM orchestrator_attempt WHERE job_id = ? AND participant = ? "
        "ORDER BY number DESC LIMIT 1",
        (job_id, participant),
    ).fetchone()
    return _row_attempt(row) if row else None


def _record(conn: sqlite3.Connection, job_id: str, decision: Decision) -> None:
    seq_row = conn.execute(
        "SELECT COALESCE(MAX(seq), 0) + 1 AS next FROM orchestrator_decision "
        "WHERE job_id = ? AND participant = ?",
        (job_id, decision.participant),
    ).fetchone()
    conn.execute(
        "INSERT INTO orchestrator_decision(job_id, participant, seq, decided_at, body) "
        "VALUES (?, ?, ?, ?, ?)",
        (
            job_id,
            decision.participant,
            int(seq_row["next"]),
            decision.decided_at,
            json.dumps(decision.to_dict()),
        ),
    )
    vm = decision.chosen
    if vm is not None:
        conn.execute(
            "INSERT INTO orchestrator_attempt"
            "(job_id, participant, number, agent_id, vm, vm_key, state, assigned_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'assigned', ?)",
            (
                job_id,
                decision.participant,
                decision.attempt,
                vm.agent_id,
                vm.vm,
                vm.key,
                decision.decided_at,
            ),
        )


def _assign(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    participant: str,
    candidates: Sequence[VmCandidate],
    minimum: MinResources,
    policy: Policy,
    now: float,
) -> Decision:
    with transaction(conn):
        last = _latest_attempt(conn, job_id, participant)
        if last is not None and last.state in ACTIVE_STATES:
            raise OrchestratorError(
                f"job {job_id}: {participant} already has attempt {last.number} on {last.vm} "
                f"({last.state}); end it or fail it over first"
            )
        tries = last.number if last is not None else 0
        state = _load_state(conn, participant)
        if tries >= policy.max_tries:
            decision = Decision(
                participant=participant,
                attempt=tries + 1,
                trigger="job start",
                decided_at=now,
                chosen=None,
                considerations=(),
                summary=f"gave up: {tries} tries made, the most allowed "
                f"(max_tries {policy.max_tries})",
            )
        else:
            decision, state = choose(
                participant=participant,
                candidates=candidates,
                minimum=minimum,
                policy=policy,
                state=state,
                now=now,
                attempt=tries + 1,
                trigger="job start" if tries == 0 else "reassignment",
            )
        _save_state(conn, state, now)
        _record(conn, job_id, decision)
    _log_decision(job_id, decision)
    return decision


def _fail_over(
    conn: sqlite3.Connection,
    *,
    job_id: str,
    participant: str,
    reason: FailureReason,
    detail: str,
    candidates: Sequence[VmCandidate],
    minimum: MinResources,
    policy: Policy,
    now: float,
) -> Decision:
    with transaction(conn):
        last = _latest_attempt(conn, job_id, participant)
        if last is None or last.state not in ACTIVE_STATES:
            raise OrchestratorError(
                f"job {job_id}: {participant} has no attempt assigned or running to fail over"
            )
        conn.execute(
            "UPDATE orchestrator_attempt SET state = 'failed', reason = ?, detail = ?, "
            "ended_at = ? "
            "WHERE job_id = ? AND participant = ? AND number = ?",
            (reason.value, detail, now, job_id, participant, last.number),
        )
        state = _load_state(conn, participant)
        decision, state = fail_over(
            participant=participant,
            failure=Failure(reason=reason, vm_key=last.vm_key, vm=last.vm, detail=detail),
            tries_so_far=last.number,
            candidates=candidates,
            minimum=minimum,
            policy=policy,
            state=state,
            now=now,
        )
        _save_state(conn, state, now)
        _record(conn, job_id, decision)
    _log_decision(job_id, decision)
    return decision


def _mark(
    conn: sqlite3.Connection, *, job_id: str, participant: str, state: AttemptState, now: float
) -> Attempt:
    if state not in ("running", "succeeded", "cancelled"):
        raise OrchestratorError(
            f"attempts are marked running, succeeded or cancelled, not {state!r}; use fail_over"
        )
    with transaction(conn):
        last = _latest_attempt(conn, job_id, participant)
        if last is None or last.state not in ACTIVE_STATES:
            raise OrchestratorError(
                f"job {job_id}: {participant} has no attempt assigned or running"
            )
        if state == "running":
            conn.execute(
                "UPDATE orchestrator_attempt SET state = 'running', "
                "running_at = COALESCE(running_at, ?) "
                "WHERE job_id = ? AND participant = ? AND number = ?",
                (now, job_id, participant, last.number),
            )
        else:
            conn.execute(
                "UPDATE orchestrator_attempt SET state = ?, ended_at = ? "
                "WHERE job_id = ? AND participant = ? AND number = ?",
                (state, now, job_id, participant, last.number),
            )
        updated = _latest_attempt(conn, job_id, participant)
    assert updated is not None
    return updated


def _attempts(conn: sqlite3.Connection, job_id: str) -> list[Attempt]:
    rows = conn.execute(
        "SELECT * FROM orchestrator_attempt WHERE job_id = ? ORDER BY participant, number",
        (job_id,),
    ).fetchall()
    return [_row_attempt(r) for r in rows]


def _decisions(conn: sqlite3.Connection, job_id: str) -> list[Decision]:
    rows = conn.execute(
        "SELECT body FROM orchestrator_decision WHERE job_id = ? ORDER BY participant, seq",
        (job_id,),
    ).fetchall()
    return [Decision.from_dict(json.loads(r["body"])) for r in rows]


def _explain(conn: sqlite3.Connection, *, job_id: str) -> dict[str, Any]:
    return explain_data(job_id, _decisions(conn, job_id), _attempts(conn, job_id))


def _active_tasks(conn: sqlite3.Connection) -> dict[str, int]:
    rows = conn.execute(
        "SELECT vm_key, COUNT(*) AS n FROM orchestrator_attempt "
        "WHERE state IN ('assigned', 'running') GROUP BY vm_key"
    ).fetchall()
    return {str(r["vm_key"]): int(r["n"]) for r in rows}


def _load(conn: sqlite3.Connection, *, participant: str) -> QueueState:
    return _load_state(conn, participant)


def _save(conn: sqlite3.Connection, *, state: QueueState, now: float) -> None:
    with transaction(conn):
        _save_state(conn, state, now)


def _forget_job(conn: sqlite3.Connection, *, job_id: str) -> None:
    with transaction(conn):
        conn.execute("DELETE FROM orchestrator_attempt WHERE job_id = ?", (job_id,))
        conn.execute("DELETE FROM orchestrator_decision WHERE job_id = ?", (job_id,))


def _log_decision(job_id: str, decision: Decision) -> None:
    if decision.chosen is not None:
        log.info(
            "job %s: %s attempt %s -> %s (%s)",
            job_id,
            decision.participant,
            decision.attempt,
            decision.chosen.vm,
            decision.trigger,
        )
    else:
        log.warning(
            "job %s: %s: %s (%s)", job_id, decision.participant, decision.summary, decision.trigger
        )


class QueueStore:
    """The orchestrator's tables in the controller's store: queue state, attempts, decisions.

    Each method runs in one transaction. The plain methods block (CLIs, tests, the store's own
    thread); the `*_async` ones run in the store's thread, off the event loop.
    """

    PART = "orchestrator"

    def __init__(self, store: Store) -> None:
        self._store = store
        store.ensure_schema(self.PART, _SCHEMA)

    def _call(self, fn: Callable[..., T], **kwargs: Any) -> T:
        return self._store.call(functools.partial(fn, **kwargs))

    async def _run(self, fn: Callable[..., T], **kwargs: Any) -> T:
        return await self._store.run(functools.partial(fn, **kwargs))

    # -- queue state --------------------------------------------------------------------------

    def load(self, participant: str) -> QueueState:
        return self._call(_load, participant=participant)

    def save(self, state: QueueState, *, now: float) -> None:
        self._call(_save, state=state, now=now)

    def active_tasks(self) -> dict[str, int]:
        """VM key -> attempts assigned or running there (for `VmCandidate.tasks`)."""
        return self._store.call(_active_tasks)

    async def active_tasks_async(self) -> dict[str, int]:
        return await self._store.run(_active_tasks)

    # -- the job pipeline's calls -------------------------------------------------------------

    def assign(
        self,
        *,
        job_id: str,
        participant: str,
        candidates: Sequence[VmCandidate],
        minimum: MinResources,
        policy: Policy,
        now: float,
    ) -> Decision:
        """Choose a VM for the participant's first (or next) attempt and record it as assigned.

        `decision.chosen is None` means no VM can take it now; `decision.summary` says why.
        """
        return self._call(
            _assign,
            job_id=job_id,
            participant=participant,
            candidates=candidates,
            minimum=minimum,
            policy=policy,
            now=now,
        )

    async def assign_async(
        self,
        *,
        job_id: str,
        participant: str,
        candidates: Sequence[VmCandidate],
        minimum: MinResources,
        policy: Policy,
        now: float,
    ) -> Decision:
        return await self._run(
            _assign,
            job_id=job_id,
            participant=participant,
            candidates=candidates,
            minimum=minimum,
            policy=policy,
            now=now,
        )

    def fail_over(
        self,
        *,
        job_id: str,
        participant: str,
        reason: FailureReason,
        candidates: Sequence[VmCandidate],
        minimum: MinResources,
        policy: Policy,
        now: float,
        detail: str = "",
    ) -> Decision:
        """Record the current attempt as failed, rest its VM, choose the next (up to max_tries)."""
        return self._call(
            _fail_over,
            job_id=job_id,
            participant=participant,
            reason=reason,
            detail=detail,
            candidates=candidates,
            minimum=minimum,
            policy=policy,
            now=now,
        )

    async def fail_over_async(
        self,
        *,
        job_id: str,
        participant: str,
        reason: FailureReason,
        candidates: Sequence[VmCandidate],
        minimum: MinResources,
        policy: Policy,
        now: float,
        detail: str = "",
    ) -> Decision:
        return await self._run(
            _fail_over,
            job_id=job_id,
            participant=participant,
            reason=reason,
            detail=detail,
            candidates=candidates,
            minimum=minimum,
            policy=policy,
            now=now,
        )

    def mark(self, *, job_id: str, participant: str, state: AttemptState, now: float) -> Attempt:
        """Move the participant's current attempt to running, succeeded or cancelled."""
        return self._call(_mark, job_id=job_id, participant=participant, state=state, now=now)

    async def mark_async(
        self, *, job_id: str, participant: str, state: AttemptState, now: float
    ) -> Attempt:
        return await self._run(_mark, job_id=job_id, participant=participant, state=state, now=now)

    # -- reading ------------------------------------------------------------------------------

    def attempts(self, job_id: str) -> list[Attempt]:
        return self._store.call(_attempts, job_id)

    def decisions(self, job_id: str) -> list[Decision]:
        return self._store.call(_decisions, job_id)

    def explain(self, job_id: str) -> dict[str, Any]:
        """`explain_data` for the job (render it with `render_explain`)."""
        return self._call(_explain, job_id=job_id)

    async def explain_async(self, job_id: str) -> dict[str, Any]:
        return await self._run(_explain, job_id=job_id)

    def forget_job(self, job_id: str) -> None:
        """Drop a job's attempts and decisions (the queue state is kept: it spans jobs)."""
        self._call(_forget_job, job_id=job_id)
