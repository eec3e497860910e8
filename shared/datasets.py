"""Local datasets: a job names a dataset, each hospital resolves the name in its own config.

The agent's config maps names to loaders (`DatasetSpec`, keyed by name):

    [datasets.xray]
    kind = "image-folder"            # <root>/<split>/<class>/*.png|jpg
    root = "/srv/data/covid-xray"
    train_split = "train"
    eval_split = "test"              # a missing folder: eval_fraction of train is held out

    [datasets.digits]
    kind = "digits"                  # scikit-learn's bundled 8x8 digits (1,797 images)
    partition = { index = 0, count = 3, scheme = "label-skew", seed = 7 }

Partitions let several hospitals hold different slices of one bundled set: every site uses the
same `count`, `scheme` and `seed` and its own `index`, so the slices are disjoint and together
cover the set. `label-skew` draws each class's share per site from a Dirichlet(`alpha`)
distribution (non-IID); `iid` deals samples out at random.

What may leave the site: counts and figures computed from the data, never a sample or a path.
`DatasetError.public_message` is the part of an error that may be sent off-site; `str(error)`
may name local paths and is for the site's own log.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fedsky.shared.config import ConfigError, load_config, parse_config, resolve_path
from fedsky.shared.jobspec import DATASET_NAME_PATTERN
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_PARTITION_SAMPLES = 10


class DatasetError(Exception):
    """A dataset that cannot be resolved or loaded.

    `public_message` names no local path and may be reported off-site; `str()` carries the
    detail (possibly with paths) for the local log.
    """

    def __init__(self, public_message: str, detail: str | None = None) -> None:
        super().__init__(detail or public_message)
        self.public_message = public_message


_ABS_PATH_RE = re.compile(r"(?<![\w.~>-])(?:[A-Za-z]:\\|/|~/)[^\s'\",;:)\]]*")


def scrub(text: str, secret_paths: Iterable[str | Path] = ()) -> str:
    """`text` with every given path, and anything that looks like an absolute path, replaced.

    Used on any failure text that leaves the site. Known paths go first (longest first, also
    resolved), then a catch-all for absolute paths the caller did not know about.
    """
    variants: set[str] = set()
    for p in secret_paths:
        s = str(p)
        if not s:
            continue
        variants.add(s)
        with contextlib.suppress(OSError, RuntimeError):
            variants.add(str(Path(s).expanduser().resolve()))
    for s in sorted(variants, key=len, reverse=True):
        text = text.replace(s, "<local path>")
    return _ABS_PATH_RE.sub("<path>", text)


# --- Specs --------------------------------------------------------------------------------------


class Partition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    index: Annotated[int, Field(ge=0)]
    count: Annotated[int, Field(ge=1, le=1024)]
    scheme: Literal["iid", "label-skew"] = "iid"
    seed: int = 0
    # Dirichlet concentration for label-skew: smaller is more skewed.
    alpha: Annotated[float, Field(gt=0, le=1000)] = 0.5

    @model_validator(mode="after")
    def _index_in_range(self) -> Partition:
        if self.index >= self.count:
            raise ValueError(f"partition index {self.index} must be below count {self.count}")
        return self


class _SpecBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    partition: Partition | None = None
    # Share of the (partition's) samples held out for evaluation when there is no eval split.
    eval_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    split_seed: int = 0


class BundledDatasetSpec(_SpecBase):
    kind: Literal["digits", "breast_cancer"]


class ImageFolderSpec(_SpecBase):
    kind: Literal["image-folder"]
    root: Path
    train_split: Annotated[str, Field(pattern=r"^[^/\\]{1,128}$")] = "train"
    eval_split: Annotated[str, Field(pattern=r"^[^/\\]{1,128}$")] | None = "test"

    @field_validator("root")
    @classmethod
    def _root(cls, value: Path, info: ValidationInfo) -> Path:
        return resolve_path(value, (info.context or {}).get("config_dir"))


DatasetSpec = Annotated[BundledDatasetSpec | ImageFolderSpec, Field(discriminator="kind")]


class DatasetCatalog(BaseModel):
    """The datasets a site offers, by name (what the agent hands its SuperNode)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    datasets: dict[Annotated[str, Field(pattern=DATASET_NAME_PATTERN)], DatasetSpec] = {}

    def resolve(self, name: str, *, site: str) -> BundledDatasetSpec | ImageFolderSpec:
        spec = self.datasets.get(name)
        if spec is None:
            raise DatasetError(f"dataset {name!r} is not configured at site {site!r}")
        return spec

    def local_paths(self) -> list[Path]:
        """Every path the catalog names (to scrub from failure texts)."""
        return [s.root for s in self.datasets.values() if isinstance(s, ImageFolderSpec)]


