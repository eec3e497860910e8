"""Which VMs may take a task: the minimum-resource rule, the eligibility filter, a VM's queue
weight, and whether a job can run at all (`check_feasible`).

`missing_resources` is the one statement of the minimum-resource rule; the filter, the
feasibility check and its hints all ask it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from fedsky.controller.orchestrator.failures import Rest, reason_text
from fedsky.controller.orchestrator.policy import (
    MinResources,
    Policy,
    VmCandidate,
    candidates_from_inventory,
    number_text,
)

# --- The minimum-resource rule -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resource:
    """One of the resources a job asks a minimum of."""

    unit: str  # "" for a count, "GiB" for a size
    name: str  # "vCPUs", "memory", "disk"
    have: Callable[[VmCandidate], float]
    need: Callable[[MinResources], float]

    @property
    def label(self) -> str:
        """`vCPUs`, `GiB memory`, `GiB disk`: the words after a figure."""
        return f"{self.unit} {self.name}" if self.unit else self.name

    def below(self, vm: VmCandidate, minimum: MinResources) -> str:
        """`2 GiB memory, below the 4 GiB required`."""
        need = number_text(self.need(minimum)) + (f" {self.unit}" if self.unit else "")
        return f"{number_text(self.have(vm))} {self.label}, below the {need} required"


RESOURCES: tuple[Resource, ...] = (
    Resource("", "vCPUs", lambda vm: float(vm.vcpus), lambda m: float(m.vcpus)),
    Resource("GiB", "memory", lambda vm: vm.memory_gib, lambda m: m.memory_gib),
    Resource("GiB", "disk", lambda vm: vm.disk_gib, lambda m: m.disk_gib),
)


def missing_resources(vm: VmCandidate, minimum: MinResources) -> list[Resource]:
    """The resources `vm` has less of than the job's minimum; empty when it is big enough."""
    return [r for r in RESOURCES if r.have(vm) < r.need(minimum)]


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
    reasons.extend(
        ("below the minimum", r.below(vm, minimum)) for r in missing_resources(vm, minimum)
    )
    if vm.report_age_s > policy.max_report_age_s:
        reasons.append(
            (
                "stale",
                f"last report {vm.report_age_s:.0f} s old "
                f"(limit {number_text(policy.max_report_age_s)} s)",
            )
        )
    host = f"host {vm.host}" if vm.host else "host"
    if vm.host_cpu_percent > policy.host_cpu_max_percent:
        reasons.append(
            (
                "overloaded host",
                f"{host} overloaded: CPU at {vm.host_cpu_percent:.0f}% "
                f"(limit {number_text(policy.host_cpu_max_percent)}%)",
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
                f"({reason_text(rest.reason)})",
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
    ratios = [r.have(vm) / r.need(minimum) for r in RESOURCES if r.need(minimum) > 0]
    fits = min(ratios) if ratios else float(max(vm.vcpus, 1))
    free_cpu = max(0.0, 1.0 - vm.host_cpu_percent / 100.0)
    return max(1, min(policy.max_weight, math.floor(fits * free_cpu + 0.5)))


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


def _shortfall(minimum: MinResources, vms: Sequence[VmCandidate]) -> str:
    if not vms:
        return "no VMs reported"
    running = [vm for vm in vms if vm.state == "running"]
    if any(not missing_resources(vm, minimum) for vm in running):
        return ""
    idle_fit = sorted(
        (vm for vm in vms if vm.state != "running" and not missing_resources(vm, minimum)),
        key=lambda v: v.vm,
    )
    hint = ""
    if idle_fit:
        names = ", ".join(f"{vm.vm} ({vm.state})" for vm in idle_fit[:3])
        hint = f"; would fit but not running: {names}"
    if not running:
        states = Counter(vm.state for vm in vms)
        listed = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        return f"no VM is running ({listed}){hint}"
    missing = [missing_resources(vm, minimum) for vm in running]
    parts = [
        f"no running VM has {number_text(r.need(minimum))} {r.label} "
        f"(largest running: {number_text(max(r.have(vm) for vm in running))})"
        for r in RESOURCES
        if all(r in short for short in missing)
    ]
    if not parts:
        # Every resource is there, but never all in the same VM.
        closest = max(
            zip(running, missing, strict=True), key=lambda pair: (-len(pair[1]), pair[0].vcpus)
        )[0]
        parts.append(
            f"no running VM has {minimum.describe()} together (closest: {closest.vm} with "
            f"{closest.vcpus} vCPUs, {number_text(closest.memory_gib)} GiB memory, "
            f"{number_text(closest.disk_gib)} GiB disk)"
        )
    return "; ".join(parts) + hint


def annotate_eligibility(
    rows: Sequence[Mapping[str, Any]],
    *,
    minimum: MinResources,
    policy: Policy,
    now: datetime,
    tasks: Mapping[str, int] | None = None,
    rests: Mapping[str, Rest] | None = None,
) -> list[dict[str, Any]]:
    """The inventory's VM rows (`inventory.store.list_vms`), each with `eligible` and the
    `reasons` it could not take a task with `minimum` now: what the dashboard shows. `tasks`
    and `rests` (per VM key) are the queue's, as the orchestrator's own choice reads them."""
    candidates = candidates_from_inventory(rows, now=now, tasks=tasks)
    resting = rests or {}
    out = []
    for row, vm in zip(rows, candidates, strict=True):
        why = skip_reasons(
            vm, minimum=minimum, policy=policy, now=now.timestamp(), rest=resting.get(vm.key)
        )
        out.append({**row, "eligible": not why, "reasons": why})
    return out
