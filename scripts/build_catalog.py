"""Build fedsky's shipped placement catalog from the public cloud facts beside the repo.

Reads `../shared/data/cloud/` (prices from the SkyPilot catalog, RTTs measured by Skyplane, AWS
egress from Skyplane's transfer-cost table, GCP and Azure egress from their published first
tiers) and writes `controller/placement/data/{offers,rtt,locations}.csv` and `SOURCES.md`.
The built files are committed: fedsky never needs the source directory at run time.

    python scripts/build_catalog.py [--source DIR] [--out DIR] [--date YYYY-MM-DD]

Rules (from the source directory's SOURCES.md):
- GCP zones map to their region (mean over zones); only the PREMIUM network tier is used.
- `avg_rtt`, mean of both directions; a location's RTT to itself is 1 ms (never zero).
- Regions with a price but no RTT are left out (listed in SOURCES.md), so no RTT is guessed.
- Sizes other than the one a source row gives are derived by the family's linear pricing
  (each derived row says so in its `note`).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "cloud"
DEFAULT_OUT = REPO / "controller" / "placement" / "data"
INTRA_REGION_RTT_MS = 1.0

sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Row:
    cloud: str
    region: str
    instance_type: str
    vcpus: int
    memory_gib: float
    usd_per_hour: float
    egress_usd_per_gb: float
    note: str


# (family source file, instance type in the file, [(derived type, vcpus, memory GiB, factor)])
AWS_FAMILIES: list[tuple[str, str, list[tuple[str, int, float, float]]]] = [
    (
        "aws_m5_2xlarge_from_skypilot_v7.csv",
        "m5.2xlarge",
        [
            ("m5.large", 2, 8, 0.25),
            ("m5.xlarge", 4, 16, 0.5),
            ("m5.2xlarge", 8, 32, 1),
            ("m5.4xlarge", 16, 64, 2),
        ],
    ),
    (
        "aws_m6i_xlarge_from_skypilot_v7.csv",
        "m6i.xlarge",
        [
            ("m6i.large", 2, 8, 0.5),
            ("m6i.xlarge", 4, 16, 1),
            ("m6i.2xlarge", 8, 32, 2),
            ("m6i.4xlarge", 16, 64, 4),
        ],
    ),
    (
        "aws_c6i_2xlarge_from_skypilot_v7.csv",
        "c6i.2xlarge",
        [
            ("c6i.large", 2, 4, 0.25),
            ("c6i.xlarge", 4, 8, 0.5),
            ("c6i.2xlarge", 8, 16, 1),
            ("c6i.4xlarge", 16, 32, 2),
        ],
    ),
    (
        "aws_t3_xlarge_from_skypilot_v7.csv",
        "t3.xlarge",
        [
            ("t3.medium", 2, 4, 0.25),
            ("t3.large", 2, 8, 0.5),
            ("t3.xlarge", 4, 16, 1),
            ("t3.2xlarge", 8, 32, 2),
        ],
    ),
]
GCP_FAMILIES: list[tuple[str, str, list[tuple[str, int, float, float]]]] = [
    (
        "gcp_e2_standard_2_from_skypilot_v7.csv",
        "e2-standard-2",
        [
            ("e2-standard-2", 2, 8, 1),
            ("e2-standard-4", 4, 16, 2),
            ("e2-standard-8", 8, 32, 4),
            ("e2-standard-16", 16, 64, 8),
        ],
    ),
    (
        "gcp_n2_standard_2_from_skypilot_v7.csv",
        "n2-standard-2",
        [
            ("n2-standard-2", 2, 8, 1),
            ("n2-standard-4", 4, 16, 2),
            ("n2-standard-8", 8, 32, 4),
            ("n2-standard-16", 16, 64, 8),
        ],
    ),
]
AZURE_FAMILIES: list[tuple[str, str, list[tuple[str, int, float, float]]]] = [
    (
        "azure_Dv5_US_from_skypilot_v6.csv",
        "Standard_D8s_v5",
        [
            ("Standard_D2s_v5", 2, 8, 0.25),
            ("Standard_D4s_v5", 4, 16, 0.5),
            ("Standard_D8s_v5", 8, 32, 1),
            ("Standard_D16s_v5", 16, 64, 2),
        ],
    ),
]

# GCP and Azure internet egress, first tier, USD/GB: the published figures quoted in the
# source directory's SOURCES.md (premium tier for GCP).
GCP_EGRESS_DEFAULT = 0.12
GCP_EGRESS = {"asia-northeast1": 0.14, "asia-northeast3": 0.147}
AZURE_EGRESS_BY_CONTINENT = {"north-america": 0.0875, "europe": 0.0875, "asia": 0.12}


def read_csv(path: Path) -> Iterator[dict[str, str]]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    yield from csv.DictReader(lines)


def fmt(value: float) -> str:
    return f"{round(value, 6):g}"


def build_rtt(source: Path) -> tuple[dict[tuple[str, str], float], tuple[float, float]]:
    """Symmetric RTT (ms) per unordered region pair from Skyplane's PREMIUM-tier measurements,
    and the (largest, mean) difference between a pair's two directions."""
    zone = re.compile(r"^(gcp:.+)-[a-z]$")

    def region(loc: str) -> str:
        m = zone.match(loc)
        return m.group(1) if m else loc

    directed: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in read_csv(source / "skyplane_latency.csv"):
        if r["src_tier"] != "PREMIUM" or r["dst_tier"] != "PREMIUM":
            continue
        a, b = region(r["src_region"]), region(r["dst_region"])
        if a != b:
            directed[(a, b)].append(float(r["avg_rtt"]))
    pairs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (a, b), values in directed.items():
        # mean over zones per direction, then the mean of both directions
        pairs[(min(a, b), max(a, b))].append(statistics.fmean(values))
    gaps = [abs(v[0] - v[1]) for v in pairs.values() if len(v) == 2]
    asym = (max(gaps), statistics.fmean(gaps)) if gaps else (0.0, 0.0)
    return {pair: statistics.fmean(values) for pair, values in pairs.items()}, asym


