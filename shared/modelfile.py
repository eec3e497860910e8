"""The fedsky model file: a declared network and its initial weights in one safetensors file.

A model file is a plain safetensors file. Its tensors are the network's initial weights, named as
`torch.nn.Sequential` names them (`0.weight`, `0.bias`, `3.running_mean`, ...). Its header
metadata holds the architecture as JSON: the input shape, the number of classes and a list of
layers from a fixed vocabulary (conv2d, linear, pooling, activations, dropout, batch norm,
flatten). See docs/model-format.md.

Why this format:
- Nothing in it is code. A hospital builds the network from the declared layers with its own
  installed fedsky; no job can make a hospital run code it did not install. A TorchScript archive
  carries a program (and `torch.jit.script` is deprecated in torch 2.13); a Python module is code.
- Nothing is unpickled anywhere: safetensors is a JSON header plus raw little-endian buffers, and
  the weights travel between Flower nodes as numpy `.npy` buffers (`allow_pickle=False`).
- The controller and the aggregator read and check it without torch (neither installs torch).
- The global weights of every round are written in the same format, so a downloaded model is
  itself a model file.

Reading a model file checks everything that can be checked without running it: the header, the
metadata, every layer's parameters, shapes that chain from the input to `num_classes` logits, and
each tensor's name, shape and dtype. A file that passes loads into torch without surprises.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    import torch
    from flwr.app import ArrayRecord

FORMAT_NAME = "fedsky-model"
FORMAT_VERSION = "1"
META_FORMAT = "format"
META_VERSION = "format_version"
META_ARCHITECTURE = "architecture"

# The largest model file a job may bring (the controller refuses a larger upload; fedctl checks
# before reading it).
MAX_MODEL_FILE_BYTES = 60 << 20
MAX_HEADER_BYTES = 16 << 20  # safetensors itself refuses headers over 100 MB
MAX_LAYERS = 256
MAX_CLASSES = 256  # also bounds the confusion matrix a round's metrics carry

Weights = dict[str, np.ndarray]
_DTYPES = {"float32", "float64", "float16", "int64"}


class ModelFileError(Exception):
    """A model file that cannot be read or does not describe a usable network.

    The message names what is wrong (and the file, when a path was given); it holds no weights.
    """


# --- The architecture ---------------------------------------------------------------------------


class _Layer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Conv2d(_Layer):
    type: Literal["conv2d"] = "conv2d"
    in_channels: Annotated[int, Field(ge=1, le=65_536)]
    out_channels: Annotated[int, Field(ge=1, le=65_536)]
    kernel_size: Annotated[int, Field(ge=1, le=64)]
    stride: Annotated[int, Field(ge=1, le=64)] = 1
    padding: Annotated[int, Field(ge=0, le=64)] = 0
    bias: bool = True


class Linear(_Layer):
    type: Literal["linear"] = "linear"
    in_features: Annotated[int, Field(ge=1, le=1 << 24)]
    out_features: Annotated[int, Field(ge=1, le=1 << 24)]
    bias: bool = True


class MaxPool2d(_Layer):
    type: Literal["maxpool2d"] = "maxpool2d"
    kernel_size: Annotated[int, Field(ge=1, le=64)]
    stride: Annotated[int, Field(ge=1, le=64)] | None = None


class AvgPool2d(_Layer):
    type: Literal["avgpool2d"] = "avgpool2d"
    kernel_size: Annotated[int, Field(ge=1, le=64)]
    stride: Annotated[int, Field(ge=1, le=64)] | None = None


class AdaptiveAvgPool2d(_Layer):
    type: Literal["adaptive_avgpool2d"] = "adaptive_avgpool2d"
    output_size: Annotated[int, Field(ge=1, le=4096)]


class BatchNorm1d(_Layer):
    type: Literal["batchnorm1d"] = "batchnorm1d"
    num_features: Annotated[int, Field(ge=1, le=1 << 20)]


class BatchNorm2d(_Layer):
    type: Literal["batchnorm2d"] = "batchnorm2d"
    num_features: Annotated[int, Field(ge=1, le=1 << 20)]


class Dropout(_Layer):
    type: Literal["dropout"] = "dropout"
    p: Annotated[float, Field(ge=0, lt=1)] = 0.5


class LeakyReLU(_Layer):
    type: Literal["leaky_relu"] = "leaky_relu"
    negative_slope: Annotated[float, Field(ge=0, le=1)] = 0.01


class Activation(_Layer):
    type: Literal["relu", "gelu", "tanh", "sigmoid", "flatten"]


Layer = Annotated[
    Conv2d
    | Linear
    | MaxPool2d
    | AvgPool2d
    | AdaptiveAvgPool2d
    | BatchNorm1d
    | BatchNorm2d
    | Dropout
    | LeakyReLU
    | Activation,
    Field(discriminator="type"),
]


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def _params(index: int, layer: Any) -> list[ParamSpec]:
    p = f"{index}."
    if isinstance(layer, Conv2d):
        k = layer.kernel_size
        out = [ParamSpec(p + "weight", (layer.out_channels, layer.in_channels, k, k), "float32")]
        return out + (
            [ParamSpec(p + "bias", (layer.out_channels,), "float32")] if layer.bias else []
        )
    if isinstance(layer, Linear):
        out = [ParamSpec(p + "weight", (layer.out_features, layer.in_features), "float32")]
        return out + (
            [ParamSpec(p + "bias", (layer.out_features,), "float32")] if layer.bias else []
        )
    if isinstance(layer, BatchNorm1d | BatchNorm2d):
        n = (layer.num_features,)
        return [
            ParamSpec(p + "weight", n, "float32"),
            ParamSpec(p + "bias", n, "float32"),
            ParamSpec(p + "running_mean", n, "float32"),
            ParamSpec(p + "running_var", n, "float32"),
            ParamSpec(p + "num_batches_tracked", (), "int64"),
        ]
    return []


def _pool_out(size: int, kernel: int, stride: int) -> int:
    return (size - kernel) // stride + 1


def _next_shape(index: int, layer: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The output shape of `layer` for one sample of `shape`; ValueError if it does not fit."""
    where = f"layer {index} ({layer.type})"
    if isinstance(layer, Conv2d | MaxPool2d | AvgPool2d | AdaptiveAvgPool2d | BatchNorm2d):
        if len(shape) != 3:
            raise ValueError(f"{where} needs a (channels, height, width) input, gets {list(shape)}")
        c, h, w = shape
        if isinstance(layer, Conv2d):
            if c != layer.in_channels:
                raise ValueError(f"{where} expects {layer.in_channels} input channels, gets {c}")
            k, s, pad = layer.kernel_size, layer.stride, layer.padding
            h2, w2 = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
            c2 = layer.out_channels
        elif isinstance(layer, MaxPool2d | AvgPool2d):
            k = layer.kernel_size
            s = layer.stride or k
            h2, w2, c2 = _pool_out(h, k, s), _pool_out(w, k, s), c
        elif isinstance(layer, AdaptiveAvgPool2d):
            h2 = w2 = layer.output_size
            c2 = c
        else:
            if c != layer.num_features:
                raise ValueError(f"{where} expects {layer.num_features} channels, gets {c}")
            return shape
        if h2 < 1 or w2 < 1:
            raise ValueError(f"{where} shrinks a {h}x{w} input to nothing")
        return (c2, h2, w2)
    if isinstance(layer, Linear):
        if shape != (layer.in_features,):
            raise ValueError(
                f"{where} expects {layer.in_features} input features, gets shape {list(shape)}"
                + (" (add a flatten layer before it)" if len(shape) > 1 else "")
            )
        return (layer.out_features,)
    if isinstance(layer, BatchNorm1d):
        if shape != (layer.num_features,):
            raise ValueError(f"{where} expects {layer.num_features} features, gets {list(shape)}")
        return shape
    if isinstance(layer, Activation) and layer.type == "flatten":
        return (int(np.prod(shape)),)
    return shape


