"""Local datasets: bundled sets with partitions, image folders, and errors without paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fedsky.shared.config import ConfigError
from fedsky.shared.datasets import (
    BundledDatasetSpec,
    DatasetCatalog,
    DatasetError,
    ImageFolderSpec,
    Partition,
    load_catalog,
    load_dataset,
    partition_indices,
    scrub,
    write_catalog,
)
from PIL import Image
from pydantic import ValidationError
from sklearn.datasets import load_breast_cancer, load_digits


def test_bundled_sets_equal_sklearn() -> None:
    d = load_dataset(
        BundledDatasetSpec(kind="digits", eval_fraction=0.25), input_shape=[64], num_classes=10
    )
    ref = load_digits()
    assert d.train_examples + d.eval_examples == len(ref.target) == 1797
    x = np.concatenate([d.x_train, d.x_eval])
    y = np.concatenate([d.y_train, d.y_eval])
    order = np.lexsort(x.T)
    ref_order = np.lexsort((ref.data / 16.0).T)
    assert np.allclose(x[order], ref.data[ref_order] / 16.0)
    assert np.array_equal(y[order], ref.target[ref_order])
    assert d.eval_examples == 450
    bc = load_dataset(BundledDatasetSpec(kind="breast_cancer"), input_shape=[30], num_classes=2)
    assert bc.train_examples + bc.eval_examples == len(load_breast_cancer().target) == 569
    assert abs(float(bc.x_train.mean())) < 1e-5  # standardised with the site's own statistics


@pytest.mark.parametrize("scheme", ["iid", "label-skew"])
def test_partitions_are_disjoint_and_cover(scheme: str) -> None:
    labels = load_digits().target
    parts = [
        partition_indices(labels, Partition(index=i, count=3, scheme=scheme, seed=7))
        for i in range(3)
    ]  # type: ignore[arg-type]
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined.tolist())) == len(labels)
    assert all(len(p) >= 10 for p in parts)
    shares = np.array([np.bincount(labels[p], minlength=10) / len(p) for p in parts])
    spread = float(np.abs(shares - shares.mean(axis=0)).max())
    if scheme == "iid":
        assert spread < 0.1
    else:
        assert spread > 0.15  # non-IID: the sites' class mixes differ clearly


def test_partitioned_dataset_shapes_for_the_cnn() -> None:
    spec = BundledDatasetSpec(
        kind="digits", partition=Partition(index=1, count=3, scheme="label-skew", seed=7)
    )
    d = load_dataset(spec, input_shape=[1, 8, 8], num_classes=10)
    assert d.x_train.shape[1:] == (1, 8, 8)
    assert d.x_train.dtype == np.float32
    assert d.y_train.dtype == np.int64
    again = load_dataset(spec, input_shape=[1, 8, 8], num_classes=10)
    assert np.array_equal(d.y_eval, again.y_eval)


def test_bundled_shape_and_class_mismatches() -> None:
    with pytest.raises(DatasetError, match="64 values each"):
        load_dataset(BundledDatasetSpec(kind="digits"), input_shape=[1, 28, 28], num_classes=10)
    with pytest.raises(DatasetError, match="has 2 classes; the model has 10"):
        load_dataset(BundledDatasetSpec(kind="breast_cancer"), input_shape=[30], num_classes=10)
    with pytest.raises(DatasetError, match="raise alpha or lower count"):
        partition_indices(
            np.arange(40) % 2, Partition(index=0, count=4, scheme="label-skew", alpha=0.01)
        )


def _image_folder(
    root: Path, split: str, counts: dict[str, int], size: tuple[int, int] = (20, 16)
) -> None:
    rng = np.random.default_rng(0)
    for cls, n in counts.items():
        d = root / split / cls
        d.mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            ext = "png" if i % 2 == 0 else "jpg"
            Image.fromarray(arr).save(d / f"img{i}.{ext}")


def test_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "covid-xray"
    _image_folder(root, "train", {"normal": 6, "covid": 4})
    _image_folder(root, "test", {"normal": 2, "covid": 3})
    (root / "train" / "normal" / "notes.txt").write_text("ignored")
    spec = ImageFolderSpec(kind="image-folder", root=root)
    d = load_dataset(spec, input_shape=[1, 12, 12], num_classes=2, class_names=["normal", "covid"])
    assert d.x_train.shape == (10, 1, 12, 12)
    assert d.x_eval.shape == (5, 1, 12, 12)
    assert d.x_train.min() >= 0.0
    assert d.x_train.max() <= 1.0
    assert np.bincount(d.y_train).tolist() == [6, 4]  # label = index in the model's class names
    assert np.bincount(d.y_eval).tolist() == [2, 3]
    # Without class names the sorted folder names are the labels; without a test split,
    # eval_fraction of train is held out.
    d2 = load_dataset(
        ImageFolderSpec(kind="image-folder", root=root, eval_split=None, eval_fraction=0.3),
        input_shape=[3, 8, 8],
        num_classes=2,
    )
    assert d2.x_train.shape[1:] == (3, 8, 8)
    assert d2.train_examples == 7
    assert d2.eval_examples == 3


def test_image_folder_errors_keep_paths_private(tmp_path: Path) -> None:
    root = tmp_path / "secret-hospital-share"
    _image_folder(root, "train", {"normal": 2, "covid": 2, "other": 1})
    (root / "train" / "covid" / "broken.png").write_bytes(b"not an image")
    cases = [
        (
            ImageFolderSpec(kind="image-folder", root=root),
            ["normal", "covid"],
            "'other' are not among",
        ),
        (ImageFolderSpec(kind="image-folder", root=root), None, "3 class folders"),
        (
            ImageFolderSpec(kind="image-folder", root=root, train_split="training"),
            None,
            "no 'training' split",
        ),
    ]
    for spec, names, message in cases:
        with pytest.raises(DatasetError) as err:
            load_dataset(spec, input_shape=[1, 8, 8], num_classes=2, class_names=names)
        assert message in err.value.public_message
        assert str(tmp_path) not in err.value.public_message
    (root / "train" / "other" / "img0.png").unlink()
    (root / "train" / "other").rmdir()
    with pytest.raises(DatasetError) as err:
        load_dataset(
            ImageFolderSpec(kind="image-folder", root=root),
            input_shape=[1, 8, 8],
            num_classes=2,
            class_names=["normal", "covid"],
        )
    assert "cannot be read" in err.value.public_message
    assert "secret-hospital-share" not in err.value.public_message
    assert "broken.png" in str(err.value)  # the local log gets the detail


def test_catalog_files(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    toml = tmp_path / "datasets.toml"
    toml.write_text("""
