"""Training data: image folders and Fashion-MNIST as uint8 `Dataset`s, deterministic splits, model input math.

Every loader returns images as uint8 N×H×W×C (RGB, or C=1 for grayscale), int64 labels and class names.
Problems with the data (wrong path, too few classes, unreadable files) are reported as one `DatasetError`
or, for individual corrupt files, logged and counted, never a crash.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgecv.agent.contract.bundle import InputSpec
from edgecv.tools.errors import DatasetError

log = logging.getLogger(__name__)

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"})
COLORS = ("rgb", "gray")
MAX_NAMED_BAD_FILES = 5

# IDX type codes (http://yann.lecun.com/exdb/mnist/): code -> numpy big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Dataset:
    """Images (uint8 N×H×W×C, RGB or C=1 gray), labels (int64 N) and the class names labels index into.

    `skipped` lists files a folder loader could not read (they are not in `images`).
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    skipped: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DatasetError(f"Dataset images must be uint8 N×H×W×C, got {self.images.dtype} "
                               f"with shape {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DatasetError(f"Dataset has {self.images.shape[0]} images but labels of shape {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of every image."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[3])

    def subset(self, indices: np.ndarray | Sequence[int]) -> Dataset:
        idx = np.asarray(indices, dtype=np.int64)
        return Dataset(self.images[idx], self.labels[idx], list(self.classes), self.skipped)


@dataclass(frozen=True)
class Splits:
    """Train / validation / test parts of one source; all share class names, size and colour."""

    train: Dataset
    val: Dataset
    test: Dataset
    source: str = ""

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    def describe(self) -> str:
        h, w = self.train.size
        return (f"{self.source or 'data'}: {len(self.classes)} classes, {h}x{w}x{self.train.channels}, "
                f"train {len(self.train)} / val {len(self.val)} / test {len(self.test)}")


def parse_size(text: str | Sequence[int] | None) -> tuple[int, int] | None:
    """'HxW' (or 'N' for a square, or an (h, w) pair) -> (h, w); None stays None."""
    if text is None:
        return None
    if not isinstance(text, str):
        vals = [int(v) for v in text]
        if len(vals) != 2:
            raise DatasetError(f"Image size must be (height, width), got {tuple(text)!r}")
        h, w = vals
    else:
        parts = text.lower().replace("×", "x").split("x")
        try:
            if len(parts) == 1:
                h = w = int(parts[0])
            elif len(parts) == 2:
                h, w = int(parts[0]), int(parts[1])
            else:
                raise ValueError(text)
        except ValueError:
            raise DatasetError(f"Image size {text!r} is not valid: use HxW, for example 64x64") from None
    if not (4 <= h <= 4096 and 4 <= w <= 4096):
        raise DatasetError(f"Image size {h}x{w} is out of range: height and width must be between 4 and 4096")
    return h, w


def _check_color(color: str | None) -> str | None:
    if color is None:
        return None
    c = color.lower()
    if c in ("grey", "grayscale", "l"):
        c = "gray"
    if c not in COLORS:
        raise DatasetError(f"Colour {color!r} is not supported: use 'rgb' or 'gray'")
    return c


# ---------------------------------------------------------------- Fashion-MNIST


def read_idx(path: Path) -> np.ndarray:
    """Parse a (gzip-compressed or plain) IDX file into a numpy array with its declared shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"Cannot read IDX file {path}: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"IDX file {path} is truncated (header)")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header < count * dtype.itemsize:
        raise DatasetError(f"IDX file {path} is truncated: expected {count} values of shape {shape}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", root: Path | str = FASHION_MNIST_ROOT) -> Dataset:
    """The official Fashion-MNIST `train` (60,000) or `test` (t10k, 10,000) images as N×28×28×1 uint8."""
    if split not in ("train", "test"):
        raise DatasetError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    stem = "train" if split == "train" else "t10k"
    img_path = root / f"{stem}-images-idx3-ubyte.gz"
    lbl_path = root / f"{stem}-labels-idx1-ubyte.gz"
    missing = [p.name for p in (img_path, lbl_path) if not p.is_file()]
    if missing:
        raise DatasetError(f"Fashion-MNIST is not installed ({root} lacks {', '.join(missing)}): install it with "
                           f"'apt-get install {FASHION_MNIST_PACKAGE}'")
    images, labels = _fashion_arrays(str(img_path), str(lbl_path))
    if images.ndim != 4 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DatasetError(f"Fashion-MNIST files in {root} have unexpected shapes {images.shape} / {labels.shape}")
    return Dataset(images, labels, list(FASHION_MNIST_CLASSES))


@functools.lru_cache(maxsize=2)
def _fashion_arrays(img_path: str, lbl_path: str) -> tuple[np.ndarray, np.ndarray]:
    """Decoded (read-only) arrays, cached: decompressing the 60,000 training images takes ~0.4 s."""
    images = np.ascontiguousarray(read_idx(Path(img_path)).astype(np.uint8)[..., None])
    labels = read_idx(Path(lbl_path)).astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


# ---------------------------------------------------------------- image folders


# Sub-folders whose names start with these are not classes: `_unlabelled`, `_junk` (docs/DATASETS.md), hidden ones.
NOT_CLASS_PREFIXES = ("_", ".")


def scan_image_folder(root: Path | str) -> tuple[list[str], list[list[Path]]]:
    """Class names (sorted sub-folder names) and their image files; empty class folders are skipped, and so
    are folders whose names start with `_` or `.` (`_unlabelled`, `_junk` of a collected dataset, hidden ones).

    Raises DatasetError for a wrong path or fewer than 2 classes that hold images.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"Dataset folder {root} does not exist: pass a folder laid out as "
                           "<root>/<class>/<image files>, or 'fashion-mnist'")
    if not root.is_dir():
        raise DatasetError(f"Dataset path {root} is not a folder: pass a folder laid out as <root>/<class>/<images>")
    classes: list[str] = []
    files: list[list[Path]] = []
    empty: list[str] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(NOT_CLASS_PREFIXES)):
        found = sorted(p for p in sub.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            empty.append(sub.name)
            continue
        classes.append(sub.name)
        files.append(found)
    if empty:
        log.warning("Skipping %d class folder(s) without images: %s", len(empty), ", ".join(empty[:10]))
    if len(classes) < 2:
        have = f"only {classes[0]!r}" if classes else "none"
        raise DatasetError(f"Dataset folder {root} needs at least 2 class sub-folders with images, found {have}: "
                           "lay it out as <root>/<class>/<image files>")
    return classes, files


def read_image(path: Path, gray: bool) -> np.ndarray | None:
    """Decode one file with OpenCV as H×W×3 RGB or H×W×1 gray uint8; None when it is not a readable image."""
    import cv2

    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError:
        return None
    if raw.size == 0:
        return None
    try:
        img = cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    if img is None or img.size == 0:
        return None
    if img.dtype != np.uint8:  # 16-bit PNG/TIFF decoded as-is by some codecs
        img = (img.astype(np.float32) * (255.0 / max(float(img.max()), 1.0))).astype(np.uint8)
    if gray:
        return img.reshape(img.shape[0], img.shape[1], 1)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    h, w = size
    if img.shape[:2] == (h, w):
        return img
    interp = cv2.INTER_AREA if img.shape[0] >= h and img.shape[1] >= w else cv2.INTER_LINEAR
    out = cv2.resize(img, (w, h), interpolation=interp)
    return out.reshape(h, w, img.shape[2])


def load_image_folder(root: Path | str, size: tuple[int, int] | str | None = None, color: str = "rgb",
                      *, files: Sequence[tuple[Path, int]] | None = None) -> Dataset:
    """Read `root/<class>/*.<image>` into a Dataset, resizing every image to `size` (h, w).

    Without `size`, the most common image size in the folder is used. Unreadable or corrupt files are
    logged (count and first names) and listed in `Dataset.skipped`. `files` restricts loading to given
    (path, class index) pairs from `scan_image_folder` (used for deterministic subsets).
    """
    target = parse_size(size)
    gray = _check_color(color) == "gray"
    classes, per_class = scan_image_folder(root)
    if files is None:
        files = [(p, ci) for ci, paths in enumerate(per_class) for p in paths]
    images: list[np.ndarray] = []
    labels: list[int] = []
    bad: list[str] = []
    for path, ci in files:
        img = read_image(path, gray)
        if img is None:
            bad.append(os.path.relpath(path, root))
            continue
        images.append(img)
        labels.append(ci)
    if bad:
        log.warning("Skipped %d unreadable image file(s) in %s: %s%s", len(bad), root,
                    ", ".join(bad[:MAX_NAMED_BAD_FILES]), " …" if len(bad) > MAX_NAMED_BAD_FILES else "")
    usable = sorted(set(labels))
    if len(usable) < 2:
        raise DatasetError(f"Dataset folder {root} has readable images in {len(usable)} class(es) only "
                           f"({len(bad)} file(s) could not be read): at least 2 classes are needed")
    if target is None:
        counts = Counter(img.shape[:2] for img in images)
        target = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if len(counts) > 1:
            log.info("Images have %d different sizes; resizing all to the most common, %dx%d (use --size to choose)",
                     len(counts), target[0], target[1])
    stacked = np.stack([resize_image(img, target) for img in images])
    return Dataset(stacked, np.asarray(labels, dtype=np.int64), classes, tuple(bad))


# ---------------------------------------------------------------- subsets and splits


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A deterministic permutation that interleaves classes, so any prefix is class-balanced (until the
    smaller classes run out)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    rank = np.empty(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        # round-robin over classes: the i-th image of every class comes before the (i+1)-th of any class
        rank[idx[rng.permutation(len(idx))]] = np.arange(len(idx))
    tiebreak = rng.random(len(labels))
    return np.lexsort((tiebreak, rank))


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices per class by `fractions` (of the whole); the remainder is the first part (train).

    Returns [rest, part1, part2, ...] as sorted index arrays. A class with at least len(fractions)+1
    images gives each non-zero part at least one image.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n = len(idx)
        start = 0
        for i, frac in enumerate(fractions):
            k = round(n * frac)
            if frac > 0 and k == 0 and n > len(fractions):
                k = 1
            k = min(k, n - start - 1) if n - start > 1 else 0
            parts[i + 1].append(idx[start:start + k])
            start += k
        parts[0].append(idx[start:])
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, np.int64) for p in parts]


