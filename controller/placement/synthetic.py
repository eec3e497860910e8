"""Synthetic catalogs for tests and benchmarks (never for placing real jobs).

`scaled_catalog` keeps a real catalog's locations and RTTs and draws many more offers per
region; `random_catalog` draws a small world of its own, small enough to enumerate.
"""

from __future__ import annotations

import math

import numpy as np
from fedsky.controller.placement.catalog import CONTINENTS, Catalog, Offer, make_catalog

_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96)
_GIB_PER_VCPU = (2.0, 4.0, 8.0)


def scaled_catalog(base: Catalog, *, n_offers: int, seed: int = 0) -> Catalog:
    """`n_offers` offers spread over `base`'s offer regions, priced near each region's level."""
    rng = np.random.default_rng(seed)
    regions = sorted({o.location for o in base.offers})
    # a region's price level and egress: the mean per-vCPU price of its real offers
    level = {
        loc: float(np.mean([o.usd_per_hour / o.vcpus for o in base.offers if o.location == loc]))
        for loc in regions
    }
    egress = {o.location: o.egress_usd_per_gb for o in base.offers}
    offers = []
    for i in range(n_offers):
        loc = regions[i % len(regions)]
        cloud, region = loc.split(":", 1)
        vcpus = int(rng.choice(_SIZES))
        ratio = float(rng.choice(_GIB_PER_VCPU))
        price = level[loc] * vcpus * (ratio / 4.0) ** 0.5 * float(rng.uniform(0.7, 1.4))
        offers.append(
            Offer(
                cloud,
                region,
                f"syn{i}.{vcpus}x{ratio:g}",
                vcpus,
                vcpus * ratio,
                round(price, 5),
                egress[loc],
            )
        )
    return _with_offers(base, offers)


def _with_offers(base: Catalog, offers: list[Offer]) -> Catalog:
    rtt = {
        (a, b): float(base.rtt_ms[i, j])
        for i, a in enumerate(base.locations)
        for j, b in enumerate(base.locations)
        if i <= j and not math.isnan(base.rtt_ms[i, j])
    }
    return make_catalog(
        offers, rtt, continents=base.continents, source=f"synthetic ({len(offers)} offers)"
    )


def random_catalog(
    *,
    continents: int = 3,
    locations_per_continent: int = 3,
    offers_per_location: int = 3,
    seed: int = 0,
) -> Catalog:
    """A small random world: locations on a few continents, RTT from distance, random offers.

    Locations are named `syn:c{continent}-{n}`; their continent is recorded in the catalog.
    """
    rng = np.random.default_rng(seed)
    names: list[str] = []
    conts: dict[str, str] = {}
    pos: list[np.ndarray] = []
    for c in range(continents):
        centre = rng.uniform(0, 100, size=2) + np.array([c * 120.0, 0.0])
        for n in range(locations_per_continent):
            loc = f"syn:c{c}-{n}"
            names.append(loc)
            conts[loc] = CONTINENTS[c % len(CONTINENTS)]
            pos.append(centre + rng.normal(0, 12, size=2))
    rtt: dict[tuple[str, str], float] = {}
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            d = float(np.linalg.norm(pos[i] - pos[j]))
            rtt[(a, names[j])] = round(2.0 + d * float(rng.uniform(0.9, 1.3)), 2)
    offers = []
    for loc in names:
        cloud, region = loc.split(":", 1)
        level = float(rng.uniform(0.02, 0.06))
        egress = float(rng.choice([0.08, 0.09, 0.12, 0.15]))
        for k in range(offers_per_location):
            vcpus = int(rng.choice((2, 4, 8, 16)))
            price = level * vcpus * float(rng.uniform(0.8, 1.25))
            offers.append(
                Offer(cloud, region, f"t{k}.{vcpus}", vcpus, vcpus * 4.0, round(price, 5), egress)
            )
    return make_catalog(offers, rtt, continents=conts, source=f"random (seed {seed})")
