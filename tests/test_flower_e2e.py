"""Real Flower: a SuperLink (TLS, SuperNode authentication) and three SuperNodes on digits.

One aggregator and three hospitals serve every test in this module (starting them costs more than
a run). Runs are started as the FL initializer starts them (`SuperLinkControl.start_run`); the
ServerApp writes each round to a directory (the file sink). Covered: two rounds with federated
metrics equal to central ones, a dataset a site lacks, a model file that does not load, per-site
dataset names, failover to a standby key (it replaces a SuperNode), and stopping a run and
unregistering a key. Stopping comes last: a SuperNode whose ClientApp was mid-message when its run
stopped waits for that reply for good and takes no further message (Flower 1.42), which is why
fedsky ends a job's SuperNodes with its run and never reuses one for the next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from fedsky.agent.executors.base import SuperNodeLaunch
from fedsky.agent.executors.local import LocalExecutor, LocalSuperNode
from fedsky.controller.clouds.base import AggregatorHandle, AggregatorSpec, ProviderError
from fedsky.controller.clouds.local import LocalProvider, pki_tls_issuer
from fedsky.controller.clouds.superlink import FlowerCliError, SuperLinkControl, prepare_app_dir
from fedsky.controller.security.pki import Pki
from fedsky.shared.datasets import BundledDatasetSpec, Partition, load_dataset, write_catalog
from fedsky.shared.flower.runconfig import RunSettings
from fedsky.shared.flower.sink import read_file_sink
from fedsky.shared.flower.training import predict
from fedsky.shared.messages import RoundMetrics, RunFinished
from fedsky.shared.metrics import confusion_matrix
from fedsky.shared.modelfile import build_module, load_weights, make_example, read_model_file
from fedsky.shared.procs import group_alive as _group_alive
from fedsky.shared.supernode import generate_node_key
from sklearn.metrics import f1_score, precision_score, recall_score

from tests.support import eventually
from tests.support.csr import node_certificate

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SITES = ("hospital-us", "hospital-asia", "hospital-eu")


def _spec(index: int) -> BundledDatasetSpec:
    return BundledDatasetSpec(
        kind="digits",
        partition=Partition(index=index, count=len(SITES), scheme="label-skew", seed=11),
    )


async def _finished_status(control: SuperLinkControl, run_id: int, timeout: float = 30) -> str:
    """The run's status at the SuperLink once it says the run finished."""
    return await eventually(
        lambda: control.run_status(run_id),
        until=lambda status: status.startswith("finished"),
        timeout=timeout,
        interval=0.5,
        what=f"run {run_id} to finish at the SuperLink",
    )


