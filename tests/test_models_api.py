"""The Model Manager through the real API app on a unix socket, the real ApiClient and fedctl."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import numpy as np
import pytest
from aiohttp import web
from fedsky.controller.api.app import make_app
from fedsky.controller.cli.client import ApiClient, ApiError
from fedsky.controller.cli.main import main as fedctl
from fedsky.controller.models.service import ModelManager
from fedsky.controller.models.settings import ModelsConfig
from fedsky.controller.services import Services
from fedsky.controller.store import Store
from fedsky.shared import exitcodes
from safetensors.numpy import save

T = TypeVar("T")

# (accuracy, loss, f1) per round. alpha: f1 best at 3; accuracy ties at 3 and 4 (3: lower loss)
ALPHA = {1: (0.70, 0.80, 0.65), 2: (0.85, 0.45, 0.82), 3: (0.91, 0.30, 0.90), 4: (0.91, 0.33, 0.86)}
BETA = {1: (0.88, 0.40, 0.87), 2: (0.95, 0.20, 0.93)}
SEEDS = {"alpha": 100, "beta": 200}


@dataclass
class Controller:
    socket: str
    manager: ModelManager
    run: Any

    def fedctl(self, *argv: str) -> int:
        return fedctl(["--socket", self.socket, *argv])


def weights_for(seed: int) -> bytes:
    return save({"w": np.full((64,), seed, dtype=np.float32)})


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[Controller]:
    # A short directory: unix socket paths are limited to about 100 bytes.
    sockdir = tempfile.mkdtemp(prefix="fsreg", dir="/tmp")
    socket = f"{sockdir}/controller.sock"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="api-loop", daemon=True)
    thread.start()

    def run(coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)

    store = Store(tmp_path / "controller.db")
    manager = ModelManager(
        store=store, root=tmp_path / "models", config=ModelsConfig(retention="all")
    )
    runner = web.AppRunner(make_app(Services(store=store, models=manager)))
    run(runner.setup())
    run(web.UnixSite(runner, socket).start())

    async def populate() -> None:
        for job, table in (("alpha", ALPHA), ("beta", BETA)):
            await manager.record_job(
                job_id=job, name=job, selection_metric="f1", participants=["hospital-a"]
            )
            for rnd, (acc, loss, f1) in table.items():
                await manager.record_round(
                    job_id=job,
                    round=rnd,
                    metrics={
                        "accuracy": acc,
                        "loss": loss,
                        "f1": f1,
                        "recall": f1,
                        "precision": f1,
                    },
                    participants=[{"site": "hospital-a", "train_examples": 50, "eval_examples": 5}],
                    duration_s=1.0 + rnd,
                    weights=weights_for(SEEDS[job] + rnd),
                )

    run(populate())
    try:
        yield Controller(socket, manager, run)
    finally:
        run(runner.cleanup())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        store.close()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_list_rounds_table_json_and_plot(controller: Controller, capsys, tmp_path: Path) -> None:
    client = ApiClient(controller.socket)
    data = client.get("/v1/jobs/alpha/models")
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3, 4]
    assert data["recommended"] == 3
    assert data["rounds"][2]["metrics"]["f1"] == 0.90
    assert data["rounds"][2]["checkpoint"]["size"] > 0

    plot = tmp_path / "curves.png"
    assert controller.fedctl("models", "list", "alpha", "--plot", str(plot)) == exitcodes.OK
    out = capsys.readouterr().out
    assert "ROUND" in out
    assert "0.9100" in out
    assert "recommended by f1" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert controller.fedctl("models", "list", "nope") == exitcodes.FAILED
    assert "no job nope" in capsys.readouterr().err


def test_best_with_thresholds_why_and_runners_up(controller: Controller, capsys) -> None:
    code = controller.fedctl("models", "best", "alpha", "--metric", "accuracy", "--max", "loss=0.5")
    out = capsys.readouterr().out
    assert code == exitcodes.OK
    assert "best: round 3" in out
    assert "tied with round 4, chosen because its loss is lower" in out

    code = controller.fedctl("models", "best", "alpha", "--json")  # the job's own metric: f1
    rec = json.loads(capsys.readouterr().out)
    assert code == exitcodes.OK
    assert rec["best"]["round"] == 3
    assert rec["criteria"]["metric"] == "f1"
    assert [r["round"] for r in rec["runners_up"]] == [4, 2, 1]


def test_best_nothing_feasible_exits_3_and_names_closest(controller: Controller, capsys) -> None:
    code = controller.fedctl("models", "best", "alpha", "--metric", "f1", "--min", "accuracy=0.95")
    captured = capsys.readouterr()
    assert code == exitcodes.INFEASIBLE
    assert "closest is accuracy >= 0.95" in captured.out
    assert "round 3 reaches 0.91" in captured.out


def test_best_across_jobs_and_weighted(controller: Controller, capsys) -> None:
    code = controller.fedctl(
        "models", "best", "--all-jobs", "--score", "f1:0.7,accuracy:0.3", "--json"
    )
    rec = json.loads(capsys.readouterr().out)
    assert code == exitcodes.OK
    assert (rec["best"]["job"], rec["best"]["round"]) == ("beta", 2)
    assert rec["best"]["score"] == 1.0
    assert "job beta round 2" in rec["reason"]
    # Across jobs the criteria must be explicit (jobs may select by different metrics).
    assert controller.fedctl("models", "best", "--all-jobs") == exitcodes.USAGE
    assert "across jobs" in capsys.readouterr().err


def test_bad_queries_are_usage_errors(controller: Controller) -> None:
    client = ApiClient(controller.socket)
    for query in (
        {"job": "alpha", "metric": "auc"},
        {"job": "alpha", "min": "accuracy"},
        {"metric": "f1"},
    ):
        with pytest.raises(ApiError) as info:
            client.get("/v1/models/best?" + urlencode(query))
        assert info.value.status == 400
        assert info.value.exit_code == exitcodes.USAGE
    with pytest.raises(ApiError) as info:
        client.get("/v1/jobs/alpha/models/9/weights")
    assert info.value.status == 404
    assert "no round 9" in info.value.message


def test_download_best_then_verify_and_tamper(
    controller: Controller, capsys, tmp_path: Path
) -> None:
    out = tmp_path / "out" / "alpha.safetensors"
    code = controller.fedctl(
        "models", "download", "alpha", "--best", "--metric", "f1", "-o", str(out)
    )
    printed = capsys.readouterr().out
    assert code == exitcodes.OK, printed
    meta = out.with_name("alpha.safetensors.meta.json")
    assert out.read_bytes() == weights_for(SEEDS["alpha"] + 3)
    assert json.loads(meta.read_text())["metadata"]["round"] == 3

    assert controller.fedctl("models", "verify", str(out)) == exitcodes.OK
    assert "OK:" in capsys.readouterr().out

    # Offline: the exported key, with no controller running at the socket given.
    key = tmp_path / "controller-models.pem"
    assert controller.fedctl("models", "signing-key", "-o", str(key)) == exitcodes.OK
    offline = [
        "--socket",
        str(tmp_path / "absent.sock"),
        "models",
        "verify",
        str(out),
        "--public-key",
        str(key),
    ]
    assert fedctl(offline) == exitcodes.OK
    assert (
        fedctl(["--socket", str(tmp_path / "absent.sock"), "models", "verify", str(out)])
        == exitcodes.UNAVAILABLE
    )
    capsys.readouterr()

    doc = json.loads(meta.read_text())
    doc["metadata"]["round"] = 4
    meta.write_text(json.dumps(doc))
    assert controller.fedctl("models", "verify", str(out)) == exitcodes.FAILED
    assert "verification FAILED" in capsys.readouterr().err


def test_download_round_and_corrupted_file(controller: Controller, capsys, tmp_path: Path) -> None:
    out = tmp_path / "r2.safetensors"
    assert (
        controller.fedctl("models", "download", "beta", "--round", "2", "-o", str(out))
        == exitcodes.OK
    )
    data = bytearray(out.read_bytes())
    data[-1] ^= 0x40
    out.write_bytes(bytes(data))
    capsys.readouterr()
    assert controller.fedctl("models", "verify", str(out)) == exitcodes.FAILED
    assert "do not match the signed metadata" in capsys.readouterr().err

    assert (
        controller.fedctl("models", "download", "beta", "--round", "7", "-o", str(tmp_path / "x"))
        == 1
    )
    assert not (tmp_path / "x").exists()
    code = controller.fedctl(
        "models", "download", "beta", "--min", "accuracy=0.99", "-o", str(tmp_path / "y")
    )
    assert code == exitcodes.INFEASIBLE
    assert not (tmp_path / "y").exists()


def test_pin_through_the_api(controller: Controller, capsys) -> None:
    assert controller.fedctl("models", "pin", "alpha", "1") == exitcodes.OK
    assert "pinned" in capsys.readouterr().out
    rounds = ApiClient(controller.socket).get("/v1/jobs/alpha/models")["rounds"]
    assert rounds[0]["pinned"] is True
    assert controller.fedctl("models", "pin", "alpha", "1", "--unpin") == exitcodes.OK
    assert ApiClient(controller.socket).get("/v1/jobs/alpha/models/1")["pinned"] is False
    listing = ApiClient(controller.socket).get("/v1/models")
    assert {j["job"] for j in listing["jobs"]} == {"alpha", "beta"}
    assert listing["usage"]["blobs"] == 6
