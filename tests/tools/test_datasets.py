"""Datasets: image folders (formats, sizes, colour, corrupt files, bad layouts), Fashion-MNIST from the Debian
package, deterministic stratified splits and the model-input arithmetic."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgecv.agent.contract.bundle import InputSpec
from edgecv.tools.datasets import (
    FASHION_MNIST_CLASSES,
    Dataset,
    default_input_spec,
    load_fashion_mnist,
    load_image_folder,
    load_splits,
    parse_size,
    read_idx,
    stratified_order,
    to_model_input,
)
from edgecv.tools.errors import DatasetError
from tests.tools.conftest import ImageFolder, make_image_folder


def test_folder_loads_every_format_resizes_and_reports_corrupt_files(image_folder: ImageFolder,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgecv.tools.datasets"):
        ds = load_image_folder(image_folder.root)
    assert ds.classes == list(image_folder.classes)  # the empty class folder is skipped
    assert len(ds) == image_folder.readable
    assert ds.images.shape[1:] == (*image_folder.size, 3)  # most common size wins over the odd 40x48 ones
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
    assert np.bincount(ds.labels).tolist() == [image_folder.readable // 3] * 3
    assert sorted(ds.skipped) == list(image_folder.corrupt)
    text = caplog.text
    assert "Skipped 2 unreadable image file(s)" in text and "broken.jpg" in text
    assert "zz_empty" in text  # empty class folder warned about


def test_folder_is_rgb_ordered_and_gray_and_explicit_size_work(image_folder: ImageFolder) -> None:
    ds = load_image_folder(image_folder.root)
    circle = ds.images[ds.labels == ds.classes.index("circle")].reshape(-1, 3).astype(float)
    red = circle[circle.max(axis=1) > 150]
    assert red[:, 0].mean() > 180 and red[:, 2].mean() < 90  # drawn red in BGR, must come out R-first
    gray = load_image_folder(image_folder.root, size="16x24", color="gray")
    assert gray.images.shape == (image_folder.readable, 16, 24, 1)


def test_folder_errors_are_single_clear_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_splits(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        load_image_folder(tmp_path / "file.txt")
    one = make_image_folder(tmp_path / "one", classes=1, per_class=3, corrupt=False)
    with pytest.raises(DatasetError, match=r"at least 2 class sub-folders.*found only 'circle'"):
        load_image_folder(one.root)
    only_empty = tmp_path / "empty"
    (only_empty / "a").mkdir(parents=True)
    (only_empty / "b").mkdir()
    with pytest.raises(DatasetError, match="found none"):
        load_image_folder(only_empty)
    # two class folders, but every file of one class is corrupt: fewer than 2 usable classes
    broken = make_image_folder(tmp_path / "broken", classes=2, per_class=2, corrupt=False, empty_class=False)
    for f in (broken.root / "square").iterdir():
        f.write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="readable images in 1 class"):
        load_image_folder(broken.root)


def test_folders_starting_with_underscore_or_dot_are_not_classes(
        image_folder_factory: Callable[..., ImageFolder]) -> None:
    # A collected, partly labelled dataset (docs/DATASETS.md): images waiting in _unlabelled, rejects in _junk,
    # plus a hidden folder; none of them may become a training class.
    folder = image_folder_factory(classes=2, per_class=4, corrupt=False, empty_class=False, formats=(".png",))
    for reserved in ("_unlabelled", "_junk", ".cache"):
        make_image_folder(folder.root / reserved, classes=1, per_class=3, corrupt=False, empty_class=False,
                          formats=(".jpg",))
    (folder.root / "_labels.log").write_text("{}\n")
    ds = load_image_folder(folder.root)
    assert ds.classes == list(folder.classes)
    assert len(ds) == 8
    splits = load_splits(folder.root, limit=6)
    assert splits.classes == list(folder.classes)


@pytest.mark.parametrize("text", ["abc", "12x", "3x3", "1x2x3", "99999x10"])
def test_bad_size_strings_are_rejected(text: str) -> None:
    with pytest.raises(DatasetError, match="size"):
        parse_size(text)


def test_parse_size_forms() -> None:
    assert parse_size("64x48") == (64, 48) and parse_size("32") == (32, 32) and parse_size((5, 7)) == (5, 7)
    assert parse_size(None) is None


def test_folder_splits_are_stratified_disjoint_and_seeded(image_folder: ImageFolder) -> None:
    a = load_splits(image_folder.root, seed=3, val_fraction=0.25, test_fraction=0.25)
    b = load_splits(image_folder.root, seed=3, val_fraction=0.25, test_fraction=0.25)
    c = load_splits(image_folder.root, seed=4, val_fraction=0.25, test_fraction=0.25)
    assert (len(a.train), len(a.val), len(a.test)) == (18, 9, 9)
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(a, part).images, getattr(b, part).images)
        assert np.bincount(getattr(a, part).labels).tolist() == [len(getattr(a, part)) // 3] * 3
    assert not np.array_equal(a.test.images, c.test.images)
    # disjoint: every image lands in exactly one split
    keys = [img.tobytes() for part in (a.train, a.val, a.test) for img in part.images]
    assert len(set(keys)) == image_folder.readable


def test_limit_reads_a_class_balanced_subset(image_folder_factory: Callable[..., ImageFolder]) -> None:
    folder = image_folder_factory(corrupt=False, per_class=6)
    s = load_splits(folder.root, limit=9, val_fraction=0.0, test_fraction=0.0)
    assert len(s.train) == 9 and np.bincount(s.train.labels).tolist() == [3, 3, 3]
    with pytest.raises(DatasetError, match="--limit"):
        load_splits(folder.root, limit=1)


def test_stratified_order_prefix_is_balanced() -> None:
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    order = stratified_order(labels, seed=0)
    assert sorted(order.tolist()) == list(range(200))
    assert np.bincount(labels[order[:40]], minlength=4).tolist() == [10, 10, 10, 10]
    assert np.array_equal(order, stratified_order(labels, seed=0))


def test_fashion_mnist_from_debian_package(fashion_mnist_dir: Path) -> None:
    test = load_fashion_mnist("test", root=fashion_mnist_dir)
    assert test.images.shape == (10000, 28, 28, 1) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes == list(FASHION_MNIST_CLASSES) and test.classes[0] == "T-shirt/top"
    assert 60 < test.images.mean() < 90  # real pixel data, not zeros


def test_fashion_mnist_splits_limit_and_colour(fashion_mnist_dir: Path) -> None:
    s = load_splits("fashion-mnist", limit=200, seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == (180, 20, 200)
    assert np.bincount(s.train.labels).tolist() == [18] * 10 and np.bincount(s.val.labels).tolist() == [2] * 10
    assert s.train.images.shape[1:] == (28, 28, 1)
    again = load_splits("fashion-mnist", limit=200, seed=1)
    assert np.array_equal(s.val.images, again.val.images)
    rgb = load_splits("fashion-mnist", limit=20, color="rgb", size="32x32")
    assert rgb.test.images.shape == (20, 32, 32, 3)
    assert np.array_equal(rgb.test.images[..., 0], rgb.test.images[..., 2])


def test_missing_fashion_mnist_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)


def test_read_idx_parses_and_rejects(tmp_path: Path) -> None:
    good = tmp_path / "x-idx3-ubyte.gz"
    payload = np.arange(24, dtype=np.uint8)
    with gzip.open(good, "wb") as fh:
        fh.write(bytes([0, 0, 0x08, 3]) + b"".join(n.to_bytes(4, "big") for n in (2, 3, 4)) + payload.tobytes())
    assert np.array_equal(read_idx(good), payload.reshape(2, 3, 4))
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as fh:
        fh.write(b"\x01\x02\x03\x04")
    with pytest.raises(DatasetError, match="bad magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 0x08, 1]) + (100).to_bytes(4, "big") + b"\x00" * 10)
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(short)


def test_to_model_input_matches_the_spec_arithmetic() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 4, 5, 3), dtype=np.uint8)
    spec = InputSpec(width=5, height=4, channels=3, color="RGB", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    x = to_model_input(images, spec)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32
    expect = (images[1, 2, 3, 2] / 255.0 - 0.3) / 0.5
    assert x[1, 2, 2, 3] == pytest.approx(expect, rel=1e-5)
    bgr = to_model_input(images, InputSpec(width=5, height=4, channels=3, color="BGR", layout="NHWC"))
    assert bgr.shape == (2, 4, 5, 3)
    assert bgr[0, 0, 0, 0] == pytest.approx(images[0, 0, 0, 2] / 255.0)
    with pytest.raises(DatasetError, match="do not match the model input"):
        to_model_input(images[:, :3], spec)


def test_default_input_spec_normalizes_with_data_statistics() -> None:
    images = np.full((4, 6, 6, 1), 51, dtype=np.uint8)
    images[:2] = 153
    spec = default_input_spec(Dataset(images, np.zeros(4, np.int64), ["a", "b"]))
    assert (spec.width, spec.height, spec.channels, spec.color, spec.layout) == (6, 6, 1, "GRAY", "NCHW")
    assert spec.mean == (pytest.approx(0.4),) and spec.std == (pytest.approx(0.2),)
    x = to_model_input(images, spec)
    assert x.mean() == pytest.approx(0.0, abs=1e-3) and x.std() == pytest.approx(1.0, abs=1e-3)