@dataclass
class Federation:
    root: Path
    pki: Pki
    provider: LocalProvider
    handle: AggregatorHandle
    control: SuperLinkControl
    nodes: list[LocalSuperNode]
    node_ids: list[int]
    catalogs: list[Path]
    model: Path

    async def run(
        self, name: str, **overrides: object
    ) -> tuple[list[RoundMetrics], RunFinished, float]:
        sink = self.root / "runs" / name
        settings = RunSettings.model_validate(
            {
                "job-id": name,
                "num-rounds": 2,
                "min-participants": len(SITES),
                "expected-participants": len(SITES),
                "model-file": str(self.model),
                "sink": "file",
                "sink-dir": str(sink),
                "learning-rate": 0.05,
                "round-timeout-s": 180,
                "join-timeout-s": 60,
                **overrides,
            }
        )
        app = prepare_app_dir(self.root / "app")
        t0 = time.monotonic()
        run_id = await self.control.start_run(
            app_dir=app, settings=settings, run_config_file=self.root / f"{name}.toml"
        )
        await eventually(
            lambda: (sink / "run.json").exists(),
            timeout=400,
            interval=0.5,
            what=f"run {name} to finish",
        )
        elapsed = time.monotonic() - t0
        # The ServerApp process reports to the SuperLink just after the sink.
        status = await _finished_status(self.control, run_id)
        rounds, end = read_file_sink(sink)
        assert end is not None
        for report in sink.glob("*.json"):  # what would reach the controller: no local path
            text = report.read_text()
            assert str(self.root) not in text
            assert "datasets.json" not in text
        assert status == (
            "finished:completed" if end.status == "completed" else "finished:failed"
        ), status
        return rounds, end, elapsed


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def federation(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Federation]:
    root = tmp_path_factory.mktemp("federation")
    pki = Pki.init(root / "pki")
    pki.write_controller_identity()  # the front serves Control to the controller only
    provider = LocalProvider(
        work_dir=root / "aggregators",
        issue_tls=pki_tls_issuer(pki),
        control_identity=pki.controller_identity,
    )
    handle = await provider.launch(
        AggregatorSpec(job_id="e2e", cloud="local", region="local", instance_type="local")
    )
    control = provider.control(handle)
    executor = LocalExecutor(work_dir=root / "agent-tasks")
    nodes: list[LocalSuperNode] = []
    node_ids: list[int] = []
    catalogs: list[Path] = []
    try:
        for i, site in enumerate(SITES):
            site_dir = root / site
            keys = generate_node_key(site_dir / "keys")
            node_ids.append(await control.register_node(keys.public_key, name=site))
            catalog = write_catalog(site_dir / "datasets.json", {"digits": _spec(i)})
            catalogs.append(catalog)
            nodes.append(
                await executor.start(
                    SuperNodeLaunch(
                        task_id=f"e2e-{site}",
                        site=site,
                        superlink=str(handle.address),
                        root_ca=provider.tls("e2e").ca_file,
                        private_key=keys.private_key,
                        dataset_config=catalog,
                        node_config={"torch-threads": 1},
                        node_cert=node_certificate(pki, site, keys),
                    )
                )
            )
        model = root / "digits.safetensors"
        make_example("digits", model, seed=3)
        yield Federation(
            root=root,
            pki=pki,
            provider=provider,
            handle=handle,
            control=control,
            nodes=nodes,
            node_ids=node_ids,
            catalogs=catalogs,
            model=model,
        )
    finally:
        for node in nodes:
            status = await node.stop()
            assert status.reason == "stopped"
        await provider.terminate(handle)
        assert not _group_alive(int(handle.ref))
        assert not await provider.healthy(handle)


@pytest.mark.asyncio(loop_scope="module")
async def test_two_rounds_with_exact_federated_metrics(federation: Federation) -> None:
    assert await federation.provider.healthy(federation.handle)
    await eventually(  # the SuperNodes were started a moment ago
        federation.control.list_nodes,
        until=lambda nodes: sorted(n.status for n in nodes) == ["online"] * len(SITES),
        timeout=60,
        interval=0.5,
        what="every SuperNode online",
    )

    rounds, end, _elapsed = await federation.run("digits-2r")
    assert end.status == "completed", end.reason
    assert end.rounds_completed == 2
    assert [r.round for r in rounds] == [1, 2]
    arch = read_model_file(federation.model).architecture
    sets = [
        load_dataset(_spec(i), input_shape=arch.input_shape, num_classes=arch.num_classes)
        for i in range(len(SITES))
    ]
    for r in rounds:
        assert sorted(p.site for p in r.participants) == sorted(SITES)
        by_site = {p.site: p for p in r.participants}
        for i, site in enumerate(SITES):
            assert by_site[site].train_examples == sets[i].train_examples
            assert by_site[site].eval_examples == sets[i].eval_examples
        assert r.failures == []
        assert r.weights is not None
        # Central evaluation of the round's global weights on the union of the sites' eval sets.
        weights_file = federation.root / "runs" / "digits-2r" / f"round-{r.round:04d}.safetensors"
        mf = read_model_file(weights_file)
        assert mf.sha256 == r.weights.sha256
        module = build_module(mf.architecture)
        load_weights(module, mf.weights)
        y_true = np.concatenate([s.y_eval for s in sets])
        y_pred = np.concatenate([predict(module, s.x_eval)[1] for s in sets])
        assert r.confusion_matrix == confusion_matrix(y_true.tolist(), y_pred.tolist(), 10)
        assert r.accuracy == pytest.approx(float((y_true == y_pred).mean()), rel=1e-12)
        assert r.f1 == pytest.approx(
            f1_score(y_true, y_pred, average="macro", zero_division=0), rel=1e-12
        )
        assert r.recall == pytest.approx(
            recall_score(y_true, y_pred, average="macro", zero_division=0), rel=1e-12
        )
        assert r.precision == pytest.approx(
            precision_score(y_true, y_pred, average="macro", zero_division=0), rel=1e-12
        )
        assert r.duration_s > 0
    assert rounds[1].accuracy > rounds[0].accuracy
    assert rounds[1].accuracy > 0.3


