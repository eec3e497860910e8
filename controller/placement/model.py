"""Round time and cost of an aggregator: the model, its inputs and the user's limits.

Formulas (see docs/placement.md for the reasoning and the defaults):

transfer time of S MB over a path of round-trip time r seconds::

    link  = min(participant link, aggregator link / n)  # n copies cross the aggregator's at once
    B     = min(link, W / r)                        # bytes/s; a TCP flow is window-limited
    ramp  = r * max(0, log2(min(W, link * r) / IW)) # slow start up to the window it needs
    t_xfer(S, r) = r * REQUEST_RTTS + ramp + S / B

round time with participants p (RTT r_p to the aggregator) and an aggregator of v vCPUs, phase by
phase (weights down, local training, update up, aggregation, then the evaluation round: weights
down again, local evaluation, metrics back)::

    t_agg   = n * S / AGG_RATE * ((1 - P) + P / v)  # Amdahl: decoding is parallel, the sum is not
    t_train = max_p (t_xfer(S, r_p) + train_s + t_xfer(S, r_p))
    t_eval  = max_p (t_xfer(S, r_p) + eval_s + r_p * REQUEST_RTTS)
    t_round = t_train + t_agg + t_eval

memory the aggregation needs (it must fit the offer's memory)::

    mem = BASE_GIB + (n + 2) * S * COPIES / 1024

cost in USD, then in the user's currency at the configured rate::

    egress = rounds * (2 n + 4/3) * S / 1000 * egress_usd_per_gb
             # every round the weights leave the aggregator's cloud to each participant for
             # training and again for evaluation, and to the controller over the bus
             # (base64 in JSON: 4/3 of the model's size)
    hours  = 730 (basis month) | rounds * t_round / 3600 (basis job)
    cost   = usd_per_hour * hours + egress
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
from fedsky.controller.placement.defaults import (
    DEFAULT_AGGREGATOR_LINK_MBPS,
    DEFAULT_EVAL_SHARE,
    DEFAULT_KRW_PER_USD,
    DEFAULT_PARTICIPANT_LINK_MBPS,
    DEFAULT_TRAIN_S,
    HOURS_PER_MONTH,
)

FloatArray = npt.NDArray[np.float64]

Currency = Literal["USD", "KRW"]
Basis = Literal["month", "job"]
CURRENCIES: tuple[Currency, ...] = ("USD", "KRW")
BASES: tuple[Basis, ...] = ("month", "job")


__all__ = [
    "DEFAULT_KRW_PER_USD",
    "DEFAULT_TRAIN_S",
    "HOURS_PER_MONTH",
    "CostLimit",
    "JobProfile",
    "Limits",
    "ModelParams",
    "PlacementError",
    "parse_cost_limit",
]


class PlacementError(ValueError):
    """Placement inputs that cannot be used (bad limits, unknown locations, bad job profile)."""


@dataclass(frozen=True)
class ModelParams:
    """The model's constants; every one is documented in docs/placement.md."""

    link_mbps: float = DEFAULT_PARTICIPANT_LINK_MBPS  # a participant's access link, Mbit/s
    # The aggregator's own link, Mbit/s: its n participants' copies cross it at once, so each
    # gets a share of it.
    aggregator_link_mbps: float = DEFAULT_AGGREGATOR_LINK_MBPS
    tcp_window_bytes: float = 4 * 1024 * 1024  # Linux's default tcp_wmem maximum
    initial_window_bytes: float = 10 * 1460  # IW10 (RFC 6928)
    request_rtts: float = 1.0  # one request/response exchange per transfer
    agg_mb_per_s: float = 1000.0  # FedAvg over decoded arrays, one core (measured ~1,000-1,400)
    agg_parallel_fraction: float = 0.5
    base_memory_gib: float = 1.0  # OS, SuperLink and ServerApp processes
    model_copies: float = 2.0  # wire bytes and decoded arrays of each model held at once