def aws_egress(source: Path) -> dict[str, float]:
    return {
        r["src"]: float(r["cost"])
        for r in read_csv(source / "skyplane_aws_transfer_costs.csv")
        if r["dst"] == "internet"
    }


def build_offers(source: Path, rtt_locations: set[str]) -> tuple[list[Row], dict[str, set[str]]]:
    """Offers in every region that has an RTT; also the priced regions left out, per cloud."""
    from fedsky.controller.placement.catalog import continent_of

    egress_aws = aws_egress(source)
    rows: dict[tuple[str, str, str], Row] = {}
    left_out: dict[str, set[str]] = defaultdict(set)

    def egress(cloud: str, region: str) -> float:
        if cloud == "aws":
            return egress_aws[region]
        if cloud == "gcp":
            return GCP_EGRESS.get(region, GCP_EGRESS_DEFAULT)
        cont = continent_of(f"azure:{region}")
        if cont not in AZURE_EGRESS_BY_CONTINENT:
            raise SystemExit(f"no Azure egress figure for {region} ({cont})")
        return AZURE_EGRESS_BY_CONTINENT[cont]

    def add(row: Row) -> None:
        # A source row wins over a derived one; where both exist they must agree.
        key = (row.cloud, row.region, row.instance_type)
        old = rows.get(key)
        if old is not None and abs(old.usd_per_hour - row.usd_per_hour) > 1e-9:
            raise SystemExit(f"{key}: source {old.usd_per_hour} != derived {row.usd_per_hour}")
        if old is None or row.note == "source row":
            rows[key] = row

    families: Iterable[tuple[str, tuple[str, str, list[tuple[str, int, float, float]]]]] = [
        *(("aws", f) for f in AWS_FAMILIES),
        *(("gcp", f) for f in GCP_FAMILIES),
        *(("azure", f) for f in AZURE_FAMILIES),
    ]
    for cloud, (filename, base_type, sizes) in families:
        for r in read_csv(source / filename):
            region = r["Region"]
            if f"{cloud}:{region}" not in rtt_locations:
                left_out[cloud].add(region)
                continue
            price = float(r["Price"])
            src_note = "derived from e2-standard-16 / 8" if r.get("note") == "derived" else ""
            if r["InstanceType"] != base_type:
                # a row of another size in the same file: a real price, taken as it is
                add(
                    Row(
                        cloud,
                        region,
                        r["InstanceType"],
                        int(r["vCPUs"]),
                        float(r["MemoryGiB"]),
                        price,
                        egress(cloud, region),
                        "source row",
                    )
                )
                continue
            for name, vcpus, mem, factor in sizes:
                if factor == 1:
                    note = src_note or "source row"
                else:
                    note = f"{base_type} x {factor:g} (linear family pricing)"
                    if src_note:
                        note += f"; {base_type} {src_note}"
                add(
                    Row(
                        cloud, region, name, vcpus, mem, price * factor, egress(cloud, region), note
                    )
                )
    return sorted(
        rows.values(), key=lambda r: (r.cloud, r.region, r.vcpus, r.usd_per_hour, r.instance_type)
    ), left_out


