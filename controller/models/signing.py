"""Signed downloads: the controller's Ed25519 key and the metadata file that travels with weights.

The metadata (what the model is: job, round, metrics, hyperparameters, participants, the weights'
SHA-256) is signed over its canonical JSON. `verify_download` checks a weights file and its
metadata against a public key from a trusted place; the CLI runs it where the model lands, so the
weights never travel back to the controller to be checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fedsky.controller.models.blobs import sha256_file
from fedsky.controller.models.errors import ModelManagerError, VerificationError
from fedsky.controller.models.records import JobRecord, RoundRecord, timestamp

log = logging.getLogger(__name__)

METADATA_FORMAT = "fedsky-model-metadata/1"
METADATA_SUFFIX = ".meta.json"
WEIGHTS_FORMAT = "safetensors"


def public_key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name for a key: the first 16 hex digits of SHA-256 of its raw bytes."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_key_pem(public: Ed25519PublicKey) -> str:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def load_public_key(pem: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (as `fedctl models signing-key` exports it)."""
    try:
        key = serialization.load_pem_public_key(pem.encode() if isinstance(pem, str) else pem)
    except ValueError:
        raise ValueError("not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


class SigningKey:
    """The controller's Ed25519 key for model metadata: `path` (PEM, 0600), made on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: Ed25519PrivateKey | None = None

    def _load_or_create(self) -> Ed25519PrivateKey:
        if self._key is not None:
            return self._key
        if not self.path.exists():
            self._create()
        mode = self.path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("model signing key was readable by others (mode %o); set it to 0600", mode)
            self.path.chmod(0o600)
        try:
            key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        except ValueError:
            raise ModelManagerError(
                f"the model signing key {self.path} is not a valid PEM key"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ModelManagerError(f"the model signing key {self.path} is not an Ed25519 key")
        self._key = key
        return key

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-key-")  # mkstemp: mode 0600
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(pem)
                fh.flush()
                os.fsync(fh.fileno())
            # link() fails if another process made the key meanwhile: then its key is the key.
            try:
                os.link(tmp, self.path)
                log.info("made a model signing key (key id %s)", public_key_id(key.public_key()))
            except FileExistsError:
                pass
        finally:
            Path(tmp).unlink(missing_ok=True)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._load_or_create().public_key()

    @property
    def key_id(self) -> str:
        return public_key_id(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self._load_or_create().sign(data)


def canonical_json(obj: Any) -> bytes:
    """The bytes that are signed: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def sign_metadata(metadata: Mapping[str, Any], key: SigningKey) -> bytes:
    """The metadata file's bytes: the metadata and an Ed25519 signature over its canonical JSON."""
    signature = key.sign(canonical_json(metadata))
    raw_pub = key.public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    doc = {
        "format": METADATA_FORMAT,
        "metadata": metadata,
        "signature": {
            "algorithm": "ed25519",
            "key_id": key.key_id,
            "public_key": base64.b64encode(raw_pub).decode(),
            "signed": "canonical JSON of `metadata` (sorted keys, no spaces, UTF-8)",
            "value": base64.b64encode(signature).decode(),
        },
    }
    return (
        json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False).encode()
        + b"\n"
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            # A duplicate key could show a person one value while the signature covers another.
            raise VerificationError(f"metadata repeats the key {k!r}")
        out[k] = v
    return out


def metadata_path_for(weights_path: Path) -> Path:
    """Where the metadata of a downloaded weights file lives: beside it, `FILE.meta.json`."""
    return weights_path.with_name(weights_path.name + METADATA_SUFFIX)


@dataclass(frozen=True)
class VerifiedModel:
    metadata: dict[str, Any]
    key_id: str
    sha256: str
    size: int


def verify_download(
    weights_path: Path, meta_path: Path, public_key: Ed25519PublicKey
) -> VerifiedModel:
    """Check a downloaded model: the metadata is signed by `public_key` and the weights match it.

    `public_key` must come from a trusted place (the controller, or a key file exported from it),
    never from the metadata itself. Raises VerificationError with what failed.
    """
    weights_path, meta_path = Path(weights_path), Path(meta_path)
    try:
        raw = meta_path.read_bytes()
    except OSError as exc:
        raise VerificationError(f"cannot read metadata {meta_path}: {exc.strerror}") from None
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise VerificationError(
            f"metadata {meta_path} is not valid JSON: it was damaged or altered"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != METADATA_FORMAT:
        raise VerificationError(f"{meta_path} is not fedsky model metadata ({METADATA_FORMAT})")
    metadata, sig = doc.get("metadata"), doc.get("signature")
    if not isinstance(metadata, dict) or not isinstance(sig, dict):
        raise VerificationError(f"metadata {meta_path} lacks its metadata or signature")
    if sig.get("algorithm") != "ed25519" or not isinstance(sig.get("value"), str):
        raise VerificationError(f"metadata {meta_path} carries no Ed25519 signature")
    trusted_id = public_key_id(public_key)
    try:
        signature = base64.b64decode(sig["value"], validate=True)
        public_key.verify(signature, canonical_json(metadata))
    except (InvalidSignature, ValueError):
        if sig.get("key_id") != trusted_id:
            raise VerificationError(
                f"metadata {meta_path} was not signed by this controller: it names key "
                f"{sig.get('key_id')!r}, the trusted key is {trusted_id}"
            ) from None
        raise VerificationError(
            f"metadata {meta_path} was altered after signing: its signature does not match its "
            f"content (key {trusted_id})"
        ) from None
    weights = metadata.get("weights")
    if not isinstance(weights, dict) or not isinstance(weights.get("sha256"), str):
        raise VerificationError(f"metadata {meta_path} does not describe the weights")
    try:
        sha, size = sha256_file(weights_path)
    except OSError as exc:
        raise VerificationError(f"cannot read weights {weights_path}: {exc.strerror}") from None
    if size != weights.get("size") or sha != weights["sha256"]:
        raise VerificationError(
            f"weights {weights_path} do not match the signed metadata: SHA-256 {sha[:16]}... "
            f"({size} bytes), signed {weights['sha256'][:16]}... ({weights.get('size')} bytes); "
            "the file was damaged or replaced"
        )
    return VerifiedModel(metadata=metadata, key_id=trusted_id, sha256=sha, size=size)


def build_metadata(job: JobRecord, record: RoundRecord) -> dict[str, Any]:
    """What the signed metadata file says about a downloaded model."""
    return {
        "job": {"id": job.job_id, "name": job.name, "status": job.status},
        "round": record.round,
        "metrics": record.metrics,
        "all_metrics": record.all_metrics,
        "per_class": record.per_class,
        "confusion_matrix": record.confusion_matrix,
        "hyperparameters": job.hyperparameters,
        "model_digest": job.model_digest,
        "participants": {"job": job.participants, "round": record.participants},
        "datasets": job.datasets,
        "selection_metric": job.selection.metric,
        "round_duration_s": record.duration_s,
        "recorded_at": record.recorded_at,
        "signed_at": timestamp(),
        "weights": {
            "format": WEIGHTS_FORMAT,
            "sha256": record.weights_sha256,
            "size": record.weights_size,
        },
    }