@pytest.mark.asyncio(loop_scope="module")
async def test_a_dataset_a_site_lacks_fails_the_run_with_a_clear_reason(
    federation: Federation,
) -> None:
    rounds, end, elapsed = await federation.run("no-dataset", dataset="chest-xray")
    assert rounds == []
    assert end.status == "failed"
    assert end.rounds_completed == 0
    assert "round 1 train: 0 of 3 participants answered" in end.reason
    for site in SITES:
        assert f"dataset 'chest-xray' is not configured at site '{site}'" in end.reason
    assert str(federation.root) not in end.reason
    assert elapsed < 120


@pytest.mark.asyncio(loop_scope="module")
async def test_a_model_file_that_does_not_load_fails_the_run_at_once(
    federation: Federation,
) -> None:
    broken = federation.root / "broken.safetensors"
    data = federation.model.read_bytes()
    broken.write_bytes(data[: len(data) // 3])
    rounds, end, elapsed = await federation.run("bad-model", **{"model-file": str(broken)})
    assert rounds == []
    assert end.status == "failed"
    assert "the model file does not load" in end.reason
    assert elapsed < 60
    # And one whose digest is not the job's.
    rounds, end, _ = await federation.run("bad-digest", **{"model-sha256": "0" * 64})
    assert end.status == "failed"
    assert "does not match the job's model digest" in end.reason


@pytest.mark.asyncio(loop_scope="module")
async def test_overrides_per_site(federation: Federation) -> None:
    """A participant that names the dataset differently gets its own name (here: one it lacks)."""
    overrides = json.dumps({"hospital-eu": "digits-eu"})
    rounds, end, _ = await federation.run(
        "override", **{"dataset-overrides": overrides, "min-participants": 2, "num-rounds": 1}
    )
    assert end.status == "completed", end.reason
    (r,) = rounds
    assert sorted(p.site for p in r.participants) == ["hospital-asia", "hospital-us"]
    assert {f.site for f in r.failures} == {"hospital-eu"}
    assert all("dataset 'digits-eu' is not configured" in f.reason for f in r.failures)


@pytest.mark.asyncio(loop_scope="module")
async def test_failover_to_a_standby_key(federation: Federation) -> None:
    """A hospital's SuperNode dies mid-round with every site required; its node is unregistered
    (its pending message fails at once) and a replacement with the pre-registered standby key
    joins: the phase is re-sent to it and every round completes with every site."""
    standby = generate_node_key(federation.root / "hospital-eu" / "standby")
    await federation.control.register_node(standby.public_key, name="hospital-eu-standby")
    sink = federation.root / "runs" / "failover"
    settings = RunSettings.model_validate(
        {
            "job-id": "failover",
            "num-rounds": 3,
            "min-participants": len(SITES),
            "expected-participants": len(SITES),
            "model-file": str(federation.model),
            "sink": "file",
            "sink-dir": str(sink),
            "round-timeout-s": 120,
        }
    )
    run_id = await federation.control.start_run(
        app_dir=prepare_app_dir(federation.root / "app"),
        settings=settings,
        run_config_file=federation.root / "failover.toml",
    )
    # Round 1 takes about a minute alone; on a loaded 2-core machine (the suite's other
    # e2e processes, a CI neighbour) the ServerApp's start and the first round have taken
    # over two minutes: a functional wait, not a timing check.
    await eventually(
        lambda: (sink / "round-0001.json").exists(),
        timeout=300,
        interval=0.2,
        what="round 1 of the failover run",
    )
    # Round 2's messages are pushed the moment round 1 is written: the kill lands mid-round.
    dead = federation.nodes[2]
    os.killpg(dead.pid, signal.SIGKILL)
    assert not (await dead.wait()).ok
    await federation.control.unregister_node(federation.node_ids[2])
    executor = LocalExecutor(work_dir=federation.root / "agent-tasks")
    federation.nodes[2] = await executor.start(
        SuperNodeLaunch(
            task_id="e2e-hospital-eu-standby",
            site="hospital-eu",
            superlink=str(federation.handle.address),
            root_ca=federation.provider.tls("e2e").ca_file,
            private_key=standby.private_key,
            dataset_config=federation.catalogs[2],
            node_config={"torch-threads": 1},
            node_cert=node_certificate(federation.pki, "hospital-eu", standby),
        )
    )
    await eventually(
        lambda: (sink / "run.json").exists(),
        timeout=400,
        interval=0.5,
        what="the failover run to finish",
    )
    rounds, end = read_file_sink(sink)
    assert end is not None
    assert end.status == "completed", end.reason
    assert [r.round for r in rounds] == [1, 2, 3]
    for r in rounds:
        assert sorted(p.site for p in r.participants) == sorted(SITES)
    # The dead node's message failed (round 2) and was re-sent to the standby.
    assert rounds[0].failures == []
    failed = [f for r in rounds for f in r.failures]
    assert failed, "the kill was not noticed mid-round"
    assert {f.site for f in failed} == {"hospital-eu"}
    assert await _finished_status(federation.control, run_id) == "finished:completed"


@pytest.mark.asyncio(loop_scope="module")
async def test_stop_a_run_and_unregister_a_node(federation: Federation) -> None:
    # Last in the module: the stop may leave a SuperNode waiting for a reply that never comes.
    sink = federation.root / "runs" / "long"
    settings = RunSettings.model_validate(
        {
            "job-id": "long",
            "num-rounds": 50,
            "min-participants": len(SITES),
            "expected-participants": len(SITES),
            "model-file": str(federation.model),
            "sink": "file",
            "sink-dir": str(sink),
        }
    )
    run_id = await federation.control.start_run(
        app_dir=prepare_app_dir(federation.root / "app"),
        settings=settings,
        run_config_file=federation.root / "long.toml",
    )
    await eventually(
        lambda: federation.control.run_status(run_id),
        until=lambda status: status == "running",
        timeout=60,
        interval=0.5,
        what=f"run {run_id} to run",
    )
    await asyncio.sleep(3)  # round 1 under way
    await federation.control.stop_run(run_id)
    assert await _finished_status(federation.control, run_id, timeout=60) == "finished:stopped"
    # A spare key: registered, then unregistered (what failover does to a dead node's key).
    keys = generate_node_key(federation.root / "spare")
    node_id = await federation.control.register_node(keys.public_key, name="spare")
    await federation.control.unregister_node(node_id)
    states = {n.node_id: n.status for n in await federation.control.list_nodes()}
    assert states[node_id] == "unregistered"
    # The SuperLink's refusals come back as errors that say what was refused.
    with pytest.raises(ProviderError, match="registering a node key at the SuperLink"):
        await federation.control.register_node(keys.public_key, name="spare-again")
    not_a_key = federation.root / "spare" / "not-a-key.pub"
    not_a_key.write_text("ssh-rsa AAAA\n")
    with pytest.raises(ProviderError, match=r"not-a-key\.pub is not an OpenSSH public key"):
        await federation.control.register_node(not_a_key)
    with pytest.raises(
        ProviderError, match=r"reading run 12345 at the SuperLink .* failed: .*not found"
    ):
        await federation.control.run_status(12345)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_foreign_app_never_runs_at_a_hospital(federation: Federation) -> None:
    """Anyone who can start a run (a hostile hospital with only the CA certificate could, on
    Flower's open Control API) may name an app of their own: every SuperNode refuses its bundle,
    so its ClientApp module is never imported."""
    app = federation.root / "foreign-app"
    app.mkdir(exist_ok=True)
    marker = federation.root / "foreign-code-ran"
    pyproject = (prepare_app_dir(federation.root / "app") / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(
        pyproject.replace("fedsky.shared.flower.client_app:app", "foreign_app:app")
    )
    (app / "foreign_app.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "from fedsky.shared.flower.client_app import app\n"
    )
    sink = federation.root / "runs" / "foreign"
    settings = RunSettings.model_validate(
        {
            "job-id": "foreign",
            "num-rounds": 1,
            "min-participants": len(SITES),
            "expected-participants": len(SITES),
            "model-file": str(federation.model),
            "sink": "file",
            "sink-dir": str(sink),
            "round-timeout-s": 20,
            "join-timeout-s": 20,
        }
    )
    logs = [node.log_file for node in federation.nodes]
    run_id = await federation.control.start_run(
        app_dir=app, settings=settings, run_config_file=federation.root / "foreign.toml"
    )
    try:
        await eventually(
            lambda: all(f"refused run {run_id}" in log.read_text() for log in logs),
            timeout=60,
            interval=0.5,
            what="every SuperNode to refuse the foreign app",
        )
    finally:
        with contextlib.suppress(FlowerCliError):  # refused everywhere, it may have ended
            await federation.control.stop_run(run_id)
    assert not marker.exists()
    assert all(node.running for node in federation.nodes)
