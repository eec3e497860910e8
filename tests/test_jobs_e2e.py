"""A federated job end to end: controller, broker, agents and real Flower processes."""

from __future__ import annotations

import json
import os
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fedsky.controller.onebox import Onebox
from fedsky.controller.security.pki import Pki
from fedsky.shared.modelfile import make_example

from tests.support import eventually_blocking, write_credentials

pytestmark = pytest.mark.e2e

HOSPITALS = {"hospital-us": "aws:us-east-1", "hospital-asia": "aws:ap-northeast-2"}


def _datasets(index: int, count: int) -> str:
    return (
        "[datasets.digits]\n"
        'kind = "digits"\n'
        f'partition = {{ index = {index}, count = {count}, scheme = "label-skew", seed = 7 }}\n'
    )


def write_job(
    directory: Path, *, participants: list[str], rounds: int, dataset: str = "digits", **extra: Any
) -> Path:
    model = directory / "digits.safetensors"
    if not model.exists():
        make_example("digits", model)
    resources = extra.get("resources", "vcpus = 2\nmemory_gib = 4\ndisk_gib = 20")
    spec = directory / f"job-{rounds}-{dataset}.toml"
    spec.write_text(
        f'name = "{extra.get("name", "digits-e2e")}"\n'
        f"participants = {json.dumps(participants)}\n"
        f'model = "{model.name}"\n'
        f'dataset = "{dataset}"\n'
        'selection_metric = "f1"\n'
        "[hyperparameters]\n"
        f"rounds = {rounds}\n"
        "local_epochs = 1\n"
        "batch_size = 32\n"
        "learning_rate = 0.05\n"
        f"round_timeout_s = {extra.get('round_timeout_s', 120)}\n"
        f"[resources]\n{resources}\n"
        "[placement]\n"
        'max_cost = "85000 KRW/month"\n'
        "max_latency_ms = 250\n"
        "cost_weight = 0.5\n"
    )
    return spec


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Onebox]:
    extra = {name: _datasets(i, len(HOSPITALS)) for i, name in enumerate(HOSPITALS)}
    onebox = Onebox(
        root=tmp_path / "box", report_interval_s=3.0, poll_interval_s=0.5, agent_extra=extra
    )
    try:
        onebox.start(HOSPITALS)
        yield onebox
    finally:
        onebox.stop()


def wait_job(box: Onebox, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
    """The job once it is in one of `states`; on timeout the failure shows the job's log."""
    job: dict[str, Any] = eventually_blocking(
        lambda: box.api.get(f"/v1/jobs/{job_id}"),
        until=lambda job: job["state"] in states,
        timeout=timeout,
        interval=0.5,
        what=f"job {job_id} to be {' or '.join(states)}",
        details=lambda: box.fedctl("job", "logs", job_id, check=False).stdout,
    )
    return job


def superlink_pids(box: Onebox) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-superlink" in c for c in cmd[:2]) and any(
            str(box.root).encode() in c for c in cmd
        ):
            out.append(int(proc.name))
    return out


def test_two_round_job_completes_and_aggregator_is_gone(box: Onebox, tmp_path: Path) -> None:
    spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=2)
    done = box.fedctl("job", "submit", str(spec), "--follow", "--json", timeout=600)
    job = json.loads(done.stdout)
    assert job["state"] == "completed", box.fedctl("job", "logs", job["id"]).stdout
    assert job["rounds_done"] == 2
    rounds = box.api.get(f"/v1/jobs/{job['id']}/models")
    assert (
        [r["round"] for r in rounds["rounds"]] == [1, 2]
        if isinstance(rounds, dict)
        else [r["round"] for r in rounds] == [1, 2]
    )
    assert superlink_pids(box) == []
    # Each round's phases as the ServerApp timed them, within the round's measured duration,
    # and from round 2 a forecast refined by the rounds measured before it.
    timed = box.api.get(f"/v1/jobs/{job['id']}")["round_times"]
    for row in timed:
        phases = row["phases_s"]
        assert set(phases) == {"train", "aggregate", "evaluate"}, row
        assert 0 < sum(phases.values()) <= row["measured_s"] + 0.05, row
    assert timed[1]["forecast_s"] == timed[0]["measured_s"]
    _aggregator_identity_is_refused_after_the_job(box, job["id"])
    box.wait_agents_online(list(HOSPITALS), timeout=60)  # they rode out the broker's restart
    _downloaded_model_reproduces_stored_accuracy(box, job["id"], tmp_path)
    tasks = {t["participant"]: t for t in job["tasks"]}
    assert set(tasks) == set(HOSPITALS)
    assert all(t["vm"] in ("vm-001", "vm-002") for t in tasks.values())


