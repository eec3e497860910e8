"""Model files: a declared network plus safetensors weights, checked without running anything."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fedsky.shared.modelfile import (
    EXAMPLES,
    Architecture,
    ModelFileError,
    build_module,
    cast_like,
    example_architecture,
    file_digest,
    from_array_record,
    load_weights,
    make_example,
    model_bytes,
    module_weights,
    parse_model_bytes,
    read_model_file,
    to_array_record,
    weights_to_safetensors,
)


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_load_and_run(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name}.safetensors"
    sha = make_example(name, path, seed=1)
    mf = read_model_file(path)
    assert mf.sha256 == sha == file_digest(path)
    assert mf.size == path.stat().st_size
    module = build_module(mf.architecture)
    load_weights(module, mf.weights)
    out = module(torch.zeros((2, *mf.architecture.input_shape)))
    assert tuple(out.shape) == (2, mf.architecture.num_classes)
    # The same seed gives the same file; weights survive the round trip exactly.
    assert make_example(name, tmp_path / "again.safetensors", seed=1) == sha
    for key, value in module_weights(module).items():
        assert np.array_equal(value, mf.weights[key])


def test_the_xray_example_is_the_study_size(tmp_path: Path) -> None:
    make_example("xray", tmp_path / "x.safetensors")
    size = (tmp_path / "x.safetensors").stat().st_size
    assert 25e6 < size < 27e6


def test_array_record_round_trip_keeps_names_and_dtypes(tmp_path: Path) -> None:
    arch = Architecture.model_validate(
        {
            "input_shape": [4],
            "num_classes": 2,
            "layers": [
                {"type": "batchnorm1d", "num_features": 4},
                {"type": "linear", "in_features": 4, "out_features": 2},
            ],
        }
    )
    weights = module_weights(build_module(arch))
    assert weights["0.num_batches_tracked"].dtype == np.int64
    back = from_array_record(to_array_record(weights), arch)
    assert list(back) == list(weights)
    for key in weights:
        assert back[key].dtype == weights[key].dtype
        assert np.array_equal(back[key], weights[key])
    averaged = {k: v.astype(np.float64) * 0.5 + 0.25 for k, v in weights.items()}
    cast = cast_like(averaged, weights)
    assert cast["0.num_batches_tracked"].dtype == np.int64
    assert cast["1.weight"].dtype == np.float32
    parse_model_bytes(model_bytes(arch, cast))


def _file(
    arch: dict[str, object] | str,
    weights: dict[str, np.ndarray],
    meta: dict[str, str] | None = None,
) -> bytes:
    metadata = {
        "format": "fedsky-model",
        "format_version": "1",
        "architecture": arch if isinstance(arch, str) else json.dumps(arch),
    }
    metadata.update(meta or {})
    return weights_to_safetensors(weights, metadata)


LINEAR = {
    "input_shape": [3],
    "num_classes": 2,
    "layers": [{"type": "linear", "in_features": 3, "out_features": 2}],
}
W = {"0.weight": np.zeros((2, 3), np.float32), "0.bias": np.zeros(2, np.float32)}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than"),
        (b"\xff" * 64, "header length"),
        (struct.pack("<Q", 5) + b"nope!" + b"\0" * 8, "not JSON"),
        (weights_to_safetensors(W), "not a fedsky model file"),
        (_file(LINEAR, W, {"format_version": "9"}), "version '9' is not supported"),
        (_file("{not json", W), "invalid architecture"),
        (_file({**LINEAR, "num_classes": 3}, W), "expected [3]"),
        (
            _file(
                {
                    **LINEAR,
                    "layers": [
                        {"type": "conv2d", "in_channels": 1, "out_channels": 2, "kernel_size": 3}
                    ],
                },
                W,
            ),
            "needs a (channels, height, width) input",
        ),
        (_file({**LINEAR, "layers": [{"type": "softmax"}]}, W), "invalid architecture"),
        (
            _file(
                {
                    "input_shape": [1, 8, 8],
                    "num_classes": 2,
                    "layers": [{"type": "linear", "in_features": 64, "out_features": 2}],
                },
                W,
            ),
            "add a flatten layer",
        ),
        (_file(LINEAR, {"0.weight": W["0.weight"]}), "missing for 0.bias"),
        (_file(LINEAR, {**W, "9.weight": W["0.bias"]}), "does not have: 9.weight"),
        (_file(LINEAR, {**W, "0.weight": np.zeros((3, 2), np.float32)}), "shape [3, 2]"),
        (_file(LINEAR, {**W, "0.bias": np.array([np.nan, 0], np.float32)}), "NaN"),
        (_file(LINEAR, {**W, "0.bias": np.zeros(2, np.uint8)}), "unsupported dtype"),
    ],
)
def test_bad_model_bytes(data: bytes, message: str) -> None:
    with pytest.raises(ModelFileError) as err:
        parse_model_bytes(data)
    assert message in str(err.value)


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "digits.safetensors"
    make_example("digits", path)
    data = path.read_bytes()
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=r"truncated\.safetensors: .*safetensors"):
        read_model_file(bad)
    with pytest.raises(ModelFileError, match="cannot read model file"):
        read_model_file(tmp_path / "absent.safetensors")
    pickled = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), pickled)
    with pytest.raises(ModelFileError, match=r"model\.pt: not a safetensors file"):
        read_model_file(pickled)


def test_load_weights_refuses_other_shapes() -> None:
    arch = example_architecture("breast_cancer")
    module = build_module(arch)
    with pytest.raises(ModelFileError, match="do not fit"):
        load_weights(module, {**module_weights(module), "0.weight": np.zeros((1, 1), np.float32)})


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "bc.safetensors"
    py = [sys.executable, "-m", "fedsky.shared.modelfile"]
    made = subprocess.run(
        [*py, "make-example", "breast_cancer", str(out)], capture_output=True, text=True, check=True
    )
    assert "sha256" in made.stdout
    ok = subprocess.run([*py, "check", str(out)], capture_output=True, text=True, check=True)
    assert "[30], 2 classes" in ok.stdout
    out.write_bytes(b"garbage")
    bad = subprocess.run([*py, "check", str(out)], capture_output=True, text=True)
    assert bad.returncode == 1
    assert "error:" in bad.stderr
