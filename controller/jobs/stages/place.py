"""Placing: the optimizer's choice of where the job's aggregator runs.

The choice is made over the catalog, restricted to linked clouds that have a provider; with none
linked, every offer is placed and the controller's own SuperLink stands in: the `local` provider,
or `onprem` (the operator's aggregator host) when `[aggregator.onprem]` is configured.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from fedsky.controller.inventory import store as inventory
from fedsky.controller.jobs import store as jobstore
from fedsky.controller.jobs.context import JobContext
from fedsky.controller.jobs.records import JobFailure, JobRun
from fedsky.controller.placement import (
    JobProfile,
    Limits,
    PlacementError,
    load_catalog,
    parse_cost_limit,
    place,
)
from fedsky.shared.jobspec import Placement as PlacementLimits

NO_COST_LIMIT = "1000000 USD/month"
NO_LATENCY_LIMIT_MS = 60_000.0


@dataclass(frozen=True)
class Placement:
    """Where the aggregator goes and which provider launches it."""

    choice: dict[str, object]
    baseline: dict[str, object] | None
    provider: str
    linked_clouds: list[str]
    measured_rtt: dict[str, float]
    method: str = "exact"

    @property
    def cloud(self) -> str:
        return str(self.choice["cloud"])

    @property
    def region(self) -> str:
        return str(self.choice["region"])

    @property
    def instance_type(self) -> str:
        return str(self.choice["instance_type"])

    def to_json(self) -> dict[str, object]:
        return {
            "choice": self.choice,
            "baseline": self.baseline,
            "provider": self.provider,
            "linked_clouds": self.linked_clouds,
            "measured_rtt": self.measured_rtt,
            "method": self.method,
        }


def job_limits(pl: PlacementLimits) -> Limits:
    """The optimizer's limits for a job's `[placement]` (no limit where it sets none)."""
    return Limits(
        max_cost=parse_cost_limit(str(pl.max_cost) if pl.max_cost else NO_COST_LIMIT),
        max_latency_ms=pl.max_latency_ms or NO_LATENCY_LIMIT_MS,
        cost_weight=pl.cost_weight,
    )


def job_profile(pl: PlacementLimits, *, model_mb: float, rounds: int) -> JobProfile:
    """What the model knows of a job: its model's size, its rounds and, where the job gives
    measured ones, its local training and evaluation seconds."""
    extra = {k: v for k, v in (("train_s", pl.train_s), ("eval_s", pl.eval_s)) if v is not None}
    return JobProfile(model_mb=max(model_mb, 0.001), rounds=rounds, **extra)


def pinned_offer(pl: PlacementLimits) -> tuple[str, str, str] | None:
    """The offer the job pins its aggregator to, if it does."""
    if pl.offer is None:
        return None
    cloud, region, instance_type = pl.offer.split(":")
    return cloud, region, instance_type


async def place_aggregator(ctx: JobContext, run: JobRun) -> Placement:
    """Choose the aggregator's offer, record it with the job, and say where in the job's log."""
    spec = run.spec
    locations = await ctx.store.run(inventory.location_of, spec.participants)
    agents = {a["id"]: a for a in await ctx.store.run(inventory.list_agents)}
    measured = {p: agents[p]["rtt_ms"] for p in spec.participants if agents[p]["rtt_ms"]}
    linked: list[str] = list(await ctx.clouds.linked_clouds()) if ctx.clouds is not None else []
    job = await ctx.store.run(jobstore.get_job, run.job_id)
    model_mb = ctx.model_path(str(job["model_digest"])).stat().st_size / 1e6
    limits = job_limits(spec.placement)
    try:
        result = await asyncio.to_thread(
            place,
            participants={p: locations[p] for p in spec.participants},
            job=job_profile(spec.placement, model_mb=model_mb, rounds=spec.hyperparameters.rounds),
            limits=limits,
            catalog=load_catalog(),
            measured_rtt=measured or None,
            clouds=linked or None,
            method=spec.placement.method,
            krw_per_usd=ctx.config.placement.krw_per_usd,
            baseline_offer=ctx.config.placement.baseline_offer,
            offer=pinned_offer(spec.placement),
            params=ctx.config.placement.model_params,
        )
    except PlacementError as exc:
        raise JobFailure(f"placement: {exc}") from None
    if result.choice is None:
        raise JobFailure(f"no feasible placement: {result.reason}")
    choice = result.choice
    summary = result.to_json()
    own = ctx.local.name  # "local" or "onprem"
    provider_name = choice.offer.cloud if choice.offer.cloud in linked else own
    placement = Placement(
        choice=summary["choice"],
        baseline=summary["baseline"],
        provider=provider_name,
        linked_clouds=linked,
        measured_rtt=measured,
        method=result.method,
    )
    await ctx.store.run(
        jobstore.update_job,
        run.job_id,
        placement_json=json.dumps(placement.to_json(), default=str),
    )
    note = ""
    if provider_name == own:
        stand_in = ctx.local.describe()
        note = (
            f" (no cloud is linked: {stand_in} stands in for it)"
            if not linked
            else f" ({stand_in} stands in)"
        )
    await ctx.log(
        run.job_id,
        f"placed on {choice.label}: {choice.round_time_s:.1f} s per round, "
        f"{choice.cost:.2f} {choice.currency}{note}",
    )
    return placement