def azure_p95_check(
    source: Path, rtt: dict[tuple[str, str], float]
) -> list[tuple[str, str, float, float]]:
    """(a, b, Azure P95, Skyplane mean) for the pairs both sources name."""
    out = []
    for r in read_csv(source / "azure_p95_rtt_subset.csv"):
        a = "azure:" + r["src"].lower().replace(" ", "")
        b = "azure:" + r["dst"].lower().replace(" ", "")
        key = (min(a, b), max(a, b))
        if key in rtt:
            out.append((a, b, float(r["p95_rtt_ms"]), rtt[key]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--date", default=dt.date.today().isoformat(), help="build date written to SOURCES.md"
    )
    args = parser.parse_args()
    from fedsky.controller.placement.catalog import continent_of

    rtt, asym = build_rtt(args.source)
    locations = sorted({loc for pair in rtt for loc in pair})
    offers, left_out = build_offers(args.source, set(locations))
    offer_locs = sorted({f"{o.cloud}:{o.region}" for o in offers})
    args.out.mkdir(parents=True, exist_ok=True)

    with (args.out / "offers.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(
            [
                "cloud",
                "region",
                "instance_type",
                "vcpus",
                "memory_gib",
                "usd_per_hour",
                "egress_usd_per_gb",
                "note",
            ]
        )
        for o in offers:
            w.writerow(
                [
                    o.cloud,
                    o.region,
                    o.instance_type,
                    o.vcpus,
                    fmt(o.memory_gib),
                    fmt(o.usd_per_hour),
                    fmt(o.egress_usd_per_gb),
                    o.note,
                ]
            )
    with (args.out / "rtt.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["src", "dst", "rtt_ms"])
        for loc in locations:
            w.writerow([loc, loc, fmt(INTRA_REGION_RTT_MS)])
        for (a, b), value in sorted(rtt.items()):
            w.writerow([a, b, f"{value:.2f}"])
    with (args.out / "locations.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["location", "continent"])
        for loc in locations:
            cont = continent_of(loc)
            if cont is None:
                raise SystemExit(f"no continent known for {loc}: add it to catalog.continent_of")
            w.writerow([loc, cont])

    per_cloud = {c: sum(1 for o in offers if o.cloud == c) for c in ("aws", "gcp", "azure")}
    regions = {
        c: sorted({o.region for o in offers if o.cloud == c}) for c in ("aws", "gcp", "azure")
    }
    participant_only = sorted(set(locations) - set(offer_locs))
    checks = azure_p95_check(args.source, rtt)
    (args.out / "SOURCES.md").write_text(
        sources_md(
            args.date,
            offers,
            per_cloud,
            regions,
            left_out,
            locations,
            participant_only,
            len(rtt),
            asym,
            checks,
        )
    )
    print(
        f"{len(offers)} offers in {len(offer_locs)} regions ({per_cloud}); {len(locations)} locations, {len(rtt)} RTT pairs -> {args.out}"
    )
    return 0


def sources_md(
    date: str,
    offers: list[Row],
    per_cloud: dict[str, int],
    regions: dict[str, list[str]],
    left_out: dict[str, set[str]],
    locations: list[str],
    participant_only: list[str],
    n_pairs: int,
    asym: tuple[float, float],
    checks: list[tuple[str, str, float, float]],
) -> str:
    def names(items: Iterable[str]) -> str:
        return ", ".join(f"`{i}`" for i in items) or "none"

    check_rows = "\n".join(f"| {a} | {b} | {p95:g} | {mean:.1f} |" for a, b, p95, mean in checks)
    return f"""# fedsky's shipped placement catalog: sources

Built on {date} by `scripts/build_catalog.py` from the public facts collected in
`../shared/data/cloud/` (beside the repository). Rebuild with `python scripts/build_catalog.py`.
Prices are on-demand Linux USD per hour; egress is internet egress USD per GB (first tier).

## What is in it

- `offers.csv`: {len(offers)} offers: AWS {per_cloud["aws"]}, GCP {per_cloud["gcp"]}, Azure {per_cloud["azure"]}.
  General-purpose sizes from 2 to 16 vCPUs in every region (AWS m5, m6i; GCP e2, n2; Azure
  Dsv5), plus AWS c6i (compute-optimised) and t3 (burstable). The `note` column says which
  rows are source rows and which are derived by linear family pricing.
- `rtt.csv`: {n_pairs} region pairs between {len(locations)} locations plus each location to
  itself (1 ms, a constant: the data has no intra-region figure, and it must not be zero).
- `locations.csv`: each location's continent (for hierarchical placement).

Regions with offers: AWS {names(regions["aws"])}; GCP {names(regions["gcp"])}; Azure
{names(regions["azure"])} (Azure is there for comparison; fedsky launches only where a
provider exists).

Locations with an RTT but no offer (usable as participants' locations only):
{names(participant_only)}.

Regions with a price but no measured RTT are left out rather than given a guessed RTT:
AWS {names(sorted(left_out.get("aws", ())))}; GCP {names(sorted(left_out.get("gcp", ())))};
Azure {names(sorted(left_out.get("azure", ())))}. AWS `sa-east-1` has an RTT but no price in
the source data, so it is a participant location only.

## Sources and collection dates

| data | source | collected |
|---|---|---|
| AWS prices (m5, m6i, c6i, t3) | skypilot-org/skypilot-catalog `catalogs/v7/aws/vms.csv` (Apache-2.0), on-demand Linux | catalog snapshot of 2025 or later, read 2026 |
| GCP prices (e2-standard, n2-standard) | skypilot-org/skypilot-catalog `catalogs/v7/gcp/vms.csv` (commit 017e2502); the US e2 rows are e2-standard-16 / 8 | snapshot of 2025 or later, read 2026 |
| Azure prices (Dsv5, US regions only) | skypilot-org/skypilot-catalog `catalogs/v6/azure/vms.csv` (commit 098741e7) | snapshot of 2025 or later, read 2026 |
| RTT | skyplane-project/skyplane `profiles/latency.csv` @643731c (Apache-2.0): VM-to-VM `avg_rtt`, PREMIUM tier | measured 2022 (commit of 2022-04-16) |
| AWS internet egress | skyplane-project/skyplane `skyplane/data/aws_transfer_costs.csv`, rows `region,internet` | 2023 |
| GCP internet egress | Google Cloud network pricing, premium tier first tier: 0.12 USD/GB in most regions, 0.14 Tokyo (`asia-northeast1`), 0.147 Seoul (`asia-northeast3`) | as quoted in the source notes, 2025-2026 |
| Azure internet egress | Azure bandwidth pricing, first tier: 0.0875 USD/GB North America and Europe, 0.12 Asia | as quoted in the source notes, 2025-2026 |

## How it was built

- Linear family pricing: AWS m5, m6i, c6i and t3 and Azure Dsv5 double in price with each size
  step; GCP e2 and n2 standard are priced per vCPU and GiB. From each source row the other
  sizes are derived by that factor (the `note` column names the factor). Source rows of other
  sizes (AWS m6i.large in the US, m6i.12xlarge, t3.small) are taken as they are.
- GCP zones (`gcp:us-east1-b`) are mapped to their region; the mean over zones is taken.
- Each pair's RTT is the mean of its two directions (the two directions differ by up to
  {asym[0]:.0f} ms for a few pairs, {asym[1]:.1f} ms on average).
- Azure's published P95 RTTs (taken 2026-07-30) are not used: they are P95, not means. A
  cross-check against the pairs both sources name:

| a | b | Azure P95 (ms) | catalog mean (ms) |
|---|---|---|---|
{check_rows}

Spot prices are not in the source data: the catalog has none (a user's catalog may bring them).
"""


if __name__ == "__main__":
    sys.exit(main())
