"""The Flower app's parts without Flower processes: optimisers, FedAvg, the run config."""

from __future__ import annotations

import time
import tomllib
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from fedsky.shared.flower.runconfig import RunSettings, settings_for_job
from fedsky.shared.flower.server_app import _Reply, _site_of, fedavg, pull_replies_promptly
from fedsky.shared.flower.training import evaluate, train
from fedsky.shared.jobspec import parse_job_spec_text
from fedsky.shared.modelfile import build_module, example_architecture, load_weights, module_weights
from flwr.supercore.inflatable import inflatable_utils
from flwr.superlink.grid import http_grid


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("sgd", lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9)),
        ("adam", lambda p, lr: torch.optim.Adam(p, lr=lr)),
    ],
)
def test_our_optimisers_equal_torch(name: str, make: object) -> None:
    arch = example_architecture("breast_cancer")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 30)).astype(np.float32)
    y = rng.integers(0, 2, size=100).astype(np.int64)
    torch.manual_seed(0)
    ours = build_module(arch)
    theirs = build_module(arch)
    load_weights(theirs, module_weights(ours))
    train(ours, x, y, epochs=2, batch_size=16, learning_rate=0.01, optimizer=name, seed=5)
    # The same batches, through torch.optim.
    gen = torch.Generator().manual_seed(5)
    opt = make(list(theirs.parameters()), 0.01)  # type: ignore[operator]
    for _ in range(2):
        order = torch.randperm(100, generator=gen)
        for start in range(0, 100, 16):
            idx = order[start : start + 16]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(
                theirs(torch.from_numpy(x)[idx]), torch.from_numpy(y)[idx]
            ).backward()
            opt.step()
    for key, value in module_weights(ours).items():
        np.testing.assert_allclose(value, module_weights(theirs)[key], rtol=1e-5, atol=1e-6)


def test_evaluate_counts() -> None:
    arch = example_architecture("breast_cancer")
    module = build_module(arch)
    x = np.zeros((7, 30), np.float32)
    y = np.array([0, 1, 1, 0, 1, 1, 1])
    result = evaluate(module, x, y, num_classes=2, batch_size=3)
    assert result.examples == 7
    assert sum(map(sum, result.confusion)) == 7
    assert [sum(row) for row in result.confusion] == [2, 5]


def test_fedavg_weights_by_examples_and_keeps_dtypes() -> None:
    ref = {"w": np.zeros((2,), np.float32), "n": np.array(0, np.int64)}
    a = _Reply(
        site="a",
        metrics={"num-examples": 1},
        weights={"w": np.array([1.0, 1.0], np.float32), "n": np.array(10)},
    )
    b = _Reply(
        site="b",
        metrics={"num-examples": 3},
        weights={"w": np.array([5.0, 9.0], np.float32), "n": np.array(20)},
    )
    out = fedavg([a, b], ref)
    np.testing.assert_allclose(out["w"], [4.0, 7.0])
    assert out["w"].dtype == np.float32
    assert out["n"].dtype == np.int64
    assert int(out["n"]) == 18  # (10 + 60) / 4 = 17.5, rounded to even


def test_site_named_in_an_error_reason() -> None:
    assert _site_of("hospital-a: dataset 'x' is not configured") == "hospital-a"
    assert _site_of("agg-x: nope") is None
    assert _site_of("no colon here") is None


def test_run_config_keys_match_the_app_pyproject() -> None:
    text = (resources.files("fedsky.shared.flower") / "pyproject.toml").read_text()
    declared = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert declared == RunSettings().to_run_config()
    assert tomllib.loads(RunSettings().to_toml()) == declared


def test_settings_for_a_job() -> None:
    spec = parse_job_spec_text(
        """
name = "demo"
participants = ["h-a", "h-b", "h-c"]
model = "m.safetensors"
dataset = "digits"
dataset_overrides = { h-c = "digits-c" }
[hyperparameters]
rounds = 4
optimizer = "adam"
learning_rate = 0.002
min_participants = 2
""",
        path=Path("/jobs/job.toml"),
    )
    s = settings_for_job(
        spec,
        job_id="j7",
        model_file=Path("/srv/m.safetensors"),
        model_sha256="a" * 64,
        sink="mqtt",
        mqtt={"host": "ctl", "port": 8883, "ca": "/a", "cert": "/b", "key": "/c"},
    )
    assert s.num_rounds == 4
    assert s.optimizer == "adam"
    assert s.min_participants == 2
    assert s.expected_participants == 3
    assert s.overrides == {"h-c": "digits-c"}
    assert s.round_timeout_s == 300.0
    assert s.mqtt_host == "ctl"
    back = RunSettings.from_run_config(tomllib.loads(s.to_toml()))
    assert back == s
    with pytest.raises(ValueError, match="must map participant ids"):
        RunSettings.model_validate({"dataset-overrides": "[1]"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        RunSettings.model_validate({"dataset-overrides": "{"})


def test_a_reply_still_arriving_is_pulled_on_a_short_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SuperNode makes its reply visible before its weights have arrived; Flower's grid
    then retries after 1, 2 and 4 s. The ServerApp's grid retries after 0.1, 0.2, 0.4 s."""
    monkeypatch.setattr(http_grid, "pull_objects", inflatable_utils.pull_objects)
    assert pull_replies_promptly()
    assert pull_replies_promptly()  # once is enough; twice changes nothing
    tries: list[float] = []

    def pull_object(object_id: str) -> bytes:
        tries.append(time.monotonic())
        if len(tries) < 4:  # still arriving
            raise inflatable_utils.ObjectUnavailableError(object_id)
        return b"weights"

    assert http_grid.pull_objects(["w"], pull_object_fn=pull_object) == {"w": b"weights"}
    # 0.7 s of backoff (+-20%) before the fourth try; Flower's own schedule waits 7 s.
    assert tries[-1] - tries[0] < 2.0


def test_the_pin_is_the_bundle_the_controller_builds_and_nothing_else(tmp_path: Path) -> None:
    from fedsky.controller.clouds.superlink import prepare_app_dir
    from fedsky.shared.flower.pinned_supernode import pinned_fab_digest, refusal
    from flwr.cli.build import build_fab_from_disk

    pinned = pinned_fab_digest()
    ours = build_fab_from_disk(prepare_app_dir(tmp_path / "ours"))
    assert refusal(ours, pinned=pinned) is None
    foreign = prepare_app_dir(tmp_path / "foreign")
    (foreign / "pyproject.toml").write_text(
        (foreign / "pyproject.toml").read_text().replace("fedsky.shared.flower.client_app", "x")
    )
    reason = refusal(build_fab_from_disk(foreign), pinned=pinned)
    assert reason is not None
    assert "is not fedsky's" in reason
    extra = prepare_app_dir(tmp_path / "extra")
    (extra / "more.py").write_text("import os\n")
    assert refusal(build_fab_from_disk(extra), pinned=pinned) is not None
