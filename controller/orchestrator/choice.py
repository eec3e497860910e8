"""The Dynamic Task Orchestrator's choice: which VM runs a participant's part of a job, and
which one next when it fails.

Plain functions over plain data: they import no bus, no HTTP and no SQL, take the time as an
argument and return the new queue state instead of writing it, so the controller (through
`orchestrator.store.QueueStore`) and the simulator (`orchestrator.simulator`) run the very
same code. The policy (the weighted circular queue, resting, failover) is described in
docs/orchestrator.md.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

from fedsky.controller.orchestrator.eligibility import ReasonKind, capacity_weight, reasons_by_kind
from fedsky.controller.orchestrator.failures import (
    Failure,
    FailureReason,
    Rest,
    failure_reason_of,
)
from fedsky.controller.orchestrator.policy import MinResources, Policy, VmCandidate

# The failure vocabulary is defined beside the eligibility rule that needs it; the choice is
# where callers look for it.
__all__ = [
    "Consideration",
    "Decision",
    "Failure",
    "FailureReason",
    "Outcome",
    "QueueState",
    "Rest",
    "choose",
    "fail_over",
    "failure_reason_of",
    "ring_order",
]


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
        # VMs held back only by a rest, or by their agent's short absence, are worth waiting
        # for: say when the first one may be free.
        waits = {
            vm.key: at
            for vm in ordered
            if (at := _free_again_at(vm, checks[vm.key], rests, policy, now)) is not None
        }
        retry_at = min(waits.values()) if waits else None
        summary = _nothing_eligible(ordered, checks)
        if retry_at is not None:
            first = next(vm for vm in ordered if waits.get(vm.key) == retry_at)
            if any(kind == "resting" for kind, _ in checks[first.key]):
                summary += f"; a resting VM is free again in {retry_at - now:.0f} s"
            else:
                summary += f"; waiting for agent {first.agent_id} to come back"
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


# Reasons that pass by themselves: a rest ends; an agent that restarts comes back.
_WAITABLE: frozenset[ReasonKind] = frozenset({"resting", "offline", "stale"})
# How soon to look again for an agent that is away.
AGENT_RETRY_S = 5.0


def _free_again_at(
    vm: VmCandidate,
    found: Sequence[tuple[ReasonKind, str]],
    rests: Mapping[str, Rest],
    policy: Policy,
    now: float,
) -> float | None:
    """When `vm` may be eligible again, if only waitable reasons hold it back."""
    kinds = {kind for kind, _ in found}
    if not kinds <= _WAITABLE:
        return None
    at = rests[vm.key].until if "resting" in kinds else now
    if kinds & {"offline", "stale"}:
        if vm.report_age_s >= policy.agent_return_s:
            return None  # away for too long: not worth waiting for
        at = max(at, now + AGENT_RETRY_S)
    return at


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
