"""A discrete-event simulation of the orchestrator with simulated agents.

It drives the same `choose` and `fail_over` as the controller (`orchestrator.choice`), with
the queue state carried from job to job as the store would carry it. Time is simulated:
failures are detected after the delays the controller's own timeouts and the agents' report
interval imply, and a replacement runs after the agent's acknowledgement and the SuperNode's
start. One `random.Random(seed)` drives every draw, so the same scenario, policy, runs and
seed give the same result.

A scenario is JSON:

    {"min": {"vcpus": 2, "memory_gib": 4, "disk_gib": 20},
     "participants": {"hospital-us": [{"id": "vm-001", "state": "running", "vcpus": 4,
                                       "memory_gib": 8, "disk_gib": 40, "fail_prob": 0.0}]},
     "policy": {...optional Policy overrides...}, "sim": {...optional SimSettings...}}

A VM's optional `online`, `report_age_s`, `host_cpu_percent`, `host_memory_available_gib`,
`host_memory_total_gib` and `tasks` default to online, fresh, an idle host and no task.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from fedsky.controller.orchestrator.choice import Decision, QueueState, choose, fail_over
from fedsky.controller.orchestrator.eligibility import check_feasible, skip_reasons
from fedsky.controller.orchestrator.failures import Failure, FailureReason
from fedsky.controller.orchestrator.policy import MinResources, Policy, VmCandidate
from fedsky.shared.ids import AGENT_ID_PATTERN
from fedsky.shared.messages import VM_STATES
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

PolicyName = Literal["fedsky", "random"]
POLICIES: tuple[PolicyName, ...] = ("fedsky", "random")


class ScenarioError(Exception):
    """A scenario file that cannot be simulated; `infeasible` when the resources are the problem."""

    def __init__(self, message: str, *, infeasible: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.infeasible = infeasible


# --- The scenario ------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScenarioMin(_Model):
    vcpus: Annotated[int, Field(ge=0)] = 0
    memory_gib: Annotated[float, Field(ge=0)] = 0.0
    disk_gib: Annotated[float, Field(ge=0)] = 0.0

    def resources(self) -> MinResources:
        return MinResources(vcpus=self.vcpus, memory_gib=self.memory_gib, disk_gib=self.disk_gib)


class ScenarioVm(_Model):
    id: Annotated[str, Field(min_length=1, max_length=256)]
    state: str
    vcpus: Annotated[int, Field(ge=0)]
    memory_gib: Annotated[float, Field(ge=0)]
    disk_gib: Annotated[float, Field(ge=0)]
    fail_prob: Annotated[float, Field(ge=0, le=1)] = 0.0
    online: bool = True
    report_age_s: Annotated[float, Field(ge=0)] = 0.0
    host_cpu_percent: Annotated[float, Field(ge=0, le=100)] = 0.0
    host_memory_available_gib: Annotated[float, Field(ge=0)] | None = None
    host_memory_total_gib: Annotated[float, Field(ge=0)] | None = None
    tasks: Annotated[int, Field(ge=0)] = 0

    @field_validator("state", mode="before")
    @classmethod
    def _libvirt_state(cls, value: Any) -> Any:
        if value not in VM_STATES:
            raise ValueError(
                f"unknown VM state {value!r}: use one of libvirt's names ({', '.join(VM_STATES)})"
            )
        return value

    def candidate(self, participant: str) -> VmCandidate:
        return VmCandidate(
            agent_id=participant,
            vm=self.id,
            state=self.state,
            vcpus=self.vcpus,
            memory_gib=self.memory_gib,
            disk_gib=self.disk_gib,
            agent_online=self.online,
            report_age_s=self.report_age_s,
            host=f"{participant}-host",
            host_cpu_percent=self.host_cpu_percent,
            host_memory_available_gib=self.host_memory_available_gib,
            host_memory_total_gib=self.host_memory_total_gib,
            tasks=self.tasks,
        )


class SimSettings(_Model):
    """The simulated world's timings (seconds) and how failures happen."""

    # How often agents report: a VM that leaves the running state is seen at the next report.
    report_interval_s: Annotated[float, Field(gt=0)] = 10.0
    # From the assignment to the agent's acknowledgement, and from there to a running SuperNode.
    ack_s: Annotated[float, Field(ge=0)] = 1.0
    start_s: Annotated[float, Field(ge=0)] = 5.0
    # Training time a participant needs in one job (a failure strikes uniformly within it).
    task_s: Annotated[float, Field(gt=0)] = 600.0
    # Idle time between one job's end and the next job's start.
    run_gap_s: Annotated[float, Field(ge=0)] = 60.0
    # Relative weights of the ways an attempt fails.
    failure_modes: dict[FailureReason, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: dict.fromkeys(FailureReason, 1.0)
    )

    @field_validator("failure_modes")
    @classmethod
    def _some_weight(cls, value: dict[FailureReason, float]) -> dict[FailureReason, float]:
        if not value or sum(value.values()) <= 0:
            raise ValueError("give at least one failure mode a positive weight")
        return value