[datasets.xray]
kind = "image-folder"
root = "data"
[datasets.digits]
kind = "digits"
partition = { index = 2, count = 3, scheme = "label-skew", seed = 7 }
""")
    cat = load_catalog(toml)
    xray = cat.resolve("xray", site="hospital-a")
    assert isinstance(xray, ImageFolderSpec)
    assert xray.root == (tmp_path / "data").resolve()
    out = write_catalog(tmp_path / "out.json", cat.datasets)
    assert out.stat().st_mode & 0o077 == 0
    assert load_catalog(out) == cat
    with pytest.raises(DatasetError) as err:
        cat.resolve("chest", site="hospital-a")
    assert err.value.public_message == "dataset 'chest' is not configured at site 'hospital-a'"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"datasets": {"x": {"kind": "mnist"}}}))
    with pytest.raises(ConfigError, match=r"bad\.json: key 'datasets\.x'"):
        load_catalog(bad)
    with pytest.raises(ValidationError, match="partition index 3 must be below count 3"):
        DatasetCatalog.model_validate(
            {"datasets": {"d": {"kind": "digits", "partition": {"index": 3, "count": 3}}}}
        )


def test_scrub() -> None:
    text = "cannot open /srv/data/covid/x1.png in ~/shares/x and C:\\data\\a.png; 85000 KRW/month aws:us-east-1 1/2"
    out = scrub(text, ["/srv/data"])
    assert "/srv" not in out
    assert "shares" not in out
    assert "C:\\data" not in out
    assert "85000 KRW/month aws:us-east-1 1/2" in out
    assert scrub("see /x/y", []) == "see <path>"