# --- what leaves a hospital --------------------------------------------------------------------


def _xray_folder(root: Path, *, seed: int) -> list[bytes]:
    """A small chest-X-ray-style image folder (`<root>/<split>/<class>/*.png`); returns every
    image's pixels as the ClientApp sees them (float32 bytes), to search for later."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    samples = []
    for split, n in (("train", 24), ("test", 8)):
        for label, cls in enumerate(("covid", "normal")):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
                pixels[:, :4] = 40 if label == 0 else 210  # learnable, and unique per image
                Image.fromarray(pixels, mode="L").save(folder / f"patient-{i:03d}.png")
                samples.append((pixels.astype(np.float32) / 255.0).tobytes())
    return samples


def _xray_model(path: Path) -> None:
    import torch
    from fedsky.shared.modelfile import Architecture, build_module, module_weights, write_model_file

    arch = Architecture.model_validate(
        {
            "input_shape": [1, 8, 8],
            "num_classes": 2,
            "class_names": ["covid", "normal"],
            "layers": [
                {"type": "flatten"},
                {"type": "linear", "in_features": 64, "out_features": 16},
                {"type": "relu"},
                {"type": "linear", "in_features": 16, "out_features": 2},
            ],
        }
    )
    torch.manual_seed(0)
    write_model_file(path, arch, module_weights(build_module(arch)))


def _spy_on_the_bus(box: Onebox, directory: Path) -> ssl.SSLContext:
    """A `privacy-spy` certificate from the box's CA, and a line in the managed broker's ACL
    that lets it read every topic (reloaded with SIGHUP); its TLS context."""
    pki = Pki.open(box.controller_dir / "state" / "pki")
    issued = pki.issue(common_name="privacy-spy", kind="agent")
    credentials = write_credentials(directory, issued, ca_pem=pki.ca_cert_pem)
    pid = int(box.api.get("/v1/health")["broker_pid"])
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    conf = Path(argv[argv.index("-c") + 1])
    acl = next(
        Path(line.split(" ", 1)[1])
        for line in conf.read_text().splitlines()
        if line.startswith("acl_file ")
    )
    acl.write_text(acl.read_text() + f"\nuser privacy-spy\ntopic read {box.topic_prefix}/#\n")
    os.kill(pid, signal.SIGHUP)
    time.sleep(1.0)  # the reload
    return credentials.context


def test_nothing_but_parameters_and_metrics_leave_the_hospitals(tmp_path: Path) -> None:
    """Capture everything the controller and the aggregator receive during a job: no dataset
    path and no sample is in it."""
    import asyncio

    import aiomqtt

    secret_roots = {name: tmp_path / f"PRIVATE-{name}-records" for name in HOSPITALS}
    samples: list[bytes] = []
    for i, root in enumerate(secret_roots.values()):
        samples += _xray_folder(root, seed=i)
    extra = {
        name: f'[datasets.xray]\nkind = "image-folder"\nroot = "{root}"\n'
        for name, root in secret_roots.items()
    }
    box = Onebox(
        root=tmp_path / "box", report_interval_s=3.0, poll_interval_s=0.5, agent_extra=extra
    )
    captured: list[bytes] = []
    stop = asyncio.Event()

    async def spy() -> None:
        # An identity of its own that may read every topic (the controller's certificate would
        # take over the controller's session: the broker names a session after its CN).
        ctx = _spy_on_the_bus(box, tmp_path / "spy")
        async with aiomqtt.Client(
            "127.0.0.1",
            box.broker_port,
            identifier="privacy-spy",
            tls_context=ctx,
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as client:
            await client.subscribe(f"{box.topic_prefix}/#", qos=1)
            try:
                async with asyncio.timeout(600):
                    async for message in client.messages:
                        captured.append(bytes(message.payload))  # type: ignore[arg-type]
                        if stop.is_set():
                            return
            except aiomqtt.MqttError:
                # At the job's end the managed broker restarts to enforce the job's revoked
                # certificate: everything the job sent was captured before that.
                assert any(b"run_finished" in c for c in captured)

    try:
        box.start(HOSPITALS)
        _xray_model(tmp_path / "xray.safetensors")
        spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=2, dataset="xray")
        spec.write_text(spec.read_text().replace("digits.safetensors", "xray.safetensors"))

        jobs_dir = box.controller_dir / "state" / "jobs"
        aggregator_seen = {"replies": 0, "leaks": []}

        def watch_aggregator() -> None:
            # The SuperLink holds each reply in its state database until the ServerApp has
            # pulled it: scan the database (and its WAL) many times while the job runs.
            while not stop.is_set():
                blob = b"".join(
                    p.read_bytes() for p in jobs_dir.glob("*/superlink.db*") if p.is_file()
                )
                if b"eval-loss" in blob or b"train-loss" in blob:
                    aggregator_seen["replies"] += 1
                for root in secret_roots.values():
                    if str(root).encode() in blob or b"PRIVATE-" in blob:
                        aggregator_seen["leaks"].append("path")
                for sample in samples:
                    if sample[:32] in blob:
                        aggregator_seen["leaks"].append("sample")
                        break
                time.sleep(0.2)

        async def run_job() -> dict[str, Any]:
            spy_task = asyncio.create_task(spy())
            watcher = asyncio.create_task(asyncio.to_thread(watch_aggregator))
            await asyncio.sleep(1.0)
            done = await asyncio.to_thread(
                box.fedctl, "job", "submit", str(spec), "--follow", "--json", timeout=600
            )
            stop.set()
            await watcher
            # One more message wakes the spy (the next report).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    await spy_task
            return json.loads(done.stdout)

        import contextlib

        job = asyncio.run(run_job())
        assert job["state"] == "completed", box.fedctl("job", "logs", job["id"]).stdout
        # What the aggregator received is in its SuperLink's state database (and WAL).
        job_dir = box.controller_dir / "state" / "jobs" / job["id"]
        superlink_bytes = b"".join(p.read_bytes() for p in job_dir.glob("superlink.db*"))
        controller_bytes = b"".join(
            p.read_bytes() for p in (box.controller_dir / "state").glob("controller.db*")
        )
        api = json.dumps(
            [
                box.api.get("/v1/agents"),
                box.api.get("/v1/vms"),
                box.api.get(f"/v1/jobs/{job['id']}"),
            ]
        ).encode()
        logs = (box.controller_dir / "controller.log").read_bytes()
    finally:
        box.stop()

    bus = b"\n".join(captured)
    # The captures are real: they hold what each hospital did send.
    assert b"round_metrics" in bus
    assert b"hospital-us" in bus
    assert aggregator_seen["replies"] > 0  # the hospitals' replies were seen at the aggregator
    assert aggregator_seen["leaks"] == []
    for name, root in secret_roots.items():
        for blob, where in (
            (bus, "bus"),
            (superlink_bytes, "aggregator"),
            (controller_bytes, "controller db"),
            (api, "API"),
            (logs, "controller log"),
        ):
            assert str(root).encode() not in blob, f"{name}'s data path reached the {where}"
            assert b"PRIVATE-" not in blob, f"a data path reached the {where}"
            assert b"patient-0" not in blob, f"a file name reached the {where}"
    for sample in samples:
        probe = sample[:32]  # the first 8 pixels as the ClientApp holds them
        assert probe not in bus
        assert probe not in superlink_bytes


# --- bad input, unreachable aggregator, cancel -------------------------------------------------


@pytest.fixture(scope="module")
def shared_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Onebox]:
    root = tmp_path_factory.mktemp("jobs-bad")
    extra = {name: _datasets(i, len(HOSPITALS)) for i, name in enumerate(HOSPITALS)}
    onebox = Onebox(
        root=root / "box", report_interval_s=3.0, poll_interval_s=0.5, agent_extra=extra
    )
    try:
        onebox.start(HOSPITALS)
        yield onebox
    finally:
        onebox.stop()


def _job_count(box: Onebox) -> int:
    return len(box.api.get("/v1/jobs"))


def test_malformed_spec_and_unloadable_model_are_refused(
    shared_box: Onebox, tmp_path: Path
) -> None:
    before = _job_count(shared_box)
    spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=2)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        spec.read_text().replace('optimizer = "sgd"\n', "").replace("rounds = 2", "rounds = -1")
    )
    done = shared_box.fedctl("job", "submit", str(bad), check=False)
    assert done.returncode == 2
    assert str(bad) in done.stderr
    assert "hyperparameters.rounds" in done.stderr

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}   " + b"\x00" * 64)
    spec2 = tmp_path / "broken-model.toml"
    spec2.write_text(spec.read_text().replace("digits.safetensors", "broken.safetensors"))
    done = shared_box.fedctl("job", "submit", str(spec2), check=False)
    assert done.returncode == 2
    assert "the model file does not load" in done.stderr
    assert _job_count(shared_box) == before  # nothing was created


def test_resources_no_vm_has_are_refused_before_launch(shared_box: Onebox, tmp_path: Path) -> None:
    before = _job_count(shared_box)
    spec = write_job(
        tmp_path, participants=list(HOSPITALS), rounds=1, resources="vcpus = 64\nmemory_gib = 4"
    )
    done = shared_box.fedctl("job", "submit", str(spec), check=False)
    assert done.returncode == 3
    assert "hospital-us" in done.stderr
    assert "64" in done.stderr
    assert _job_count(shared_box) == before


def test_dataset_a_hospital_lacks_fails_the_job_clearly(shared_box: Onebox, tmp_path: Path) -> None:
    spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=1, dataset="chest-xray")
    done = shared_box.fedctl(
        "job", "submit", str(spec), "--follow", "--json", check=False, timeout=300
    )
    job = json.loads(done.stdout)
    assert done.returncode == 1
    assert job["state"] == "failed"
    assert "dataset 'chest-xray' is not configured at hospital-" in job["error"]
    assert superlink_pids(shared_box) == []


def _pids(marker: bytes, box: Onebox) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmd and str(box.root).encode() in cmd:
                out.append(int(proc.name))
    return out


def _wait_supernodes_gone(box: Onebox) -> None:
    eventually_blocking(
        lambda: _pids(b"flower-supernode", box),
        until=lambda pids: pids == [],
        timeout=30,
        interval=0.5,
        what="every SuperNode to exit",
    )


def test_cancel_mid_training_stops_every_supernode_and_the_aggregator(
    shared_box: Onebox, tmp_path: Path
) -> None:
    spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=20, name="to-cancel")
    job = json.loads(shared_box.fedctl("job", "submit", str(spec), "--json").stdout)
    wait_job(shared_box, job["id"], ("training",), timeout=120)
    assert superlink_pids(shared_box)
    assert len(_pids(b"flower-supernode", shared_box)) == len(HOSPITALS)
    done = shared_box.fedctl("job", "cancel", job["id"])
    assert "cancelled" in done.stdout
    assert superlink_pids(shared_box) == []
    _wait_supernodes_gone(shared_box)
    # Each task is stopped once its agent confirms it (stopping until then).
    eventually_blocking(
        lambda: {t["state"] for t in shared_box.api.get(f"/v1/jobs/{job['id']}")["tasks"]},
        until=lambda states: states == {"stopped"},
        timeout=30,
        interval=0.5,
        what="every task's stop to be confirmed",
    )


def test_unreachable_aggregator_fails_the_job_not_hangs(shared_box: Onebox, tmp_path: Path) -> None:
    import os
    import signal

    spec = write_job(tmp_path, participants=list(HOSPITALS), rounds=20, name="lost-aggregator")
    job = json.loads(shared_box.fedctl("job", "submit", str(spec), "--json").stdout)
    wait_job(shared_box, job["id"], ("training",), timeout=120)
    for pid in superlink_pids(shared_box):
        os.kill(pid, signal.SIGKILL)
    ended = wait_job(shared_box, job["id"], ("failed", "completed", "cancelled"), timeout=90)
    assert ended["state"] == "failed"
    assert "aggregator" in ended["error"]
    _wait_supernodes_gone(shared_box)


def _downloaded_model_reproduces_stored_accuracy(box: Onebox, job_id: str, tmp_path: Path) -> None:
    """The Model Manager's download loads into the job's network and gives the stored accuracy
    on the same evaluation data (the union of the hospitals' evaluation slices)."""
    import numpy as np
    import torch
    from fedsky.shared.datasets import BundledDatasetSpec, Partition, load_dataset
    from fedsky.shared.modelfile import build_module, load_weights, read_model_file

    out = tmp_path / "best.safetensors"
    box.fedctl("models", "download", job_id, "--best", "--metric", "accuracy", "-o", str(out))
    assert "OK" in box.fedctl("models", "verify", str(out)).stdout
    meta = json.loads(out.with_name(out.name + ".meta.json").read_text())
    stored = meta["metadata"]["metrics"]["accuracy"]
    model = read_model_file(out)
    net = build_module(model.architecture)
    load_weights(net, model.weights)
    net.eval()
    xs, ys = [], []
    for i in range(len(HOSPITALS)):
        spec = BundledDatasetSpec(
            kind="digits",
            partition=Partition(index=i, count=len(HOSPITALS), scheme="label-skew", seed=7),
        )
        data = load_dataset(
            spec,
            input_shape=model.architecture.input_shape,
            num_classes=model.architecture.num_classes,
        )
        xs.append(data.x_eval)
        ys.append(data.y_eval)
    x = torch.from_numpy(np.concatenate(xs))
    y = np.concatenate(ys)
    with torch.no_grad():
        predicted = net(x).argmax(dim=1).numpy()
    assert float((predicted == y).mean()) == pytest.approx(stored, abs=1e-9)


def _aggregator_identity_is_refused_after_the_job(box: Onebox, job_id: str) -> None:
    """The job's own bus certificate (`agg-<job>`) is revoked and the broker enforces it."""
    import asyncio

    import aiomqtt

    bus = box.controller_dir / "state" / "jobs" / job_id / "bus"
    ctx = ssl.create_default_context(cafile=str(bus / "ca.crt"))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(bus / "agg.crt", bus / "agg.key")

    async def connect() -> None:
        async with aiomqtt.Client(
            "127.0.0.1", box.broker_port, identifier="late-aggregator", tls_context=ctx, timeout=5
        ):
            pass

    def refused() -> bool:
        try:
            asyncio.run(connect())
        except aiomqtt.MqttError:
            return True
        return False

    eventually_blocking(
        refused,
        timeout=30,
        interval=1.0,
        what="the broker to refuse the ended job's certificate",
    )