class Architecture(BaseModel):
    """A feed-forward classifier: `layers` applied in order map `input_shape` to class logits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_shape: Annotated[
        list[Annotated[int, Field(ge=1, le=1 << 20)]], Field(min_length=1, max_length=3)
    ]
    num_classes: Annotated[int, Field(ge=2, le=MAX_CLASSES)]
    layers: Annotated[list[Layer], Field(min_length=1, max_length=MAX_LAYERS)]
    class_names: list[Annotated[str, Field(min_length=1, max_length=128)]] | None = None

    @model_validator(mode="after")
    def _chain(self) -> Architecture:
        shape = tuple(self.input_shape)
        for i, layer in enumerate(self.layers):
            shape = _next_shape(i, layer, shape)
        if shape != (self.num_classes,):
            raise ValueError(
                f"the last layer gives shape {list(shape)}, expected [{self.num_classes}] "
                "(one logit per class)"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"class_names has {len(self.class_names)} names for {self.num_classes} classes"
            )
        return self

    def parameters(self) -> list[ParamSpec]:
        """Every tensor the network holds, in `nn.Sequential` order and naming."""
        out: list[ParamSpec] = []
        for i, layer in enumerate(self.layers):
            out.extend(_params(i, layer))
        return out

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            raise ModelFileError(f"invalid architecture: {_first_error(exc)}") from None


def _first_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else err.get("msg", "invalid"))
    return "; ".join(parts)


# --- Reading and writing ------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFile:
    architecture: Architecture
    weights: Weights
    sha256: str
    size: int

    @property
    def num_parameters(self) -> int:
        return int(sum(a.size for a in self.weights.values()))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _header(data: bytes) -> dict[str, Any]:
    if len(data) < 8:
        raise ModelFileError("not a safetensors file: shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise ModelFileError("not a safetensors file: header length is out of range")
    try:
        header = json.loads(data[8 : 8 + length])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ModelFileError("not a safetensors file: the header is not JSON") from None
    if not isinstance(header, dict):
        raise ModelFileError("not a safetensors file: the header is not a JSON object")
    return header


def weights_from_safetensors(data: bytes) -> Weights:
    """Tensors of a safetensors buffer as numpy arrays (no pickle involved)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    _header(data)
    try:
        return dict(load(data))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise ModelFileError(f"unreadable safetensors data: {exc}") from None


_ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}


def weights_to_safetensors(
    weights: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Weights as safetensors bytes, deterministically: the same weights and metadata always give
    the same bytes (and SHA-256). The safetensors library writes its metadata map in a random
    order, so the header is written here: keys sorted, tensors in name order, padded to 8 bytes."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    buffers: list[bytes] = []
    offset = 0
    for name in sorted(weights):
        arr = np.asarray(weights[name])
        code = _ST_DTYPES.get(str(arr.dtype))
        if code is None:
            raise ModelFileError(
                f"tensor {name} has dtype {arr.dtype}, which safetensors cannot hold"
            )
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        buffers.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(buffers)


def check_weights(architecture: Architecture, weights: Mapping[str, np.ndarray]) -> None:
    """Raise ModelFileError unless `weights` holds exactly the architecture's tensors."""
    expected = {p.name: p for p in architecture.parameters()}
    missing = [n for n in expected if n not in weights]
    extra = sorted(n for n in weights if n not in expected)
    if missing:
        raise ModelFileError(f"weights are missing for {', '.join(missing[:5])}")
    if extra:
        raise ModelFileError(
            f"weights hold tensors the architecture does not have: {', '.join(extra[:5])}"
        )
    for name, spec in expected.items():
        arr = weights[name]
        if tuple(arr.shape) != spec.shape:
            raise ModelFileError(
                f"tensor {name} has shape {list(arr.shape)}, the architecture needs {list(spec.shape)}"
            )
        if str(arr.dtype) not in _DTYPES:
            raise ModelFileError(f"tensor {name} has unsupported dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ModelFileError(f"tensor {name} holds NaN or infinite values")


def parse_model_bytes(data: bytes) -> ModelFile:
    """Check and read a model file's bytes; ModelFileError says what is wrong."""
    header = _header(data)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get(META_FORMAT) != FORMAT_NAME:
        raise ModelFileError(
            "a safetensors file but not a fedsky model file: its metadata has no "
            f"'{META_FORMAT}: {FORMAT_NAME}' (see docs/model-format.md)"
        )
    if meta.get(META_VERSION) != FORMAT_VERSION:
        raise ModelFileError(
            f"model file format version {meta.get(META_VERSION)!r} is not supported "
            f"(this fedsky reads version {FORMAT_VERSION})"
        )
    arch_text = meta.get(META_ARCHITECTURE)
    if not isinstance(arch_text, str):
        raise ModelFileError("the model file's metadata has no architecture")
    architecture = Architecture.from_json(arch_text)
    weights = weights_from_safetensors(data)
    check_weights(architecture, weights)
    return ModelFile(
        architecture=architecture, weights=weights, sha256=digest(data), size=len(data)
    )


def read_model_file(path: str | Path) -> ModelFile:
    """Read and check a model file; the error names the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read model file: {exc.strerror}") from None
    try:
        return parse_model_bytes(data)
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from None


validate_model_file = read_model_file


def model_bytes(architecture: Architecture, weights: Mapping[str, np.ndarray]) -> bytes:
    check_weights(architecture, weights)
    return weights_to_safetensors(
        weights,
        {
            META_FORMAT: FORMAT_NAME,
            META_VERSION: FORMAT_VERSION,
            META_ARCHITECTURE: architecture.to_json(),
        },
    )


def write_model_file(
    path: str | Path, architecture: Architecture, weights: Mapping[str, np.ndarray]
) -> str:
    """Write a model file (atomically) and return its SHA-256."""
    data = model_bytes(architecture, weights)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return digest(data)


def cast_like(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Weights:
    """`weights` in the dtypes of `reference` (averaging turns int64 counters into floats)."""
    out: Weights = {}
    for name, ref in reference.items():
        arr = np.asarray(weights[name])
        if ref.dtype.kind in "iu":
            arr = np.rint(arr)
        out[name] = arr.astype(ref.dtype, copy=False).reshape(ref.shape)
    return out


# --- Flower records -----------------------------------------------------------------------------


def to_array_record(weights: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Weights as a Flower ArrayRecord keyed by tensor name (serialised as .npy, no pickle)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(np.ascontiguousarray(arr)) for name, arr in weights.items()})


def from_array_record(record: ArrayRecord, architecture: Architecture | None = None) -> Weights:
    """Weights from an ArrayRecord; with `architecture`, scalars get their shape back (Flower
    sends a 0-d array as shape [1])."""
    out = {name: arr.numpy() for name, arr in record.items()}
    if architecture is not None:
        for spec in architecture.parameters():
            arr = out.get(spec.name)
            if arr is not None and arr.shape != spec.shape and arr.size == int(np.prod(spec.shape)):
                out[spec.name] = arr.reshape(spec.shape)
    return out


# --- torch (only where training happens) --------------------------------------------------------


def build_module(architecture: Architecture) -> torch.nn.Sequential:
    """The declared network as a torch module with torch's default initial weights."""
    import torch
    from torch import nn

    mods: list[nn.Module] = []
    for layer in architecture.layers:
        if isinstance(layer, Conv2d):
            mods.append(
                nn.Conv2d(
                    layer.in_channels,
                    layer.out_channels,
                    layer.kernel_size,
                    stride=layer.stride,
                    padding=layer.padding,
                    bias=layer.bias,
                )
            )
        elif isinstance(layer, Linear):
            mods.append(nn.Linear(layer.in_features, layer.out_features, bias=layer.bias))
        elif isinstance(layer, MaxPool2d):
            mods.append(nn.MaxPool2d(layer.kernel_size, stride=layer.stride))
        elif isinstance(layer, AvgPool2d):
            mods.append(nn.AvgPool2d(layer.kernel_size, stride=layer.stride))
        elif isinstance(layer, AdaptiveAvgPool2d):
            mods.append(nn.AdaptiveAvgPool2d(layer.output_size))
        elif isinstance(layer, BatchNorm1d):
            mods.append(nn.BatchNorm1d(layer.num_features))
        elif isinstance(layer, BatchNorm2d):
            mods.append(nn.BatchNorm2d(layer.num_features))
        elif isinstance(layer, Dropout):
            mods.append(nn.Dropout(layer.p))
        elif isinstance(layer, LeakyReLU):
            mods.append(nn.LeakyReLU(layer.negative_slope))
        else:
            simple: dict[str, type[nn.Module]] = {
                "relu": nn.ReLU,
                "gelu": nn.GELU,
                "tanh": nn.Tanh,
                "sigmoid": nn.Sigmoid,
                "flatten": nn.Flatten,
            }
            mods.append(simple[layer.type]())
    module = nn.Sequential(*mods)
    module.to(torch.float32)
    return module


def load_weights(module: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Copy `weights` into `module` (names and shapes must match exactly)."""
    import torch

    state = {name: torch.from_numpy(np.array(arr, copy=True)) for name, arr in weights.items()}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(
            f"weights do not fit the network: {str(exc).splitlines()[0]}"
        ) from None


def module_weights(module: torch.nn.Module) -> Weights:
    return {name: t.detach().cpu().numpy().copy() for name, t in module.state_dict().items()}


# --- Examples -----------------------------------------------------------------------------------

ExampleName = Literal["digits", "breast_cancer", "xray"]
EXAMPLES: tuple[ExampleName, ...] = ("digits", "breast_cancer", "xray")


def example_architecture(name: ExampleName) -> Architecture:
    """The demo networks: a CNN for 8x8 digits, an MLP for breast_cancer's 30 features, and a
    CNN for 64x64 grey images whose weights are about 26 MB (the original study's size)."""
    if name == "digits":
        layers: list[dict[str, Any]] = [
            {
                "type": "conv2d",
                "in_channels": 1,
                "out_channels": 16,
                "kernel_size": 3,
                "padding": 1,
            },
            {"type": "relu"},
            {
                "type": "conv2d",
                "in_channels": 16,
                "out_channels": 32,
                "kernel_size": 3,
                "padding": 1,
            },
            {"type": "relu"},
            {"type": "maxpool2d", "kernel_size": 2},
            {"type": "flatten"},
            {"type": "linear", "in_features": 32 * 4 * 4, "out_features": 64},
            {"type": "relu"},
            {"type": "linear", "in_features": 64, "out_features": 10},
        ]
        return Architecture.model_validate(
            {"input_shape": [1, 8, 8], "num_classes": 10, "layers": layers}
        )
    if name == "breast_cancer":
        layers = [
            {"type": "linear", "in_features": 30, "out_features": 32},
            {"type": "relu"},
            {"type": "linear", "in_features": 32, "out_features": 16},
            {"type": "relu"},
            {"type": "linear", "in_features": 16, "out_features": 2},
        ]
        return Architecture.model_validate(
            {
                "input_shape": [30],
                "num_classes": 2,
                "layers": layers,
                "class_names": ["malignant", "benign"],
            }
        )
    layers = [
        {"type": "conv2d", "in_channels": 1, "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "conv2d", "in_channels": 16, "out_channels": 32, "kernel_size": 3, "padding": 1},
        {"type": "relu"},
        {"type": "maxpool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "in_features": 32 * 16 * 16, "out_features": 800},
        {"type": "relu"},
        {"type": "dropout", "p": 0.25},
        {"type": "linear", "in_features": 800, "out_features": 2},
    ]
    return Architecture.model_validate(
        {
            "input_shape": [1, 64, 64],
            "num_classes": 2,
            "layers": layers,
            "class_names": ["normal", "covid"],
        }
    )


def make_example(name: ExampleName, path: str | Path, *, seed: int = 0) -> str:
    """Write an example model file with torch's default initialisation under `seed`."""
    import torch

    architecture = example_architecture(name)
    torch.manual_seed(seed)
    module = build_module(architecture)
    return write_model_file(path, architecture, module_weights(module))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fedsky.shared.modelfile", description="Make and check fedsky model files."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    mk = sub.add_parser("make-example", help="write a demo model file")
    mk.add_argument("name", choices=EXAMPLES)
    mk.add_argument("output")
    mk.add_argument("--seed", type=int, default=0)
    ck = sub.add_parser("check", help="check a model file and print its summary")
    ck.add_argument("file")
    args = parser.parse_args(argv)
    if args.cmd == "make-example":
        sha = make_example(args.name, args.output, seed=args.seed)
        print(f"wrote {args.output} (sha256 {sha})")
        return 0
    try:
        mf = read_model_file(args.file)
    except ModelFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    arch = mf.architecture
    print(f"{args.file}: ok")
    print(f"  sha256      {mf.sha256}")
    print(f"  size        {mf.size} bytes, {mf.num_parameters} parameters")
    print(f"  input       {arch.input_shape}, {arch.num_classes} classes")
    print(f"  layers      {', '.join(layer.type for layer in arch.layers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