Participant = Annotated[str, Field(pattern=AGENT_ID_PATTERN)]


class Scenario(_Model):
    min: ScenarioMin
    participants: Annotated[dict[Participant, list[ScenarioVm]], Field(min_length=1)]
    policy: Policy = Policy()
    sim: SimSettings = SimSettings()

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        for name, vms in self.participants.items():
            seen: set[str] = set()
            for vm in vms:
                if vm.id in seen:
                    raise ValueError(f"{name}: VM id {vm.id!r} appears twice")
                seen.add(vm.id)
        feasible = check_feasible(self.min.resources(), self.candidates())
        if not feasible.ok:
            raise PydanticCustomError("infeasible", "{message}", {"message": feasible.message})
        return self

    def candidates(self) -> dict[str, list[VmCandidate]]:
        return {name: [vm.candidate(name) for vm in vms] for name, vms in self.participants.items()}


def parse_scenario(data: Any, *, source: str = "scenario") -> Scenario:
    """Validate scenario data; raise ScenarioError naming the place of every problem."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: expected a JSON object with 'min' and 'participants'")
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        infeasible = any(e.get("type") == "infeasible" for e in exc.errors())
        raise ScenarioError(_describe(exc, data, source), infeasible=infeasible) from None


def load_scenario(path: str | Path) -> Scenario:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read the scenario: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ScenarioError(f"{path}: not valid JSON: {exc}") from None
    return parse_scenario(data, source=str(path))


def _describe(exc: ValidationError, data: Mapping[str, Any], source: str) -> str:
    lines: list[str] = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "infeasible":
            lines.extend(f"{source}: {line}" for line in msg.splitlines())
            continue
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        where = _where(loc, data)
        got = err.get("input")
        shown = ""
        if err.get("type") not in ("missing", "extra_forbidden", "value_error") and not isinstance(
            got, dict | list
        ):
            shown = f" (got {got!r})"
        lines.append(f"{source}: {where}: {msg}{shown}")
    return "\n".join(lines)


def _where(loc: tuple[Any, ...], data: Mapping[str, Any]) -> str:
    """`participants.hospital-eu[2] (vm-003).vcpus` rather than a bare index."""
    if len(loc) >= 3 and loc[0] == "participants" and isinstance(loc[2], int):
        name, index = str(loc[1]), loc[2]
        vm_id = ""
        with contextlib.suppress(KeyError, IndexError, TypeError):
            vm_id = str(data["participants"][name][index]["id"])
        head = f"{name} VM #{index + 1}" + (f" ({vm_id})" if vm_id else "")
        rest = ".".join(str(p) for p in loc[3:])
        return f"{head}.{rest}" if rest else head
    return ".".join(str(p) for p in loc) or "(top level)"


# --- The simulation ----------------------------------------------------------------------------


@dataclass
class SimResult:
    policy: PolicyName
    seed: int
    runs: int
    tasks: int = 0
    completed: int = 0
    dropouts: int = 0
    jobs_completed: int = 0
    attempts: int = 0
    failures: int = 0
    failovers: int = 0
    failover_s: list[float] = field(default_factory=list)
    assignments: dict[str, dict[str, int]] = field(default_factory=dict)
    dropout_causes: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        times = self.failover_s
        return {
            "policy": self.policy,
            "seed": self.seed,
            "runs": self.runs,
            "tasks": self.tasks,
            "completed": self.completed,
            "dropouts": self.dropouts,
            "dropout_rate": _rate(self.dropouts, self.tasks),
            "success_rate": _rate(self.completed, self.tasks),
            "jobs_completed": self.jobs_completed,
            "job_success_rate": _rate(self.jobs_completed, self.runs),
            "attempts": self.attempts,
            "failures": self.failures,
            "failovers": self.failovers,
            "mean_failover_s": round(sum(times) / len(times), 2) if times else None,
            "max_failover_s": round(max(times), 2) if times else None,
            "dropout_causes": dict(sorted(self.dropout_causes.items())),
            "assignments": {
                p: dict(sorted(v.items())) for p, v in sorted(self.assignments.items())
            },
        }


def _rate(n: int, d: int) -> float:
    return round(n / d, 4) if d else 0.0


@dataclass
class _Task:
    """One participant in one run."""

    participant: str
    remaining_s: float
    tries: int = 0
    vm: VmCandidate | None = None
    running_since: float = 0.0
    failed_at: float | None = None  # when the failure being recovered from struck
    done: bool = False


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    kind: str = field(compare=False)
    task: _Task = field(compare=False)
    mode: FailureReason | None = field(default=None, compare=False)


class _Simulation:
    def __init__(self, scenario: Scenario, policy_name: PolicyName, runs: int, seed: int) -> None:
        self.scenario = scenario
        self.policy = scenario.policy
        self._job_start = 0.0
        self.sim = scenario.sim
        self.minimum = scenario.min.resources()
        self.policy_name = policy_name
        self.runs = runs
        self.rng = random.Random(seed)
        self.candidates = scenario.candidates()
        self.fail_prob = {
            vm.candidate(name).key: vm.fail_prob
            for name, vms in scenario.participants.items()
            for vm in vms
        }
        # The queue state lives across jobs, as the controller's store keeps it.
        self.states = {name: QueueState(participant=name) for name in scenario.participants}
        self.result = SimResult(policy=policy_name, seed=seed, runs=runs)
        self.result.assignments = {name: {} for name in scenario.participants}
        self.modes = [m for m, w in self.sim.failure_modes.items() if w > 0]
        self.mode_weights = [self.sim.failure_modes[m] for m in self.modes]
        self.queue: list[_Event] = []
        self.seq = 0
        self.clock = 0.0

    def _push(self, at: float, kind: str, task: _Task, mode: FailureReason | None = None) -> None:
        self.seq += 1
        heapq.heappush(self.queue, _Event(at, self.seq, kind, task, mode))

    def run(self) -> SimResult:
        for _ in range(self.runs):
            self._one_job()
        return self.result

    def _one_job(self) -> None:
        start = self.clock
        self._job_start = start
        tasks = [
            _Task(participant=name, remaining_s=self.sim.task_s) for name in sorted(self.candidates)
        ]
        self.result.tasks += len(tasks)
        for task in tasks:
            self._push(start, "assign", task)
        end = start
        while self.queue:
            event = heapq.heappop(self.queue)
            end = max(end, event.at)
            getattr(self, f"_on_{event.kind}")(event)
        if all(t.done for t in tasks):
            self.result.jobs_completed += 1
        self.clock = end + self.sim.run_gap_s

    # -- events -------------------------------------------------------------------------------

    def _on_assign(self, event: _Event) -> None:
        task = event.task
        now = event.at
        vms = [self._aged(vm, now) for vm in self.candidates[task.participant]]
        if self.policy_name == "random":
            # The original study's baseline: one VM at random, whatever its state; no retry.
            vm = self.rng.choice(vms)
            self._start(task, vm, now)
            return
        decision, self.states[task.participant] = choose(
            participant=task.participant,
            candidates=vms,
            minimum=self.minimum,
            policy=self.policy,
            state=self.states[task.participant],
            now=now,
            attempt=task.tries + 1,
            trigger="job start" if event.kind == "assign" else "retry after a rest",
        )
        self._follow(task, decision, now)

    def _aged(self, vm: VmCandidate, now: float) -> VmCandidate:
        """An agent that is away (offline, or its reports stale) sends nothing while the
        job runs (each job starts from the scenario's figures): its last report grows older, so a
        wait for it ends."""
        if vm.agent_online and vm.report_age_s <= self.policy.max_report_age_s:
            return vm
        return replace(vm, report_age_s=vm.report_age_s + now - self._job_start)

    # A retry is the same choice, made when a resting VM is free again.
    _on_retry = _on_assign

    def _follow(self, task: _Task, decision: Decision, now: float) -> None:
        if decision.chosen is None:
            if decision.retry_at is not None:
                self._push(decision.retry_at, "retry", task)
                return
            self._drop(task, "no eligible VM" if decision.considerations else "tries exhausted")
            return
        if task.failed_at is not None:
            self.result.failovers += 1
        self._start(task, decision.chosen, now)

    def _start(self, task: _Task, vm: VmCandidate, now: float) -> None:
        task.tries += 1
        task.vm = vm
        self.result.attempts += 1
        counts = self.result.assignments[task.participant]
        counts[vm.vm] = counts.get(vm.vm, 0) + 1
        # The agent acknowledges, then re-checks the VM before starting anything on it.
        if skip_reasons(vm, minimum=self.minimum, policy=self.policy, now=now):
            self._push(now + self.sim.ack_s, "refused", task)
            return
        self._push(now + self.sim.ack_s + self.sim.start_s, "running", task)

    def _on_refused(self, event: _Event) -> None:
        # Only the random baseline sends work to a VM that cannot take it, and it never retries.
        self._drop(event.task, "VM not fit")

    def _on_running(self, event: _Event) -> None:
        task = event.task
        assert task.vm is not None
        if task.failed_at is not None:
            self.result.failover_s.append(event.at - task.failed_at)
            task.failed_at = None
        task.running_since = event.at
        if self.rng.random() < self.fail_prob[task.vm.key]:
            strikes = event.at + self.rng.random() * task.remaining_s
            mode = self.rng.choices(self.modes, weights=self.mode_weights)[0]
            self._push(strikes, "failed", task, mode)
        else:
            self._push(event.at + task.remaining_s, "finished", task)

    def _on_failed(self, event: _Event) -> None:
        task = event.task
        assert event.mode is not None
        self.result.failures += 1
        task.remaining_s = max(0.0, task.remaining_s - (event.at - task.running_since))
        task.failed_at = event.at
        self._push(event.at + self._detection_delay(event.mode), "detected", task, event.mode)

    def _detection_delay(self, mode: FailureReason) -> float:
        interval = self.sim.report_interval_s
        if mode is FailureReason.SUPERNODE_ERROR:
            return 0.0  # the agent's task_failed event reports the exit at once
        if mode is FailureReason.VM_LEFT_RUNNING:
            return self.rng.uniform(0.0, interval)  # seen at the agent's next inventory pass
        # The last sign of life came up to one report interval before the agent went silent.
        return max(0.0, self.policy.unresponsive_after_s - self.rng.uniform(0.0, interval))

    def _on_detected(self, event: _Event) -> None:
        task = event.task
        assert task.vm is not None
        assert event.mode is not None
        if self.policy_name == "random":
            self._drop(task, "failed, no retry")
            return
        decision, self.states[task.participant] = fail_over(
            participant=task.participant,
            failure=Failure(reason=event.mode, vm_key=task.vm.key, vm=task.vm.vm),
            tries_so_far=task.tries,
            candidates=self.candidates[task.participant],
            minimum=self.minimum,
            policy=self.policy,
            state=self.states[task.participant],
            now=event.at,
        )
        self._follow(task, decision, event.at)

    def _on_finished(self, event: _Event) -> None:
        event.task.done = True
        self.result.completed += 1

    def _drop(self, task: _Task, cause: str) -> None:
        self.result.dropouts += 1
        self.result.dropout_causes[cause] = self.result.dropout_causes.get(cause, 0) + 1


def simulate(scenario: Scenario, *, policy: PolicyName, runs: int, seed: int) -> SimResult:
    """Run `runs` jobs of the scenario under `policy` ("fedsky" or "random")."""
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}: use one of {', '.join(POLICIES)}")
    if runs < 1:
        raise ValueError("runs must be at least 1")
    return _Simulation(scenario, policy, runs, seed).run()
