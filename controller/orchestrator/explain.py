"""`fedctl job explain`: a job's attempts and decisions, as JSON and as text for people."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from fedsky.controller.orchestrator.choice import Decision
from fedsky.controller.orchestrator.failures import reason_text
from fedsky.controller.orchestrator.records import ACTIVE_STATES, Attempt


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
        why = reason_text(a.get("reason") or "")
        detail = f" ({a['detail']})" if a.get("detail") else ""
        return f"failed{took}: {why}{detail}"
    return f"{state}{took}"


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    # Simulated clocks start at 0; real ones are Unix time.
    if ts < 1e9:
        return f"t={ts:.1f}s"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
