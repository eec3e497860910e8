"""The placement catalog: the shipped one is complete; bad ones fail naming file, line, column."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from fedsky.controller.placement.catalog import (
    CONTINENTS,
    INTRA_REGION_RTT_MS,
    SHIPPED_DIR,
    CatalogError,
    Offer,
    continent_of,
    load_catalog,
    make_catalog,
)

GENERAL_PURPOSE = ("m5.", "m6i.", "e2-standard-", "n2-standard-", "Standard_D")

OFFERS_HEADER = "cloud,region,instance_type,vcpus,memory_gib,usd_per_hour,egress_usd_per_gb\n"
GOOD_OFFERS = OFFERS_HEADER + (
    "aws,us-east-1,m5.large,2,8,0.096,0.09\n"
    "aws,eu-central-1,m5.large,2,8,0.115,0.09\n"
    "gcp,asia-northeast3,e2-standard-2,2,8,0.08597,0.147\n"
)
GOOD_RTT = (
    "src,dst,rtt_ms\n"
    "aws:us-east-1,aws:eu-central-1,89.8\n"
    "aws:eu-central-1,aws:us-east-1,90.2\n"
    "aws:us-east-1,gcp:asia-northeast3,206.3\n"
    "gcp:asia-northeast3,aws:eu-central-1,258.4\n"
)


def write_catalog(
    directory: Path, offers: str = GOOD_OFFERS, rtt: str = GOOD_RTT, locations: str | None = None
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "offers.csv").write_text(offers)
    (directory / "rtt.csv").write_text(rtt)
    if locations is not None:
        (directory / "locations.csv").write_text(locations)
    return directory


def test_shipped_catalog_covers_every_region_with_2_to_16_vcpu_general_purpose_sizes() -> None:
    cat = load_catalog()
    sizes: dict[str, set[int]] = defaultdict(set)
    for o in cat.offers:
        if o.instance_type.startswith(GENERAL_PURPOSE):
            sizes[o.location].add(o.vcpus)
    regions = {o.location for o in cat.offers}
    assert len(regions) >= 45
    for loc in regions:
        assert {2, 4, 8, 16} <= sizes[loc], loc
    assert set(cat.clouds()) == {"aws", "gcp", "azure"}
    assert all(o.usd_per_hour > 0 and o.egress_usd_per_gb > 0 for o in cat.offers)


def test_shipped_catalog_rtt_is_complete_symmetric_and_never_zero() -> None:
    cat = load_catalog()
    m = cat.rtt_ms
    assert not np.isnan(m).any()
    assert np.array_equal(m, m.T)
    assert (m > 0).all()
    assert np.all(np.diag(m) == INTRA_REGION_RTT_MS)
    # a known pair, the mean of Skyplane's two directions
    assert cat.rtt("aws:us-east-1", "aws:ap-northeast-2") == pytest.approx(194.4, abs=0.1)
    assert cat.rtt("aws:ap-northeast-2", "aws:us-east-1") == cat.rtt(
        "aws:us-east-1", "aws:ap-northeast-2"
    )


def test_shipped_catalog_has_the_baseline_a_continent_per_location_and_its_sources() -> None:
    cat = load_catalog()
    b = cat.find("aws", "us-east-1", "m5.xlarge")
    assert b is not None
    assert (cat.offers[b].vcpus, cat.offers[b].memory_gib, cat.offers[b].usd_per_hour) == (
        4,
        16,
        0.192,
    )
    for loc in cat.locations:
        assert cat.continent(loc) in CONTINENTS, loc
    sources = (SHIPPED_DIR / "SOURCES.md").read_text()
    for needle in ("skypilot-catalog", "skyplane", "2022", "0.147", "0.0875"):
        assert needle in sources
    assert load_catalog() is load_catalog()  # parsed once per process


def test_user_catalog_pair_once_serves_both_ways_both_directions_average_intra_defaults(
    tmp_path: Path,
) -> None:
    cat = load_catalog(write_catalog(tmp_path / "c"))
    assert len(cat) == 3
    assert cat.rtt("aws:eu-central-1", "aws:us-east-1") == pytest.approx(90.0)
    assert cat.rtt("gcp:asia-northeast3", "aws:us-east-1") == pytest.approx(206.3)
    assert cat.rtt("aws:us-east-1", "aws:us-east-1") == INTRA_REGION_RTT_MS
    assert cat.continent("gcp:asia-northeast3") == "asia"


def test_user_catalog_with_comments_extra_columns_and_locations(tmp_path: Path) -> None:
    offers = (
        "# my prices\n"
        + OFFERS_HEADER.strip()
        + ",note\n"
        + "onprem,seoul-1,big-box,16,64,0.5,0,owned\n"
    )
    rtt = "src,dst,rtt_ms,who\nonprem:seoul-1,aws:us-east-1,180,me\n"
    cat = load_catalog(
        write_catalog(tmp_path / "c", offers, rtt, "location,continent\nonprem:seoul-1,asia\n")
    )
    assert cat.offers[0].note == "owned"
    assert cat.continent("onprem:seoul-1") == "asia"


@pytest.mark.parametrize(
    ("offers", "rtt", "expected"),
    [
        (
            "cloud,region,instance_type,vcpus,memory_gib,usd_per_hour\naws,us-east-1,m5.large,2,8,0.096\n",
            GOOD_RTT,
            r"offers\.csv: line 1 \(header\): missing column\(s\) egress_usd_per_gb",
        ),
        (
            GOOD_OFFERS + "aws,us-east-1,m5.xlarge,4,16,-0.192,0.09\n",
            GOOD_RTT,
            r"offers\.csv: line 5, column 'usd_per_hour': a price cannot be negative",
        ),
        (
            GOOD_OFFERS + "aws,us-east-1,m5.xlarge,4,16,0.192,-0.09\n",
            GOOD_RTT,
            r"offers\.csv: line 5, column 'egress_usd_per_gb': a price cannot be negative",
        ),
        (
            GOOD_OFFERS + "aws,mars-north-1,m5.xlarge,4,16,0.192,0.09\n",
            GOOD_RTT,
            r"offers\.csv: line 5, column 'region': unknown location 'aws:mars-north-1'",
        ),
        (
            GOOD_OFFERS + "aws,us-east-1,m5.xlarge,four,16,0.192,0.09\n",
            GOOD_RTT,
            r"offers\.csv: line 5, column 'vcpus': 'four' is not a number",
        ),
        (
            GOOD_OFFERS + "aws,us-east-1,m5.large,2,8,0.096,0.09\n",
            GOOD_RTT,
            r"offers\.csv: line 5: offer aws/us-east-1/m5.large already given at line 2",
        ),
        (
            GOOD_OFFERS + "aws,us-east-1,m5.xlarge,4\n",
            GOOD_RTT,
            r"offers\.csv: line 5: 4 fields where the header has 7",
        ),
        (OFFERS_HEADER, GOOD_RTT, r"offers\.csv: no offers"),
        (
            GOOD_OFFERS,
            "src,dst\naws:us-east-1,aws:eu-central-1\n",
            r"rtt\.csv: line 1 \(header\): missing column\(s\) rtt_ms",
        ),
        (
            GOOD_OFFERS,
            GOOD_RTT + "aws:us-east-1,aws:us-west-2,0\n",
            r"rtt\.csv: line 6, column 'rtt_ms': an RTT must be > 0 ms",
        ),
        (
            GOOD_OFFERS,
            GOOD_RTT + "us-east-1,aws:us-west-2,60\n",
            r"rtt\.csv: line 6, column 'src': 'us-east-1' is not a 'cloud:region'",
        ),
        (
            GOOD_OFFERS,
            GOOD_RTT + "aws:us-east-1,aws:eu-central-1,88\n",
            r"rtt\.csv: line 6: pair aws:us-east-1 -> aws:eu-central-1 already given at line 2",
        ),
        (GOOD_OFFERS, "", r"rtt\.csv: the file is empty"),
    ],
)
def test_bad_catalogs_fail_naming_file_line_and_column(
    tmp_path: Path, offers: str, rtt: str, expected: str
) -> None:
    with pytest.raises(CatalogError, match=expected):
        load_catalog(write_catalog(tmp_path / "bad", offers, rtt))


def test_bad_locations_file_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(
        CatalogError, match=r"locations\.csv: line 2, column 'continent': 'atlantis'"
    ):
        load_catalog(
            write_catalog(tmp_path / "a", locations="location,continent\naws:us-east-1,atlantis\n")
        )
    with pytest.raises(
        CatalogError,
        match=r"locations\.csv: line 2, column 'location': unknown location 'aws:xx-1'",
    ):
        load_catalog(
            write_catalog(tmp_path / "b", locations="location,continent\naws:xx-1,europe\n")
        )
    (tmp_path / "c").mkdir()
    with pytest.raises(CatalogError, match=r"has no offers\.csv"):
        load_catalog(tmp_path / "c")
    with pytest.raises(CatalogError, match=r"does not exist"):
        load_catalog(tmp_path / "nowhere")


def test_make_catalog_validates_in_memory_data() -> None:
    offer = Offer("aws", "us-east-1", "m5.large", 2, 8, 0.096, 0.09)
    with pytest.raises(CatalogError, match="no RTT"):
        make_catalog([offer], {("aws:eu-central-1", "aws:us-west-2"): 140.0})
    with pytest.raises(CatalogError, match="appears twice"):
        make_catalog([offer, offer], {("aws:us-east-1", "aws:us-west-2"): 60.0})
    with pytest.raises(CatalogError, match="must be a number > 0"):
        make_catalog([offer], {("aws:us-east-1", "aws:us-west-2"): float("nan")})
    sub = make_catalog([offer], {("aws:us-east-1", "aws:us-west-2"): 60.0}).subset(lambda o: True)
    assert sub.find("aws", "us-east-1", "m5.large") == 0


@pytest.mark.parametrize(
    ("location", "continent"),
    [
        ("aws:ap-southeast-2", "oceania"),
        ("aws:ap-southeast-1", "asia"),
        ("gcp:northamerica-northeast1", "north-america"),
        ("azure:koreacentral", "asia"),
        ("azure:westeurope", "europe"),
        ("aws:me-south-1", "middle-east"),
        ("onprem:somewhere", None),
    ],
)
def test_continent_of(location: str, continent: str | None) -> None:
    assert continent_of(location) == continent
