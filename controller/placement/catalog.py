"""The placement catalog: offers (cloud, region, instance type, size, prices) and RTTs.

A catalog is a directory with:

- `offers.csv`: `cloud,region,instance_type,vcpus,memory_gib,usd_per_hour,egress_usd_per_gb`
  (on-demand USD per hour; internet egress USD per GB). An optional `note` column is kept.
- `rtt.csv`: `src,dst,rtt_ms` between `cloud:region` locations. A pair given once serves both
  ways; a pair given in both directions takes the mean of the two. A location's RTT to itself
  defaults to `INTRA_REGION_RTT_MS` when absent (never zero: two VMs in one region still talk
  over a network).
- `locations.csv` (optional): `location,continent`, for hierarchical placement; locations it
  does not name get their continent from their region name (`continent_of`).

Extra columns are ignored; lines whose first field starts with `#` are comments. Every error
names the file, the line and the column. The shipped catalog lives in `data/` beside this file
(see `data/SOURCES.md`).
"""

from __future__ import annotations

import csv
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

OFFER_COLUMNS = (
    "cloud",
    "region",
    "instance_type",
    "vcpus",
    "memory_gib",
    "usd_per_hour",
    "egress_usd_per_gb",
)
RTT_COLUMNS = ("src", "dst", "rtt_ms")
LOCATION_COLUMNS = ("location", "continent")
INTRA_REGION_RTT_MS = 1.0
CONTINENTS = (
    "north-america",
    "south-america",
    "europe",
    "asia",
    "oceania",
    "middle-east",
    "africa",
)
SHIPPED_DIR = Path(__file__).resolve().parent / "data"

_CLOUD_RE = re.compile(r"^[a-z0-9-]{1,32}$")
_REGION_RE = re.compile(r"^[a-z0-9-]{1,63}$")
_LOCATION_RE = re.compile(r"^[a-z0-9-]{1,32}:[a-z0-9-]{1,63}$")
_INSTANCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class CatalogError(ValueError):
    """A catalog that is missing, unreadable or invalid; the message names file, line, column."""


@dataclass(frozen=True)
class Offer:
    """One instance type in one region, on demand."""

    cloud: str
    region: str
    instance_type: str
    vcpus: int
    memory_gib: float
    usd_per_hour: float
    egress_usd_per_gb: float
    note: str = ""

    @property
    def location(self) -> str:
        return f"{self.cloud}:{self.region}"

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.cloud, self.region, self.instance_type)


@dataclass(frozen=True, eq=False)
class Catalog:
    """Offers plus a symmetric RTT matrix over every location the catalog knows.

    Build one with `load_catalog` (CSV files) or `make_catalog` (in memory). The numpy arrays
    are read-only views of the offers for vectorised evaluation.
    """

    offers: tuple[Offer, ...]
    locations: tuple[str, ...]
    rtt_ms: FloatArray  # (L, L), NaN where unknown
    continents: Mapping[str, str]
    source: str
    location_index: Mapping[str, int] = field(repr=False)
    offer_location: IntArray = field(repr=False)  # (O,) index into locations
    vcpus: FloatArray = field(repr=False)
    memory_gib: FloatArray = field(repr=False)
    usd_per_hour: FloatArray = field(repr=False)
    egress_usd_per_gb: FloatArray = field(repr=False)
    _by_key: Mapping[tuple[str, str, str], int] = field(repr=False)

    def __len__(self) -> int:
        return len(self.offers)

    def rtt(self, a: str, b: str) -> float | None:
        """RTT in ms between two locations, or None when the catalog does not know it."""
        i, j = self.location_index.get(a), self.location_index.get(b)
        if i is None or j is None:
            return None
        value = float(self.rtt_ms[i, j])
        return None if math.isnan(value) else value

    def find(self, cloud: str, region: str, instance_type: str) -> int | None:
        """Index of an offer, or None."""
        return self._by_key.get((cloud, region, instance_type))

    def continent(self, location: str) -> str | None:
        return self.continents.get(location) or continent_of(location)

    def clouds(self) -> tuple[str, ...]:
        return tuple(sorted({o.cloud for o in self.offers}))

    def subset(self, keep: Callable[[Offer], bool], *, source: str | None = None) -> Catalog:
        """The same locations and RTTs with only the offers `keep` accepts."""
        offers = [o for o in self.offers if keep(o)]
        return _assemble(
            offers,
            self.locations,
            self.location_index,
            self.rtt_ms,
            self.continents,
            source or f"{self.source} (subset)",
        )


