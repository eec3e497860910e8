"""Job specs: TOML and YAML, and errors that name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from fedsky.shared.config import ConfigError
from fedsky.shared.jobspec import MaxCost, load_job_spec, parse_job_spec_text

GOOD = """
name = "digits-demo"
participants = ["hospital-us", "hospital-asia", "hospital-eu"]
model = "model.safetensors"
dataset = "digits"
selection_metric = "f1"

[dataset_overrides]
hospital-eu = "digits-eu"

[hyperparameters]
rounds = 3
local_epochs = 2
batch_size = 16
learning_rate = 0.05
optimizer = "adam"
min_participants = 2

[resources]
vcpus = 2
memory_gib = 4
disk_gib = 20

[placement]
max_cost = "85,000 KRW/month"
max_latency_ms = 250
cost_weight = 0.9
"""


def _write(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    (tmp_path / "model.safetensors").write_bytes(b"x")
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_spec(tmp_path: Path) -> None:
    spec = load_job_spec(_write(tmp_path, GOOD))
    assert spec.model == (tmp_path / "model.safetensors").resolve()
    assert spec.participants == ["hospital-us", "hospital-asia", "hospital-eu"]
    assert spec.dataset_for("hospital-eu") == "digits-eu"
    assert spec.dataset_for("hospital-us") == "digits"
    assert spec.hyperparameters.optimizer == "adam"
    assert spec.min_participants == 2
    assert spec.placement.max_cost == MaxCost(amount=85000, currency="KRW", per="month")
    assert str(spec.placement.max_cost) == "85000 KRW/month"
    assert spec.selection_metric == "f1"
    assert spec.model_dump(mode="json")["placement"]["max_cost"] == "85000 KRW/month"


def test_defaults(tmp_path: Path) -> None:
    spec = load_job_spec(
        _write(
            tmp_path,
            """
name = "small"
participants = ["a"]
model = "model.safetensors"
dataset = "breast_cancer"
[hyperparameters]
rounds = 1
""",
        )
    )
    assert spec.min_participants == 1
    assert spec.placement.max_cost is None
    assert spec.placement.cost_weight == 0.5
    assert spec.selection_metric == "accuracy"
    assert spec.hyperparameters.optimizer == "sgd"


def test_yaml(tmp_path: Path) -> None:
    text = """
name: yaml-job
participants: [hospital-a, hospital-b]
model: model.safetensors
dataset: digits
hyperparameters: {rounds: 2, learning_rate: 0.1}
placement: {max_cost: "12.5 USD/job"}
"""
    spec = load_job_spec(_write(tmp_path, text, "job.yaml"))
    assert spec.placement.max_cost == MaxCost(amount=12.5, currency="USD", per="job")
    assert spec.hyperparameters.rounds == 2


@pytest.mark.parametrize(
    ("change", "key", "what"),
    [
        (
            ('optimizer = "adam"', 'optimizer = "rmsprop"'),
            "hyperparameters.optimizer",
            "'sgd' or 'adam'",
        ),
        (("rounds = 3", "rounds = 0"), "hyperparameters.rounds", "greater than or equal to 1"),
        (('"hospital-eu"]', '"controller"]'), "participants", "reserved for the controller"),
        (('"hospital-eu"]', '"hospital-us"]'), "participants", "listed twice"),
        (('"hospital-eu"]', '"Hospital_EU"]'), "participants", "invalid"),
        (
            ('max_cost = "85,000 KRW/month"', 'max_cost = "85000 EUR/month"'),
            "placement.max_cost",
            "USD or KRW",
        ),
        (
            ("cost_weight = 0.9", "cost_weight = 1.5"),
            "placement.cost_weight",
            "less than or equal to 1",
        ),
        (('selection_metric = "f1"', 'selection_metric = "auc"'), "selection_metric", "'accuracy'"),
        (('dataset = "digits"', 'dataset = "../etc"'), "dataset", "should match pattern"),
        (("vcpus = 2", "vcpus = 2\ngpus = 1"), "resources.gpus", "unknown key"),
        (("min_participants = 2", "min_participants = 4"), "(top level)", "only 3 participant"),
        (
            ('hospital-eu = "digits-eu"', 'hospital-x = "digits-eu"'),
            "(top level)",
            "not among the participants",
        ),
    ],
)
def test_errors_name_file_and_key(
    tmp_path: Path, change: tuple[str, str], key: str, what: str
) -> None:
    assert change[0] in GOOD
    path = _write(tmp_path, GOOD.replace(change[0], change[1]))
    with pytest.raises(ConfigError) as err:
        load_job_spec(path)
    text = str(err.value)
    assert str(path) in text
    assert f"key '{key}'" in text
    assert what in text


def test_missing_model_and_unreadable_files(tmp_path: Path) -> None:
    path = _write(
        tmp_path, GOOD.replace('model = "model.safetensors"', 'model = "nope.safetensors"')
    )
    with pytest.raises(ConfigError, match=r"key 'model': model file not found"):
        load_job_spec(path)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_job_spec(_write(tmp_path, "name = ", "bad.toml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_spec(_write(tmp_path, "a: [b", "bad.yaml"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_job_spec(tmp_path / "absent.toml")
    with pytest.raises(ConfigError, match="table of keys"):
        parse_job_spec_text("- a\n- b\n", path=tmp_path / "list.yaml")


def test_the_search_method_and_the_studys_minimums(tmp_path: Path) -> None:
    spec = load_job_spec(_write(tmp_path, GOOD))
    assert spec.placement.method == "exact"
    minimal = "\n".join(
        line for line in GOOD.splitlines() if not line.startswith(("vcpus", "memory_gib"))
    )
    spec = load_job_spec(_write(tmp_path, minimal, "min.toml"))
    assert (spec.resources.vcpus, spec.resources.memory_gib) == (2, 4.0)
    nsga = GOOD.replace("[placement]", '[placement]\nmethod = "nsga2"')
    assert load_job_spec(_write(tmp_path, nsga, "nsga.toml")).placement.method == "nsga2"
    bad = GOOD.replace("[placement]", '[placement]\nmethod = "random"')
    with pytest.raises(ConfigError, match=r"placement\.method"):
        load_job_spec(_write(tmp_path, bad, "bad-method.toml"))


def test_a_pinned_offer_and_measured_phase_times(tmp_path: Path) -> None:
    from fedsky.controller.jobs.stages.place import job_profile, pinned_offer

    pinned = GOOD.replace(
        "[placement]", '[placement]\noffer = "aws:us-east-1:m5.xlarge"\ntrain_s = 12.5\neval_s = 3'
    )
    spec = load_job_spec(_write(tmp_path, pinned, "pinned.toml"))
    assert pinned_offer(spec.placement) == ("aws", "us-east-1", "m5.xlarge")
    profile = job_profile(spec.placement, model_mb=26.0, rounds=3)
    assert (profile.train_s, profile.evaluation_s, profile.rounds) == (12.5, 3.0, 3)
    plain = load_job_spec(_write(tmp_path, GOOD, "plain.toml"))
    assert pinned_offer(plain.placement) is None
    assert job_profile(plain.placement, model_mb=26.0, rounds=3).train_s == 60.0  # the default
    for line, key in (
        ('offer = "us-east-1 m5.xlarge"', "placement.offer"),
        ('offer = "aws:us-east-1"', "placement.offer"),
        ("train_s = -1", "placement.train_s"),
    ):
        bad = GOOD.replace("[placement]", f"[placement]\n{line}")
        with pytest.raises(ConfigError, match=rf"key '{key}'"):
            load_job_spec(_write(tmp_path, bad, "bad-pin.toml"))
