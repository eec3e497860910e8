"""`fedctl place` and the case study command, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fedsky.controller.cli.main import main
from fedsky.controller.placement import casestudy
from fedsky.shared import exitcodes

CASE = [
    "place",
    "--participant",
    "us=aws:us-east-1",
    "--participant",
    "asia=aws:ap-northeast-2",
    "--participant",
    "europe=aws:eu-central-1",
    "--model-mb",
    "26",
    "--rounds",
    "20",
    "--max-latency-ms",
    "250",
]
POINT_FIELDS = {
    "cloud",
    "region",
    "instance_type",
    "vcpus",
    "memory_gib",
    "cost",
    "currency",
    "round_time_s",
    "max_rtt_ms",
    "feasible",
}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    try:
        code = main([*CASE, *args])
    except SystemExit as exc:  # argparse refusing an option's value
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_table_for_people_marks_choice_and_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--max-cost", "85000 KRW/month", "--cost-weight", "0.9")
    assert code == exitcodes.OK
    lines = out.splitlines()
    chosen = [ln for ln in lines if ln.startswith("*  ")]
    assert len(chosen) == 1
    assert "t3.small" in chosen[0]
    assert any(
        ln.startswith("B ") and "m5.xlarge" in ln and "exceeds max_cost" in ln for ln in lines
    )
    assert "vs the baseline: cost -" in out
    assert "KRW/month" in out


def test_json_shape_when_feasible(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--max-cost", "85000 KRW/month", "--cost-weight", "0.1", "--json")
    assert code == exitcodes.OK
    body = json.loads(out)
    assert {"front", "choice", "baseline"} <= set(body)
    assert "candidates" not in body
    assert "reason" not in body
    assert body["front"]
    assert all(set(p) >= POINT_FIELDS and p["feasible"] for p in body["front"])
    assert set(body["choice"]) >= POINT_FIELDS
    assert body["choice"]["currency"] == "KRW"
    assert body["choice"]["cost_change_pct"] < 0
    assert body["baseline"]["instance_type"] == "m5.xlarge"
    assert body["baseline"]["feasible"] is False
    assert body["limits"] == {
        "max_cost": 85000.0,
        "currency": "KRW",
        "basis": "month",
        "max_latency_ms": 250.0,
        "cost_weight": 0.1,
    }


def test_all_lists_every_candidate(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--max-cost", "40 USD/job", "--json", "--all", "--clouds", "aws,gcp")
    assert code == exitcodes.OK
    body = json.loads(out)
    assert len(body["candidates"]) == 540
    assert {p["cloud"] for p in body["candidates"]} == {"aws", "gcp"}
    assert any(not p["feasible"] for p in body["candidates"])
    assert body["basis"] == "job"
    code, out, _ = run(capsys, "--max-cost", "40 USD/job", "--all")
    assert "every offer evaluated:" in out
    assert "exceeds max_latency" in out


def test_infeasible_exits_3_with_reason_and_json_shape(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "--max-cost", "5000 KRW/month", "--json")
    assert code == exitcodes.INFEASIBLE == 3
    body = json.loads(out)
    assert body["front"] == []
    assert "choice" not in body
    assert body["reason"].startswith("max cost 5,000 KRW/month binds")
    assert body["binding"] == ["max_cost"]
    assert len(body["closest"]) == 3
    assert all(set(p) >= POINT_FIELDS for p in body["closest"])
    code, out, err = run(capsys, "--max-cost", "5000 KRW/month")
    assert code == 3
    assert "no feasible placement: max cost 5,000 KRW/month binds" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-cost", "85000 EUR/month"], "currency 'EUR' is not supported"),
        (
            ["--max-cost", "85000 KRW/month", "--cost-weight", "9"],
            "'9' is not a number between 0 and 1",
        ),
        (["--max-cost", "85000 KRW/month", "--participant", "bad"], "expected NAME=cloud:region"),
        (
            ["--max-cost", "85000 KRW/month", "--participant", "us=aws:us-west-2"],
            "'us' is given twice",
        ),
        (
            ["--max-cost", "85000 KRW/month", "--participant", "x=aws:nowhere-9"],
            "unknown location 'aws:nowhere-9'",
        ),
        (
            ["--max-cost", "85000 KRW/month", "--krw-per-usd", "-3"],
            "'-3' is not a number between 0.0001 and 1,000,000,000",
        ),
        (
            ["--max-cost", "85000 KRW/month", "--method", "nsga2", "--seed", "-1"],
            "'-1' is not a whole number between 0 and 4,294,967,295",
        ),
        (["--max-cost", "85000 KRW/month", "--model-mb", "nan"], "'nan' is not a number"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(
    capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, _, err = run(capsys, *args)
    assert code == exitcodes.USAGE
    assert message in err


def test_bad_catalog_exits_78(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "offers.csv").write_text("cloud,region\naws,us-east-1\n")
    (tmp_path / "rtt.csv").write_text("src,dst,rtt_ms\naws:us-east-1,aws:us-west-2,60\n")
    code, _, err = run(capsys, "--max-cost", "85000 KRW/month", "--catalog", str(tmp_path))
    assert code == exitcodes.CONFIG
    assert "offers.csv: line 1 (header): missing column(s) instance_type" in err


def test_plot_writes_a_picture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "front.png"
    code, _, _ = run(capsys, "--max-cost", "85000 KRW/month", "--plot", str(target))
    assert code == 0
    assert target.read_bytes().startswith(b"\x89PNG")
    code, _, err = run(
        capsys, "--max-cost", "85000 KRW/month", "--plot", str(tmp_path / "no" / "dir.png")
    )
    assert code == exitcodes.FAILED
    assert "cannot write the plot" in err


def test_nsga2_and_hierarchical_from_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--max-cost", "85000 KRW/month", "--method", "nsga2", "--json")
    assert code == 0
    assert json.loads(out)["method"] == "nsga2"
    code, out, _ = run(capsys, "--max-cost", "300000 KRW/month", "--hierarchical", "--json")
    body = json.loads(out)
    assert code == 0
    assert set(body["choice"]["regional"]) == {"asia", "europe", "north-america"}


def test_fedctl_entry_point_exit_code_3() -> None:
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("fedctl")),
            *CASE,
            "--max-cost",
            "1 USD/month",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert json.loads(proc.stdout)["front"] == []


def test_case_study_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert casestudy.main([]) == 0
    out = capsys.readouterr().out
    for needle in ("0.9 (9:1)", "0.5 (5:5)", "0.1 (1:9)", "-41%", "-19%", "-7%", "m5.xlarge"):
        assert needle in out
    assert casestudy.main(["--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    rows = body["all_offers"]
    assert [r["weight"] for r in rows] == [0.9, 0.5, 0.1]
    costs = [r["choice"]["cost"] for r in rows]
    assert costs == sorted(costs)  # cost first is cheapest
    assert all(r["cost_change_pct"] < 0 for r in rows)


def test_the_controller_configs_rate_and_baseline_are_used(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    args = ["--max-cost", "85000 KRW/month", "--cost-weight", "0.1", "--json"]
    code, out, _ = run(capsys, *args)
    assert code == exitcodes.OK
    default = json.loads(out)
    config = tmp_path / "controller.toml"
    config.write_text(
        f'state_dir = "{tmp_path}"\n'
        "[placement]\n"
        "krw_per_usd = 2900\n"
        'baseline = "aws:eu-central-1:m5.xlarge"\n'
    )
    code = main(["--config", str(config), *CASE, "--max-cost", "170000 KRW/month", "--json"])
    body = json.loads(capsys.readouterr().out)
    assert code == exitcodes.OK
    assert body["baseline"]["region"] == "eu-central-1"
    # The same offer costs twice as many won at twice the rate.
    same = next(
        p
        for p in body["front"]
        if (p["region"], p["instance_type"])
        == (default["choice"]["region"], default["choice"]["instance_type"])
    )
    assert same["cost"] == pytest.approx(2 * default["choice"]["cost"], rel=1e-6)
    # A flag still wins over the config.
    code = main(["--config", str(config), *CASE, *args, "--krw-per-usd", "1450"])
    assert json.loads(capsys.readouterr().out)["choice"]["cost"] == pytest.approx(
        default["choice"]["cost"]
    )


def test_a_bad_baseline_in_the_config_names_the_key(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "controller.toml"
    config.write_text('[placement]\nbaseline = "m5.xlarge"\n')
    code = main(["--config", str(config), *CASE, "--max-cost", "85000 KRW/month"])
    assert code == exitcodes.CONFIG
    assert "placement.baseline" in capsys.readouterr().err