# --- continents ---------------------------------------------------------------------------------

# Azure names its regions without a continent prefix: the regions fedsky's data covers.
_AZURE_CONTINENTS = {
    "australiaeast": "oceania",
    "australiasoutheast": "oceania",
    "brazilsouth": "south-america",
    "canadacentral": "north-america",
    "canadaeast": "north-america",
    "centralindia": "asia",
    "centralus": "north-america",
    "eastasia": "asia",
    "eastus": "north-america",
    "eastus2": "north-america",
    "francecentral": "europe",
    "germanywestcentral": "europe",
    "japaneast": "asia",
    "japanwest": "asia",
    "koreacentral": "asia",
    "koreasouth": "asia",
    "northcentralus": "north-america",
    "northeurope": "europe",
    "norwayeast": "europe",
    "qatarcentral": "middle-east",
    "southafricanorth": "africa",
    "southcentralus": "north-america",
    "southeastasia": "asia",
    "southindia": "asia",
    "swedencentral": "europe",
    "switzerlandnorth": "europe",
    "uaenorth": "middle-east",
    "uksouth": "europe",
    "ukwest": "europe",
    "westcentralus": "north-america",
    "westeurope": "europe",
    "westus": "north-america",
    "westus2": "north-america",
    "westus3": "north-america",
}
# Region-name prefixes used by AWS and GCP; longest match wins. Sydney and Melbourne are
# named like Asian regions on AWS, hence the explicit entries.
_PREFIX_CONTINENTS = {
    "aws": {
        "us-": "north-america",
        "ca-": "north-america",
        "mx-": "north-america",
        "sa-": "south-america",
        "eu-": "europe",
        "il-": "middle-east",
        "me-": "middle-east",
        "af-": "africa",
        "ap-southeast-2": "oceania",
        "ap-southeast-4": "oceania",
        "ap-": "asia",
    },
    "gcp": {
        "us-": "north-america",
        "northamerica-": "north-america",
        "southamerica-": "south-america",
        "europe-": "europe",
        "asia-": "asia",
        "australia-": "oceania",
        "me-": "middle-east",
        "africa-": "africa",
    },
}


def continent_of(location: str) -> str | None:
    """The continent of a `cloud:region` by its name, or None when the name does not tell."""
    cloud, _, region = location.partition(":")
    if cloud == "azure":
        return _AZURE_CONTINENTS.get(region)
    prefixes = _PREFIX_CONTINENTS.get(cloud, {})
    for prefix in sorted(prefixes, key=len, reverse=True):
        if region.startswith(prefix):
            return prefixes[prefix]
    return None


# --- building -----------------------------------------------------------------------------------


def make_catalog(
    offers: Sequence[Offer],
    rtt: Mapping[tuple[str, str], float],
    *,
    continents: Mapping[str, str] | None = None,
    source: str = "(in memory)",
) -> Catalog:
    """A catalog from plain data; `rtt` is keyed by (src, dst), one direction is enough.

    Raises CatalogError for an empty catalog, duplicate offers, values out of range, and offer
    locations that have no RTT at all.
    """
    if not offers:
        raise CatalogError(f"{source}: the catalog has no offers")
    pairs: dict[tuple[str, str], list[float]] = {}
    for (a, b), value in rtt.items():
        for loc in (a, b):
            if not _LOCATION_RE.fullmatch(loc):
                raise CatalogError(f"{source}: RTT location {loc!r} is not 'cloud:region'")
        if not (math.isfinite(value) and value > 0):
            raise CatalogError(f"{source}: RTT {a} -> {b} must be a number > 0 ms, got {value!r}")
        key = (a, b) if a <= b else (b, a)
        pairs.setdefault(key, []).append(float(value))
    names = sorted({loc for pair in pairs for loc in pair})
    index = {loc: i for i, loc in enumerate(names)}
    matrix = np.full((len(names), len(names)), np.nan)
    for (a, b), values in pairs.items():
        matrix[index[a], index[b]] = matrix[index[b], index[a]] = sum(values) / len(values)
    diag = np.diag_indices(len(names))
    matrix[diag] = np.where(np.isnan(matrix[diag]), INTRA_REGION_RTT_MS, matrix[diag])
    matrix.setflags(write=False)

    conts = dict(continents or {})
    for loc, cont in conts.items():
        if cont not in CONTINENTS:
            raise CatalogError(
                f"{source}: location {loc!r}: continent {cont!r} is not one of {', '.join(CONTINENTS)}"
            )
    return _assemble(offers, tuple(names), index, matrix, conts, source)


