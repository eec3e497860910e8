"""Signed download: round trip, corruption, tampering, and a torch state dict through it all."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fedsky.controller.models.errors import VerificationError
from fedsky.controller.models.service import ModelManager
from fedsky.controller.models.settings import ModelsConfig
from fedsky.controller.models.signing import (
    SigningKey,
    canonical_json,
    load_public_key,
    metadata_path_for,
    public_key_id,
    verify_download,
)
from fedsky.controller.store import Store
from safetensors.numpy import save
from safetensors.torch import load as load_torch_weights
from safetensors.torch import save as save_torch_weights


@pytest.fixture
def manager(tmp_path: Path):
    store = Store(tmp_path / "controller.db")
    yield ModelManager(store=store, root=tmp_path / "models", config=ModelsConfig(retention="all"))
    store.close()


async def download(reg: ModelManager, job: str, rnd: int, out: Path) -> Path:
    data, _ = await reg.weights(job, rnd)
    out.write_bytes(data)
    meta = metadata_path_for(out)
    meta.write_bytes(await reg.signed_metadata(job, rnd))
    return meta


async def recorded(reg: ModelManager) -> bytes:
    weights = save(
        {
            "fc.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
            "fc.bias": np.ones(3, np.float32),
        }
    )
    await reg.record_job(
        job_id="job-7",
        name="digits",
        selection_metric="f1",
        hyperparameters={"rounds": 2, "learning_rate": 0.05, "optimizer": "sgd"},
        model_digest="cd" * 32,
        participants=["hospital-a", "hospital-b"],
        datasets={"hospital-a": "digits", "hospital-b": "digits"},
    )
    await reg.record_round(
        job_id="job-7",
        round=2,
        metrics={"accuracy": 0.9, "loss": 0.31, "f1": 0.88, "recall": 0.87, "precision": 0.89},
        per_class=[{"label": 0, "f1": 0.9}],
        confusion_matrix=[[9, 1], [1, 9]],
        participants=[{"site": "hospital-a", "train_examples": 60, "eval_examples": 10}],
        duration_s=2.0,
        weights=weights,
    )
    return weights


async def test_signed_download_round_trip(manager: ModelManager, tmp_path: Path) -> None:
    weights = await recorded(manager)
    out = tmp_path / "dl" / "model.safetensors"
    out.parent.mkdir()
    meta_path = await download(manager, "job-7", 2, out)
    assert meta_path.name == "model.safetensors.meta.json"
    key = load_public_key(manager.public_key_pem())
    verified = verify_download(out, meta_path, key)
    md = verified.metadata
    assert md["job"] == {"id": "job-7", "name": "digits", "status": None}
    assert md["round"] == 2
    assert md["metrics"] == {
        "accuracy": 0.9,
        "loss": 0.31,
        "f1": 0.88,
        "recall": 0.87,
        "precision": 0.89,
    }
    assert md["hyperparameters"]["learning_rate"] == 0.05
    assert md["model_digest"] == "cd" * 32
    assert md["participants"]["job"] == ["hospital-a", "hospital-b"]
    assert md["participants"]["round"][0]["train_examples"] == 60
    assert md["datasets"] == {"hospital-a": "digits", "hospital-b": "digits"}
    assert md["weights"]["format"] == "safetensors"
    assert md["weights"]["size"] == len(weights)
    assert verified.sha256 == md["weights"]["sha256"]
    doc = json.loads(meta_path.read_text())
    assert doc["signature"]["key_id"] == manager.signing_key.key_id == verified.key_id
    # Re-indenting the file changes nothing that is signed.
    meta_path.write_text(json.dumps(doc))
    verify_download(out, meta_path, key)


async def test_corrupted_weights_fail_verify(manager: ModelManager, tmp_path: Path) -> None:
    await recorded(manager)
    out = tmp_path / "model.safetensors"
    meta = await download(manager, "job-7", 2, out)
    raw = bytearray(out.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    out.write_bytes(bytes(raw))
    with pytest.raises(VerificationError, match="do not match the signed metadata"):
        verify_download(out, meta, manager.signing_key.public_key)


async def test_tampered_metadata_fails_verify(manager: ModelManager, tmp_path: Path) -> None:
    await recorded(manager)
    out = tmp_path / "model.safetensors"
    meta = await download(manager, "job-7", 2, out)
    doc = json.loads(meta.read_text())
    doc["metadata"]["metrics"]["accuracy"] = 0.99
    meta.write_text(json.dumps(doc, indent=2))
    with pytest.raises(VerificationError, match="altered after signing"):
        verify_download(out, meta, manager.signing_key.public_key)


async def test_swapped_weights_with_edited_digest_fail_verify(
    manager: ModelManager, tmp_path: Path
) -> None:
    # Replace the weights with another valid file and fix up the digest: the signature catches it.
    await recorded(manager)
    out = tmp_path / "model.safetensors"
    meta = await download(manager, "job-7", 2, out)
    evil = save({"fc.weight": np.zeros((3, 4), np.float32), "fc.bias": np.zeros(3, np.float32)})
    out.write_bytes(evil)
    doc = json.loads(meta.read_text())
    import hashlib

    doc["metadata"]["weights"].update(sha256=hashlib.sha256(evil).hexdigest(), size=len(evil))
    meta.write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match="altered after signing"):
        verify_download(out, meta, manager.signing_key.public_key)


async def test_metadata_resigned_by_another_key_fails_verify(
    manager: ModelManager, tmp_path: Path
) -> None:
    await recorded(manager)
    out = tmp_path / "model.safetensors"
    meta = await download(manager, "job-7", 2, out)
    doc = json.loads(meta.read_text())
    doc["metadata"]["metrics"]["accuracy"] = 0.99
    other = Ed25519PrivateKey.generate()
    doc["signature"]["value"] = base64.b64encode(
        other.sign(canonical_json(doc["metadata"]))
    ).decode()
    doc["signature"]["key_id"] = public_key_id(other.public_key())
    meta.write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match="not signed by this controller"):
        verify_download(out, meta, manager.signing_key.public_key)
    # ...and it does verify against the other key: the check is the key, not the file's claim.
    verify_download(out, meta, other.public_key())


async def test_duplicate_keys_and_garbage_metadata_fail_verify(
    manager: ModelManager, tmp_path: Path
) -> None:
    await recorded(manager)
    out = tmp_path / "model.safetensors"
    meta = await download(manager, "job-7", 2, out)
    text = meta.read_text()
    meta.write_text(text.replace('"round": 2,', '"round": 9,\n    "round": 2,', 1))
    with pytest.raises(VerificationError, match="repeats the key 'round'"):
        verify_download(out, meta, manager.signing_key.public_key)
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(VerificationError, match="not valid JSON"):
        verify_download(out, meta, manager.signing_key.public_key)
    with pytest.raises(VerificationError, match="cannot read metadata"):
        verify_download(out, tmp_path / "absent.json", manager.signing_key.public_key)


def test_signing_key_is_private_persistent_and_made_once(tmp_path: Path) -> None:
    path = tmp_path / "state" / "signing.key"
    first = SigningKey(path)
    key_id = first.key_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert SigningKey(path).key_id == key_id  # the same key after a restart
    path.chmod(0o644)
    assert SigningKey(path).key_id == key_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # tightened on load
    assert b"PRIVATE KEY" in path.read_bytes()


class SmallNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.norm = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))


async def test_torch_state_dict_round_trips_through_record_download_load(
    manager: ModelManager, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    trained = SmallNet()
    # Give BatchNorm non-default running statistics so buffers are checked too.
    trained.train()
    trained(torch.randn(16, 1, 8, 8))
    trained.eval()
    state = {k: v.detach().contiguous() for k, v in trained.state_dict().items()}
    await manager.record_round(
        job_id="torch-job", round=1, metrics={"accuracy": 0.5}, weights=save_torch_weights(state)
    )

    out = tmp_path / "net.safetensors"
    meta = await download(manager, "torch-job", 1, out)
    verify_download(out, meta, manager.signing_key.public_key)

    torch.manual_seed(1)
    fresh = SmallNet()
    fresh.load_state_dict(
        load_torch_weights(out.read_bytes()), strict=True
    )  # weights only, no pickle
    fresh.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))
    for name, tensor in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name