def load_catalog(path: str | Path) -> DatasetCatalog:
    """Read a catalog file: JSON (as written by `write_catalog`) or TOML."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return load_config(DatasetCatalog, path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read dataset config: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return parse_config(DatasetCatalog, data, path=path)


def write_catalog(
    path: str | Path, datasets: Mapping[str, BundledDatasetSpec | ImageFolderSpec]
) -> Path:
    """Write a catalog (JSON, owner-only: it names local paths) for a SuperNode to read."""
    path = Path(path)
    catalog = DatasetCatalog(datasets=dict(datasets))
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.touch(mode=0o600)
    tmp.write_text(catalog.model_dump_json(indent=2), encoding="utf-8")
    tmp.replace(path)
    return path


# --- Loaded data --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalData:
    """One site's training and evaluation arrays, shaped for the model."""

    x_train: np.ndarray  # float32, (n, *input_shape)
    y_train: np.ndarray  # int64, (n,)
    x_eval: np.ndarray
    y_eval: np.ndarray
    num_classes: int

    @property
    def train_examples(self) -> int:
        return len(self.y_train)

    @property
    def eval_examples(self) -> int:
        return len(self.y_eval)


def _sklearn_data_dir() -> Path | None:
    # The CSV files ship inside scikit-learn; reading them directly spares importing
    # sklearn.datasets (about 1.2 s measured), which every ClientApp process would pay.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return d if d.is_dir() else None


def _bundled(kind: str) -> tuple[np.ndarray, np.ndarray, int]:
    import numpy as np

    data_dir = _sklearn_data_dir()
    if data_dir is None:
        raise DatasetError(f"the bundled {kind} dataset needs scikit-learn, which is not installed")
    try:
        if kind == "digits":
            with gzip.open(data_dir / "digits.csv.gz", "rt") as f:
                raw = np.loadtxt(f, delimiter=",")
            x = raw[:, :-1].astype(np.float32) / 16.0
            y = raw[:, -1].astype(np.int64)
            return x, y, 10
        with open(data_dir / "breast_cancer.csv") as f:
            f.readline()  # "569,30,malignant,benign"
            raw = np.loadtxt(f, delimiter=",")
        return raw[:, :-1].astype(np.float32), raw[:, -1].astype(np.int64), 2
    except (OSError, ValueError) as exc:
        raise DatasetError(f"the bundled {kind} dataset cannot be read", str(exc)) from None


