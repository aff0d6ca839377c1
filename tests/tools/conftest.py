"""Fixtures for the workstation tools: tiny generated image folders and tiny trained checkpoints.

`make_image_folder(root, ...)` draws one simple coloured shape per class (red circle, green square, blue
triangle, ...) on a noisy background, in mixed file formats and sizes, optionally with corrupt files and an
empty class folder. Everything is tiny so any tools test can train on it in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest

# (name, BGR colour, shape) per class; colour and shape both separate the classes
SHAPES = (("circle", (40, 40, 230), "circle"), ("square", (40, 200, 40), "square"),
          ("triangle", (230, 60, 40), "triangle"), ("cross", (30, 220, 230), "cross"))
FORMATS = (".png", ".jpg", ".bmp", ".webp", ".tif", ".ppm", ".gif", ".jpeg", ".tiff")


@dataclass(frozen=True)
class ImageFolder:
    """What `make_image_folder` wrote: `classes` (sorted, usable ones), `readable` image count,
    `corrupt` relative paths of unreadable files, `size` (h, w) of most images, `empty` class folder names."""

    root: Path
    classes: tuple[str, ...]
    readable: int
    corrupt: tuple[str, ...]
    size: tuple[int, int]
    empty: tuple[str, ...]


def draw_shape(kind: str, color: tuple[int, int, int], size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A BGR uint8 image of one filled shape with jittered position/size on a dark noisy background."""
    h, w = size
    img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
    r = int(min(h, w) * rng.uniform(0.22, 0.32))
    cx = int(w / 2 + rng.uniform(-0.12, 0.12) * w)
    cy = int(h / 2 + rng.uniform(-0.12, 0.12) * h)
    if kind == "circle":
        cv2.circle(img, (cx, cy), r, color, -1)
    elif kind == "square":
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), color, -1)
    elif kind == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], dtype=np.int32)
        cv2.fillPoly(img, [pts], color)
    else:
        t = max(1, r // 3)
        cv2.rectangle(img, (cx - r, cy - t), (cx + r, cy + t), color, -1)
        cv2.rectangle(img, (cx - t, cy - r), (cx + t, cy + r), color, -1)
    return img


def make_image_folder(root: Path, classes: int = 3, per_class: int = 12, size: tuple[int, int] = (32, 32),
                      odd_sizes: Sequence[tuple[int, int]] = ((40, 48),), corrupt: bool = True,
                      empty_class: bool = True, formats: Sequence[str] = FORMATS, seed: int = 0) -> ImageFolder:
    """Write `root/<class>/*.<fmt>`: `per_class` readable images per class (the first len(odd_sizes) of each
    class at those odd sizes), plus — when `corrupt` — a garbage .jpg and an empty .png in the first class,
    and — when `empty_class` — an image-less class folder `zz_empty` (with a non-image file in it)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    bad: list[str] = []
    k = 0
    for name, color, kind in SHAPES[:classes]:
        d = root / name
        d.mkdir(exist_ok=True)
        names.append(name)
        for i in range(per_class):
            img_size = odd_sizes[i] if i < len(odd_sizes) else size
            ext = formats[k % len(formats)]
            k += 1
            ok = cv2.imwrite(str(d / f"{name}_{i:03d}{ext}"), draw_shape(kind, color, img_size, rng))
            assert ok, f"OpenCV could not write {ext}"
    if corrupt:
        first = root / names[0]
        (first / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 3)
        (first / "empty.png").write_bytes(b"")
        bad += [f"{names[0]}/broken.jpg", f"{names[0]}/empty.png"]
        (first / "notes.txt").write_text("not an image, ignored by suffix\n")
    empty = ()
    if empty_class:
        (root / "zz_empty").mkdir(exist_ok=True)
        (root / "zz_empty" / "README").write_text("no images here\n")
        empty = ("zz_empty",)
    return ImageFolder(root=root, classes=tuple(sorted(names)), readable=classes * per_class,
                       corrupt=tuple(sorted(bad)), size=size, empty=empty)


@pytest.fixture
def image_folder_factory(tmp_path: Path) -> Callable[..., ImageFolder]:
    """Call with `make_image_folder` keyword arguments; each call writes a new folder under tmp_path."""
    counter = [0]

    def make(**kwargs: object) -> ImageFolder:
        counter[0] += 1
        return make_image_folder(tmp_path / f"images{counter[0]}", **kwargs)  # type: ignore[arg-type]

    return make


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> ImageFolder:
    """3 classes × 12 readable images (32×32, two at 40×48), 2 corrupt files, one empty class folder."""
    return make_image_folder(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="session")
def shapes_checkpoint(tmp_path_factory: pytest.TempPathFactory, image_folder: ImageFolder) -> Path:
    """A checkpoint trained for a few epochs on `image_folder` at 32×32 RGB (arch convs 8,16, dense 16)."""
    from edgecv.tools.checkpoint import save_checkpoint
    from edgecv.tools.datasets import default_input_spec, load_splits
    from edgecv.tools.model import build_model
    from edgecv.tools.train import TrainConfig, train

    splits = load_splits(image_folder.root, size=image_folder.size, color="rgb", seed=0)
    spec = default_input_spec(splits.train)
    model = build_model(spec, len(splits.classes), channels=(8, 16), dense=16, seed=0)
    cfg = TrainConfig(epochs=4, batch_size=8, lr=1e-2, progress=False, patience=0, threads=1)
    result = train(model, splits, spec, cfg)
    path = tmp_path_factory.mktemp("ckpt") / "shapes.pt"
    save_checkpoint(path, model, spec, splits.classes, model.arch, result.history,
                    {"data": str(image_folder.root), "seed": 0, "limit": None, "val_fraction": 0.1,
                     "test_fraction": 0.1})
    return path


@pytest.fixture(scope="session")
def fashion_checkpoint(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_dir: Path) -> Path:
    """A checkpoint of the default 28×28×1 arch trained 1 epoch on 1,000 Fashion-MNIST images (~2 s)."""
    from edgecv.tools.checkpoint import save_checkpoint
    from edgecv.tools.datasets import default_input_spec, load_splits
    from edgecv.tools.model import build_model
    from edgecv.tools.train import TrainConfig, train

    splits = load_splits("fashion-mnist", seed=0, limit=1000)
    spec = default_input_spec(splits.train)
    model = build_model(spec, len(splits.classes), seed=0)
    result = train(model, splits, spec, TrainConfig(epochs=1, batch_size=32, progress=False, threads=1))
    path = tmp_path_factory.mktemp("ckpt") / "fashion.pt"
    save_checkpoint(path, model, spec, splits.classes, model.arch, result.history,
                    {"data": "fashion-mnist", "seed": 0, "limit": 1000, "val_fraction": 0.1, "test_fraction": 0.1})
    return path


@dataclass(frozen=True)
class CollectedDataset:
    """What `make_collected_dataset` wrote: the root, the sample ids in queue order (sidecar time) and each
    sample's predicted label."""

    root: Path
    ids: tuple[str, ...]
    predicted: dict[str, str]


def make_collected_dataset(root: Path, predicted: Sequence[str] = ("circle", "square", "circle", "triangle",
                                                                   "square", "circle"),
                           existing: dict[str, int] | None = None, seed: int = 0) -> CollectedDataset:
    """A dataset as `edgecv collect` leaves it (docs/DATASETS.md): `_unlabelled/s00.jpg` … with sidecars
    predicting `predicted[i]` (times 60 s apart, so the queue order is s00, s01, …), plus already labelled
    class folders (default: `circle/` with two images)."""
    from edgecv.tools.dataset_layout import JUNK, REASONS, UNLABELLED, ModelRef, Sidecar, write_sidecar

    rng = np.random.default_rng(seed)
    shapes = {name: (color, kind) for name, color, kind in SHAPES}
    unlabelled = root / UNLABELLED
    unlabelled.mkdir(parents=True)
    model = ModelRef("shapes", "1.0.0", "ab" * 32)
    ids = []
    for i, label in enumerate(predicted):
        sample_id = f"s{i:02d}"
        color, kind = shapes.get(label, ((200, 200, 200), "circle"))
        assert cv2.imwrite(str(unlabelled / f"{sample_id}.jpg"), draw_shape(kind, color, (48, 64), rng))
        write_sidecar(unlabelled / f"{sample_id}.json",
                      Sidecar(predicted=label, score=round(0.35 + 0.1 * (i % 6), 2), camera="cam0",
                              region="door" if i % 2 else None, ts=1_700_000_000.0 + 60 * i,
                              reason=REASONS[i % len(REASONS)], device="pi-1", model=model))
        ids.append(sample_id)
    for name, count in (existing if existing is not None else {"circle": 2}).items():
        (root / name).mkdir()
        color, kind = shapes.get(name, ((200, 200, 200), "circle"))
        for k in range(count):
            assert cv2.imwrite(str(root / name / f"old{k}.png"), draw_shape(kind, color, (48, 64), rng))
    assert not (root / JUNK).exists()
    return CollectedDataset(root, tuple(ids), dict(zip(ids, predicted, strict=True)))


@pytest.fixture
def collected(tmp_path: Path) -> CollectedDataset:
    """Six unlabelled samples (predicted circle, square, circle, triangle, square, circle) and `circle/` with two
    labelled images."""
    return make_collected_dataset(tmp_path / "dataset")
@pytest.fixture(scope="session")
def zoo_cache(request: pytest.FixtureRequest) -> Path:
    """Where exported zoo models live between tests (pytest's cache folder: CI pays an export once per run)."""
    return Path(request.config.cache.mkdir("edgecv-zoo"))