DEFAULT_PARAMS = ModelParams()


@dataclass(frozen=True)
class JobProfile:
    """What the model needs to know about a job."""

    model_mb: float
    rounds: int
    train_s: float = DEFAULT_TRAIN_S
    # Local evaluation per round; None: a share of `train_s` (one forward pass over a
    # validation split is a fraction of an epoch of training).
    eval_s: float | None = None

    @property
    def evaluation_s(self) -> float:
        return self.train_s * DEFAULT_EVAL_SHARE if self.eval_s is None else self.eval_s

    def __post_init__(self) -> None:
        if not (math.isfinite(self.model_mb) and self.model_mb > 0):
            raise PlacementError(f"model size must be > 0 MB, got {self.model_mb}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise PlacementError(f"rounds must be a whole number >= 1, got {self.rounds!r}")
        if not (math.isfinite(self.train_s) and self.train_s >= 0):
            raise PlacementError(f"local training time must be >= 0 s, got {self.train_s}")
        if self.eval_s is not None and not (math.isfinite(self.eval_s) and self.eval_s >= 0):
            raise PlacementError(f"local evaluation time must be >= 0 s, got {self.eval_s}")


@dataclass(frozen=True)
class CostLimit:
    """A maximum cost: `amount` in `currency` per month of running or per job."""

    amount: float
    currency: Currency = "USD"
    basis: Basis = "month"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.amount) and self.amount > 0):
            raise PlacementError(f"max cost must be a number > 0, got {self.amount}")
        if self.currency not in CURRENCIES:
            raise PlacementError(
                f"max cost currency {self.currency!r} is not supported: use {' or '.join(CURRENCIES)}"
            )
        if self.basis not in BASES:
            raise PlacementError(f"max cost basis {self.basis!r} is not month or job")

    def __str__(self) -> str:
        shown = f"{self.amount:,.0f}" if self.amount == int(self.amount) else f"{self.amount:,.2f}"
        return f"{shown} {self.currency}/{self.basis}"


_COST_RE = re.compile(
    r"^\s*(?P<amount>[0-9][0-9,_]*(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<currency>[A-Za-z]{3})\s*/\s*(?P<basis>[A-Za-z]+)\s*$"
)


def parse_cost_limit(text: str) -> CostLimit:
    """Parse `AMOUNT USD|KRW/month|job`, e.g. "85000 KRW/month" or "58.6 USD/job"."""
    m = _COST_RE.match(text)
    if not m:
        raise PlacementError(
            f"max cost {text!r} is not 'AMOUNT CURRENCY/BASIS', e.g. '85000 KRW/month' or '40 USD/job'"
        )
    currency, basis = m["currency"].upper(), m["basis"].lower()
    if currency not in CURRENCIES:
        raise PlacementError(
            f"max cost {text!r}: currency {currency!r} is not supported: use USD or KRW"
        )
    if basis not in BASES:
        raise PlacementError(f"max cost {text!r}: {basis!r} is not a basis: use month or job")
    amount = float(m["amount"].replace(",", "").replace("_", ""))
    return CostLimit(amount=amount, currency=currency, basis=basis)


@dataclass(frozen=True)
class Limits:
    """The user's requirements: max cost, max latency to every participant, cost weight."""

    max_cost: CostLimit
    max_latency_ms: float
    cost_weight: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_latency_ms) and self.max_latency_ms > 0):
            raise PlacementError(f"max latency must be > 0 ms, got {self.max_latency_ms}")
        if not (math.isfinite(self.cost_weight) and 0 <= self.cost_weight <= 1):
            raise PlacementError(
                f"cost weight must be between 0 and 1 (0.9 = cost first), got {self.cost_weight}"
            )


def currency_rate(currency: Currency, krw_per_usd: float) -> float:
    """Units of `currency` per USD."""
    if not (math.isfinite(krw_per_usd) and krw_per_usd > 0):
        raise PlacementError(f"KRW per USD rate must be > 0, got {krw_per_usd}")
    return krw_per_usd if currency == "KRW" else 1.0