def partition_indices(labels: np.ndarray, partition: Partition) -> np.ndarray:
    """The sample indices of one partition; every site computes the same split."""
    import numpy as np

    n = len(labels)
    rng = np.random.default_rng(partition.seed)
    if partition.count == 1:
        return np.arange(n)
    if partition.scheme == "iid":
        order = rng.permutation(n)
        return np.sort(np.array_split(order, partition.count)[partition.index])
    classes = np.unique(labels)
    for _ in range(100):
        parts: list[list[int]] = [[] for _ in range(partition.count)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            shares = rng.dirichlet(np.full(partition.count, partition.alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= MIN_PARTITION_SAMPLES:
            return np.sort(np.array(parts[partition.index], dtype=np.int64))
    raise DatasetError(
        f"label-skew partition of {n} samples into {partition.count} parts leaves a part with "
        f"fewer than {MIN_PARTITION_SAMPLES} samples; raise alpha or lower count"
    )


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    if n < 2:
        raise DatasetError(f"a dataset of {n} sample(s) cannot be split into train and eval sets")
    order = np.random.default_rng(seed).permutation(n)
    n_eval = min(n - 1, max(1, math.ceil(n * fraction)))
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def _shape_for(x: np.ndarray, input_shape: Sequence[int], name: str) -> np.ndarray:
    import numpy as np

    per_sample = int(np.prod(x.shape[1:]))
    if per_sample != int(np.prod(input_shape)):
        raise DatasetError(
            f"{name} samples have {per_sample} values each; the model expects input shape "
            f"{list(input_shape)}"
        )
    return np.ascontiguousarray(x.reshape((len(x), *input_shape)), dtype=np.float32)


def _load_bundled(
    spec: BundledDatasetSpec, input_shape: Sequence[int], num_classes: int
) -> LocalData:
    import numpy as np

    x, y, classes = _bundled(spec.kind)
    if classes != num_classes:
        raise DatasetError(
            f"the {spec.kind} dataset has {classes} classes; the model has {num_classes}"
        )
    if spec.partition is not None:
        keep = partition_indices(y, spec.partition)
        x, y = x[keep], y[keep]
    tr, ev = _split(len(y), spec.eval_fraction, spec.split_seed)
    x_tr, x_ev = x[tr], x[ev]
    if spec.kind == "breast_cancer":
        # Standardise with this site's own training statistics: no figures from other sites.
        mean = x_tr.mean(axis=0)
        std = x_tr.std(axis=0)
        std[std == 0] = 1.0
        x_tr, x_ev = (x_tr - mean) / std, (x_ev - mean) / std
    return LocalData(
        x_train=_shape_for(x_tr, input_shape, spec.kind),
        y_train=y[tr].astype(np.int64),
        x_eval=_shape_for(x_ev, input_shape, spec.kind),
        y_eval=y[ev].astype(np.int64),
        num_classes=num_classes,
    )


def _image_files(split_dir: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = sorted(
            f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()
        )
        out[class_dir.name] = files
    return out


def _read_images(
    files: dict[str, list[Path]],
    class_index: Mapping[str, int],
    input_shape: Sequence[int],
    split: str,
) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    channels, height, width = (int(v) for v in input_shape)
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise DatasetError(
            f"image-folder datasets give 1 or 3 channels; the model wants {channels}"
        )
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for name, paths in files.items():
        for n, p in enumerate(paths):
            try:
                with Image.open(p) as img:
                    im = img.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise DatasetError(
                    f"image {n + 1} of class {name!r} in split {split!r} cannot be read",
                    f"{p}: {exc}",
                ) from None
            xs.append(arr[None, :, :] if channels == 1 else arr.transpose(2, 0, 1))
            ys.append(class_index[name])
    if not xs:
        raise DatasetError(f"split {split!r} holds no images")
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)


def _load_image_folder(
    spec: ImageFolderSpec,
    input_shape: Sequence[int],
    num_classes: int,
    class_names: Sequence[str] | None,
) -> LocalData:
    if len(input_shape) != 3:
        raise DatasetError(
            f"image-folder datasets give (channels, height, width) samples; the model expects "
            f"input shape {list(input_shape)}"
        )
    train_dir = spec.root / spec.train_split
    if not train_dir.is_dir():
        raise DatasetError(
            f"the image folder has no {spec.train_split!r} split", f"{train_dir} is not a directory"
        )
    train_files = _image_files(train_dir)
    eval_dir = spec.root / spec.eval_split if spec.eval_split else None
    eval_files = _image_files(eval_dir) if eval_dir is not None and eval_dir.is_dir() else None
    folders = sorted(set(train_files) | set(eval_files or {}))
    if class_names is not None:
        unknown = [f for f in folders if f not in class_names]
        if unknown:
            raise DatasetError(
                f"class folder(s) {', '.join(repr(u) for u in unknown)} are not among the model's "
                f"classes ({', '.join(class_names)})"
            )
        class_index = {name: i for i, name in enumerate(class_names)}
    else:
        if len(folders) != num_classes:
            raise DatasetError(
                f"the image folder has {len(folders)} class folders but the model has "
                f"{num_classes} classes and names none; give the model class_names"
            )
        class_index = {name: i for i, name in enumerate(folders)}
    x, y = _read_images(train_files, class_index, input_shape, spec.train_split)
    if spec.partition is not None:
        keep = partition_indices(y, spec.partition)
        x, y = x[keep], y[keep]
    if eval_files is not None:
        x_ev, y_ev = _read_images(eval_files, class_index, input_shape, str(spec.eval_split))
        if spec.partition is not None:
            keep = partition_indices(y_ev, spec.partition)
            x_ev, y_ev = x_ev[keep], y_ev[keep]
        return LocalData(x, y, x_ev, y_ev, num_classes)
    tr, ev = _split(len(y), spec.eval_fraction, spec.split_seed)
    return LocalData(x[tr], y[tr], x[ev], y[ev], num_classes)


def load_dataset(
    spec: BundledDatasetSpec | ImageFolderSpec,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    class_names: Sequence[str] | None = None,
) -> LocalData:
    """Load a dataset shaped for a model with `input_shape` and `num_classes` outputs."""
    if isinstance(spec, ImageFolderSpec):
        data = _load_image_folder(spec, input_shape, num_classes, class_names)
    else:
        data = _load_bundled(spec, input_shape, num_classes)
    if data.train_examples == 0 or data.eval_examples == 0:
        raise DatasetError("the dataset leaves no training or no evaluation samples")
    return data


def parse_catalog(data: dict[str, Any], *, path: Path) -> DatasetCatalog:
    """Validate catalog data embedded in another config (errors name `path`)."""
    return parse_config(DatasetCatalog, data, path=path)