def _assemble(
    offers: Sequence[Offer],
    names: tuple[str, ...],
    index: Mapping[str, int],
    matrix: FloatArray,
    continents: Mapping[str, str],
    source: str,
) -> Catalog:
    if not offers:
        raise CatalogError(f"{source}: the catalog has no offers")
    by_key: dict[tuple[str, str, str], int] = {}
    for i, offer in enumerate(offers):
        problem = _offer_problem(offer)
        if problem:
            raise CatalogError(f"{source}: offer {offer.key}: {problem}")
        if offer.key in by_key:
            raise CatalogError(f"{source}: offer {offer.key} appears twice")
        if offer.location not in index:
            raise CatalogError(
                f"{source}: offer {offer.key}: location {offer.location!r} has no RTT in the catalog"
            )
        by_key[offer.key] = i

    def arr(values: Iterator[float]) -> FloatArray:
        out = np.fromiter(values, dtype=np.float64, count=len(offers))
        out.setflags(write=False)
        return out

    loc_idx = np.fromiter((index[o.location] for o in offers), dtype=np.int64, count=len(offers))
    loc_idx.setflags(write=False)
    return Catalog(
        offers=tuple(offers),
        locations=names,
        rtt_ms=matrix,
        continents=continents,
        source=source,
        location_index=index,
        offer_location=loc_idx,
        vcpus=arr(float(o.vcpus) for o in offers),
        memory_gib=arr(o.memory_gib for o in offers),
        usd_per_hour=arr(o.usd_per_hour for o in offers),
        egress_usd_per_gb=arr(o.egress_usd_per_gb for o in offers),
        _by_key=by_key,
    )


def _offer_problem(offer: Offer) -> str | None:
    """Why an offer is invalid (a column name and the reason), or None."""
    if not _CLOUD_RE.fullmatch(offer.cloud):
        return f"column 'cloud': {offer.cloud!r} must be 1-32 characters from a-z, 0-9 and '-'"
    if not _REGION_RE.fullmatch(offer.region):
        return f"column 'region': {offer.region!r} must be 1-63 characters from a-z, 0-9 and '-'"
    if not _INSTANCE_RE.fullmatch(offer.instance_type):
        return f"column 'instance_type': {offer.instance_type!r} is not an instance type name"
    if offer.vcpus < 1:
        return f"column 'vcpus': must be at least 1, got {offer.vcpus}"
    if not (math.isfinite(offer.memory_gib) and offer.memory_gib > 0):
        return f"column 'memory_gib': must be > 0, got {offer.memory_gib}"
    for name in ("usd_per_hour", "egress_usd_per_gb"):
        value = getattr(offer, name)
        if not math.isfinite(value):
            return f"column {name!r}: must be a finite number, got {value}"
        if value < 0:
            return f"column {name!r}: a price cannot be negative, got {value}"
    return None


# --- CSV loading --------------------------------------------------------------------------------


def load_catalog(path: Path | str | None = None) -> Catalog:
    """Load a catalog directory (None: the shipped catalog). Raises CatalogError."""
    if path is None:
        return _shipped()
    return _load(Path(path))


@functools.cache
def _shipped() -> Catalog:
    # The shipped files never change at run time: parse them once per process.
    return _load(SHIPPED_DIR, source="shipped catalog")


def _load(directory: Path, source: str | None = None) -> Catalog:
    if not directory.is_dir():
        raise CatalogError(f"catalog directory {directory} does not exist or is not a directory")
    offers_file, rtt_file = directory / "offers.csv", directory / "rtt.csv"
    for f in (offers_file, rtt_file):
        if not f.is_file():
            raise CatalogError(f"catalog directory {directory} has no {f.name}")
    rtt = _read_rtt(rtt_file)
    known = {loc for pair in rtt for loc in pair}
    offers = _read_offers(offers_file, known)
    loc_file = directory / "locations.csv"
    continents = _read_locations(loc_file, known) if loc_file.is_file() else {}
    return make_catalog(offers, rtt, continents=continents, source=source or str(directory))