def _to_color(ds: Dataset, color: str | None) -> Dataset:
    if color is None:
        return ds
    want = 1 if color == "gray" else 3
    if ds.channels == want:
        return ds
    if want == 3:
        return Dataset(np.ascontiguousarray(np.repeat(ds.images, 3, axis=3)), ds.labels, ds.classes, ds.skipped)
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gray = np.clip(np.rint(ds.images.astype(np.float32) @ weights), 0, 255).astype(np.uint8)[..., None]
    return Dataset(gray, ds.labels, ds.classes, ds.skipped)


def _to_size(ds: Dataset, size: tuple[int, int] | None) -> Dataset:
    if size is None or ds.size == size:
        return ds
    return Dataset(np.stack([resize_image(img, size) for img in ds.images]), ds.labels, ds.classes, ds.skipped)


def load_splits(source: str | Path, size: tuple[int, int] | str | None = None, color: str | None = None,
                val_fraction: float = 0.1, test_fraction: float = 0.1, seed: int = 0,
                limit: int | None = None) -> Splits:
    """Load `source` ("fashion-mnist" or an image folder) and split it deterministically by `seed`.

    Fashion-MNIST: validation is `val_fraction` of the official training set, test is the official t10k
    set (`test_fraction` is ignored); `limit` caps the training pool (before the validation split) and the
    test set at `limit` images each. Folder: stratified train/val/test by the fractions; `limit` caps the
    number of files read. Subsets are class-balanced and depend only on `seed`. `size` is (h, w) or "HxW"
    (default: native for Fashion-MNIST, the most common size for folders); `color` "rgb" or "gray"
    (default: gray for Fashion-MNIST, rgb for folders).
    """
    target = parse_size(size)
    col = _check_color(color)
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0 and val_fraction + test_fraction < 1.0):
        raise DatasetError(f"Split fractions val={val_fraction} test={test_fraction} are invalid: each must be in "
                           "[0, 1) and together below 1")
    if limit is not None and limit < 2:
        raise DatasetError(f"--limit {limit} is too small: use at least 2 images (or no limit)")
    src = str(source)
    if src.lower() in (FASHION_MNIST, "fashion_mnist", "fashionmnist"):
        train_all = load_fashion_mnist("train")
        test = load_fashion_mnist("test")
        if limit is not None:
            train_all = train_all.subset(np.sort(stratified_order(train_all.labels, seed)[:limit]))
            test = test.subset(np.sort(stratified_order(test.labels, seed + 1)[:limit]))
        rest, val_idx = stratified_split(train_all.labels, [val_fraction], seed)
        train, val = train_all.subset(rest), train_all.subset(val_idx)
        col = col or "gray"
        train, val, test = (_to_size(_to_color(d, col), target) for d in (train, val, test))
        return Splits(train, val, test, source=FASHION_MNIST)
    root = Path(src).expanduser()
    if limit is not None:
        _, per_class = scan_image_folder(root)
        pairs = [(p, ci) for ci, paths in enumerate(per_class) for p in paths]
        order = stratified_order(np.array([ci for _, ci in pairs]), seed)[:limit]
        chosen: Sequence[tuple[Path, int]] | None = [pairs[i] for i in sorted(order)]
    else:
        chosen = None
    ds = load_image_folder(root, target, col or "rgb", files=chosen)
    rest, val_idx, test_idx = stratified_split(ds.labels, [val_fraction, test_fraction], seed)
    if len(rest) == 0:
        raise DatasetError(f"Dataset folder {root} has too few images to split: add images or lower --limit")
    return Splits(ds.subset(rest), ds.subset(val_idx), ds.subset(test_idx), source=str(root.absolute()))


