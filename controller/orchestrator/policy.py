"""The orchestrator's inputs: its policy (the `[orchestrator]` config section), a job's minimum
VM resources, and the candidate VMs built from the inventory.

The decisions themselves are in `eligibility` (which VM may take a task) and `choice` (which one
does, and what happens after a failure); docs/orchestrator.md describes the policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any

from fedsky.controller.settings import Section
from fedsky.shared.messages import HostInfo, Report
from pydantic import Field

_GIB_PER_MIB = 1.0 / 1024.0


class OrchestratorError(Exception):
    """A request the orchestrator cannot act on (e.g. a failover with no attempt to fail)."""


class Policy(Section):
    """The orchestrator's knobs; the defaults suit agents reporting every 10 s.

    Usable as a config section (`extra="forbid"`: a misspelt key is an error, not ignored).
    """

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
    max_tries: Annotated[int, Field(ge=1, le=100)] = 5
    # No acknowledgement of an assignment within this time: the agent is unresponsive.
    ack_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # A hospital whose IT approves jobs by hand (`[policy] approval = "manual"` at its agent)
    # is waited for this long after it says the job awaits approval.
    approval_timeout_s: Annotated[float, Field(gt=0)] = 86400.0
    # No report or task event from the agent running a task for this long: unresponsive.
    unresponsive_after_s: Annotated[float, Field(gt=0)] = 30.0
    # An agent gone offline (a restart, a short outage) is waited for this long, counted from
    # its last report, before a participant with no other VM fails: its VMs are free again as
    # soon as it is back.
    agent_return_s: Annotated[float, Field(ge=0)] = 90.0
    # The largest queue weight a VM can get from its free capacity (see `capacity_weight`).
    max_weight: Annotated[int, Field(ge=1, le=64)] = 4


def number_text(x: float) -> str:
    """A figure as people write it: `4`, `0.5`, `1500000` (no exponent, no trailing zeros)."""
    return f"{x:g}" if abs(x) < 1e6 else f"{x:.0f}"


@dataclass(frozen=True, slots=True)
class MinResources:
    """A job's minimum VM resources for training."""

    vcpus: int = 0
    memory_gib: float = 0.0
    disk_gib: float = 0.0

    def describe(self) -> str:
        return (
            f"{self.vcpus} vCPUs, {number_text(self.memory_gib)} GiB memory, "
            f"{number_text(self.disk_gib)} GiB disk"
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
