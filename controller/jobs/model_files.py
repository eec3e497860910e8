"""Uploaded model files, kept by digest in the controller's state directory."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedsky.shared.files import atomic_write
from fedsky.shared.modelfile import digest, parse_model_bytes


@dataclass(frozen=True)
class StoredModelFile:
    digest: str
    size: int
    input_shape: list[int]
    num_classes: int

    def to_json(self) -> dict[str, object]:
        return {
            "digest": self.digest,
            "size": self.size,
            "input_shape": self.input_shape,
            "num_classes": self.num_classes,
        }


def model_files_dir(state_dir: Path) -> Path:
    return state_dir / "model-files"


def model_file_path(state_dir: Path, model_digest: str) -> Path:
    return model_files_dir(state_dir) / f"{model_digest}.safetensors"


def store_model_file(state_dir: Path, data: bytes) -> StoredModelFile:
    """Check an uploaded model file and keep it by digest; ModelFileError if it does not load."""
    model = parse_model_bytes(data)
    sha = digest(data)
    path = model_file_path(state_dir, sha)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    if not path.exists():
        atomic_write(path, data, mode=0o640)
    arch = model.architecture
    return StoredModelFile(
        digest=sha,
        size=len(data),
        input_shape=list(arch.input_shape),
        num_classes=arch.num_classes,
    )