# ---------------------------------------------------------------- model input


def default_input_spec(ds: Dataset, layout: str = "NCHW", normalize: bool = True) -> InputSpec:
    """The preprocessing spec for a model trained on `ds`: its size and colour, pixel/255, then per-channel
    mean/std of `ds` (on up to 10,000 images; rounded to 4 decimals) when `normalize`, else mean 0 std 1."""
    h, w = ds.size
    c = ds.channels
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    if normalize and len(ds):
        step = max(1, len(ds) // 10000)
        sample = ds.images[::step].reshape(-1, c).astype(np.float64) / 255.0
        mean = tuple(round(float(v), 4) for v in sample.mean(axis=0))
        std = tuple(round(max(float(v), 1e-3), 4) for v in sample.std(axis=0))
    return InputSpec(width=w, height=h, channels=c, color="GRAY" if c == 1 else "RGB", layout=layout,
                     mean=mean, std=std)


def spec_color(spec: InputSpec) -> str:
    """The dataset colour option ("rgb"/"gray") that matches an InputSpec."""
    return "gray" if spec.channels == 1 else "rgb"


def to_model_input(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """uint8 N×H×W×C images (already at the spec's size, RGB order or gray) -> float32 model input.

    Same arithmetic as the agent's preprocessing: channel order to the spec's colour (RGB images are
    flipped for a BGR spec), x = (pixel * scale - mean[c]) / std[c], then the spec's layout.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1:] != (spec.height, spec.width, spec.channels):
        raise DatasetError(f"Images of shape {images.shape[1:]} do not match the model input "
                           f"{spec.height}x{spec.width}x{spec.channels}: load the data with the same size and colour")
    if spec.color == "BGR":
        images = images[..., ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (images.astype(np.float32) * np.float32(spec.scale) - mean) / std
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)