# --- the model (vectorised: scalars or numpy arrays in, arrays out) ------------------------------


def transfer_s(
    model_mb: float, rtt_ms: FloatArray, params: ModelParams = DEFAULT_PARAMS, *, sharing: int = 1
) -> FloatArray:
    """Seconds to move `model_mb` MB one way over paths with the given RTTs, `sharing`
    transfers crossing the aggregator's link at once."""
    rtt_s = np.asarray(rtt_ms, dtype=np.float64) / 1000.0
    mbps = min(params.link_mbps, params.aggregator_link_mbps / max(1, sharing))
    link = mbps * 1e6 / 8.0  # bytes/s
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.minimum(link, params.tcp_window_bytes / rtt_s)
        needed = np.minimum(params.tcp_window_bytes, link * rtt_s)
        ramp = rtt_s * np.maximum(0.0, np.log2(needed / params.initial_window_bytes))
        out: FloatArray = rtt_s * params.request_rtts + ramp + model_mb * 1e6 / rate
    return out


def aggregation_s(
    model_mb: float, participants: int, vcpus: FloatArray, params: ModelParams = DEFAULT_PARAMS
) -> FloatArray:
    """Seconds to decode and average `participants` models on `vcpus` vCPUs."""
    serial = participants * model_mb / params.agg_mb_per_s
    p = params.agg_parallel_fraction
    out: FloatArray = serial * ((1.0 - p) + p / np.asarray(vcpus, dtype=np.float64))
    return out


def memory_needed_gib(
    model_mb: float, participants: int, params: ModelParams = DEFAULT_PARAMS
) -> float:
    return params.base_memory_gib + (participants + 2) * model_mb * params.model_copies / 1024.0


def round_time_s(
    job: JobProfile, rtt_ms: FloatArray, vcpus: FloatArray, params: ModelParams = DEFAULT_PARAMS
) -> FloatArray:
    """Round time per candidate; `rtt_ms` is (participants, candidates), `vcpus` (candidates,)."""
    rtt = np.asarray(rtt_ms, dtype=np.float64)
    leg = transfer_s(job.model_mb, rtt, params, sharing=rtt.shape[0])
    train = np.max(2.0 * leg + job.train_s, axis=0)
    evaluate = np.max(leg + job.evaluation_s + rtt / 1000.0 * params.request_rtts, axis=0)
    out: FloatArray = train + aggregation_s(job.model_mb, rtt.shape[0], vcpus, params) + evaluate
    return out


# The controller's copy of each round's weights travels over the bus base64-encoded in JSON
# (shared/flower/transfer.py): 4 bytes on the wire for every 3 of the model.
BUS_COPY_FACTOR = 4.0 / 3.0


def weight_copies_out(participants: int) -> float:
    """Copies of the weights that leave the aggregator's cloud each round, in model sizes:
    one to each participant for training, one again for evaluation, and the controller's
    (a third larger on the wire)."""
    return 2 * participants + BUS_COPY_FACTOR


def egress_usd(job: JobProfile, participants: int, egress_usd_per_gb: FloatArray) -> FloatArray:
    """Egress of the job: `weight_copies_out` copies of the model every round."""
    gb = job.rounds * weight_copies_out(participants) * job.model_mb / 1000.0
    out: FloatArray = gb * np.asarray(egress_usd_per_gb, dtype=np.float64)
    return out


def hours(job: JobProfile, basis: Basis, round_time: FloatArray) -> FloatArray:
    """Billed hours of an aggregator: a month of running, or the job's rounds."""
    if basis == "month":
        return np.full_like(np.asarray(round_time, dtype=np.float64), HOURS_PER_MONTH)
    out: FloatArray = job.rounds * np.asarray(round_time, dtype=np.float64) / 3600.0
    return out