def _rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, row) for each data row; checks the header names every required column."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read: {exc}") from None
    reader = csv.reader(text.splitlines())
    header: list[str] | None = None
    for fields in reader:
        line = reader.line_num
        if not fields or not "".join(fields).strip() or fields[0].lstrip().startswith("#"):
            continue
        if header is None:
            header = [f.strip() for f in fields]
            missing = [c for c in required if c not in header]
            if missing:
                raise CatalogError(
                    f"{path}: line {line} (header): missing column(s) {', '.join(missing)}; "
                    f"the header must name {','.join(required)}"
                )
            continue
        if len(fields) != len(header):
            raise CatalogError(
                f"{path}: line {line}: {len(fields)} fields where the header has {len(header)}"
            )
        yield line, {name: value.strip() for name, value in zip(header, fields, strict=True)}
    if header is None:
        raise CatalogError(f"{path}: the file is empty; the header must name {','.join(required)}")


def _number(path: Path, line: int, column: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CatalogError(
            f"{path}: line {line}, column {column!r}: {text!r} is not a number"
        ) from None
    if not math.isfinite(value):
        raise CatalogError(f"{path}: line {line}, column {column!r}: {text!r} is not finite")
    return value


def _read_offers(path: Path, known: set[str]) -> list[Offer]:
    offers: list[Offer] = []
    seen: dict[tuple[str, str, str], int] = {}
    for line, row in _rows(path, OFFER_COLUMNS):
        vcpus = _number(path, line, "vcpus", row["vcpus"])
        if vcpus != int(vcpus):
            raise CatalogError(
                f"{path}: line {line}, column 'vcpus': {row['vcpus']!r} is not a whole number"
            )
        offer = Offer(
            cloud=row["cloud"],
            region=row["region"],
            instance_type=row["instance_type"],
            vcpus=int(vcpus),
            memory_gib=_number(path, line, "memory_gib", row["memory_gib"]),
            usd_per_hour=_number(path, line, "usd_per_hour", row["usd_per_hour"]),
            egress_usd_per_gb=_number(path, line, "egress_usd_per_gb", row["egress_usd_per_gb"]),
            note=row.get("note", ""),
        )
        problem = _offer_problem(offer)
        if problem:
            raise CatalogError(f"{path}: line {line}, {problem}")
        if offer.location not in known:
            raise CatalogError(
                f"{path}: line {line}, column 'region': unknown location {offer.location!r}: "
                f"{path.with_name('rtt.csv')} has no RTT for it"
            )
        if offer.key in seen:
            raise CatalogError(
                f"{path}: line {line}: offer {'/'.join(offer.key)} already given at line {seen[offer.key]}"
            )
        seen[offer.key] = line
        offers.append(offer)
    if not offers:
        raise CatalogError(f"{path}: no offers (only a header)")
    return offers


def _read_rtt(path: Path) -> dict[tuple[str, str], float]:
    rtt: dict[tuple[str, str], float] = {}
    lines: dict[tuple[str, str], int] = {}
    for line, row in _rows(path, RTT_COLUMNS):
        for column in ("src", "dst"):
            if not _LOCATION_RE.fullmatch(row[column]):
                raise CatalogError(
                    f"{path}: line {line}, column {column!r}: {row[column]!r} is not a "
                    "'cloud:region' location (e.g. aws:us-east-1)"
                )
        value = _number(path, line, "rtt_ms", row["rtt_ms"])
        if value <= 0:
            raise CatalogError(
                f"{path}: line {line}, column 'rtt_ms': an RTT must be > 0 ms, got {row['rtt_ms']!r}"
            )
        key = (row["src"], row["dst"])
        if key in lines:
            raise CatalogError(
                f"{path}: line {line}: pair {key[0]} -> {key[1]} already given at line {lines[key]}"
            )
        lines[key] = line
        rtt[key] = value
    if not rtt:
        raise CatalogError(f"{path}: no RTT rows (only a header)")
    return rtt


def _read_locations(path: Path, known: set[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for line, row in _rows(path, LOCATION_COLUMNS):
        loc, cont = row["location"], row["continent"]
        if loc not in known:
            raise CatalogError(
                f"{path}: line {line}, column 'location': unknown location {loc!r}: "
                f"{path.with_name('rtt.csv')} has no RTT for it"
            )
        if cont not in CONTINENTS:
            raise CatalogError(
                f"{path}: line {line}, column 'continent': {cont!r} is not one of {', '.join(CONTINENTS)}"
            )
        out[loc] = cont
    return out
