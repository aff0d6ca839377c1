"""`synthetic:` camera sources: frames generated in-process, for demos, tests and soak runs without a camera.

    synthetic:noise                      random colour noise
    synthetic:bars                       colour bars scrolling sideways (every frame differs)
    synthetic:static                     one unchanging frame (motion-gate tests)
    synthetic:fashion-mnist[?split=test&scale=4&shuffle=1&seed=0&root=DIR]
                                         Fashion-MNIST images as BGR frames, each carrying `truth` = its label
    synthetic:fail?after=N               N frames of bars, then a read failure (reopen tests)
    synthetic:stall?after=N              N frames of bars, then the read hangs (a stuck driver; watchdog tests)
    synthetic:scene[?seed=0&...]         a camera-like 640x480 scene with a garage door that opens and closes,
                                         each frame carrying `truth` = the door's state (agent/vision/scene.py)

Common query keys: width, height (noise/bars/static/fail/stall; defaults from the camera config or 160x120);
live=0|1 on every kind: 1 makes the source behave like a V4L2 camera (its grab() waits for the next tick of a
clock at the camera fps, and agent.camera drains it on a grabber thread: the newest frame wins, untaken frames
count as skipped; for tests and benchmarks of that path); 0, the default, has the consumer read frames on demand
like a file. `stall` defaults to live=1: a stuck driver is a live camera's failure.
Fashion-MNIST is read with numpy only (gzip IDX files) from `root=DIR`, else `$EDGECV_FASHION_MNIST_DIR`, else the
Debian package `dataset-fashion-mnist`, else the 1,000-image sample of the test split that the wheel ships (so the
demo runs on a device with nothing but `pip install edgecv`).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import threading
import time
from pathlib import Path
from urllib.parse import parse_qsl

import cv2
import numpy as np

from edgecv.agent.errors import CameraError
from edgecv.agent.vision.scene import SCENE_KEYS, Scene, SceneSpec

PREFIX = "synthetic:"
KINDS = ("noise", "bars", "static", "fashion-mnist", "fail", "stall", "scene")
STALL_S = 3600.0  # how long a `stall` source hangs before it reports a failure
FASHION_MNIST_ROOT = Path(os.environ.get("EDGECV_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_SAMPLE = "fashion-mnist-sample"  # in the data package edgecv.models: the test split's first 1,000
FASHION_MNIST_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot")
_SPLIT_FILES = {"test": "t10k", "train": "train"}
_BAR_COLORS = np.array([[255, 255, 255], [0, 255, 255], [255, 255, 0], [0, 255, 0], [255, 0, 255],
                        [0, 0, 255], [255, 0, 0], [0, 0, 0]], dtype=np.uint8)  # BGR


class SourceSpecError(CameraError):
    """The source string itself is wrong (unknown kind, bad parameter): retrying cannot help."""


def read_idx(path: Path) -> np.ndarray:
    """Read a (gzip-compressed) IDX file of unsigned bytes, as used by MNIST and Fashion-MNIST."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:
        raise CameraError(f"Cannot read {path}: {exc}; install the Debian package dataset-fashion-mnist") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CameraError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise CameraError(f"{path} is truncated: expected {int(np.prod(dims))} values, got {body.size}")
    return body.reshape(dims)


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(split: str = "test", root: Path = FASHION_MNIST_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N×28×28, labels int64 N) of one split ('test' = t10k, 'train'); cached."""
    if split not in _SPLIT_FILES:
        raise SourceSpecError(f"Fashion-MNIST split {split!r} is unknown; use 'test' or 'train'")
    stem = _SPLIT_FILES[split]
    images = read_idx(Path(root) / f"{stem}-images-idx3-ubyte.gz")
    labels = read_idx(Path(root) / f"{stem}-labels-idx1-ubyte.gz").astype(np.int64)
    if images.ndim != 3 or labels.shape != (images.shape[0],):
        raise CameraError(f"Fashion-MNIST files under {root} do not match: images {images.shape}, "
                          f"labels {labels.shape}")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def default_fashion_mnist_root() -> Path:
    """The full dataset when it is installed (or named by $EDGECV_FASHION_MNIST_DIR), else the shipped sample."""
    if "EDGECV_FASHION_MNIST_DIR" in os.environ or FASHION_MNIST_ROOT.is_dir():
        return FASHION_MNIST_ROOT
    from edgecv.agent.resources import data_dir

    return data_dir("edgecv.models") / FASHION_MNIST_SAMPLE


def parse_spec(source: str) -> tuple[str, dict[str, str]]:
    """'synthetic:kind?a=1&b=2' → ('kind', {'a': '1', 'b': '2'})."""
    if not source.startswith(PREFIX):
        raise SourceSpecError(f"{source!r} is not a synthetic source (it must start with {PREFIX!r})")
    kind, _, query = source[len(PREFIX):].partition("?")
    if kind not in KINDS:
        raise SourceSpecError(f"Synthetic source kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
    return kind, dict(parse_qsl(query, keep_blank_values=True))


def synthetic_is_live(source: str) -> bool:
    """The `live` parameter of a synthetic source (default: only `stall` is live). Raises SourceSpecError."""
    kind, params = parse_spec(source)
    return bool(_int(params, "live", int(kind == "stall"), source, 0, 1))


class SyntheticSource:
    """A FrameSource (see agent.camera) generating frames; read on demand unless its query says live=1, in which
    case `fps` (the camera's) clocks it like a sensor (0 = no clock: a new frame whenever it is read)."""

    def __init__(self, source: str, *, loop: bool = True, width: int = 0, height: int = 0, fps: float = 0.0) -> None:
        self.kind, params = parse_spec(source)
        allowed = {"noise": {"width", "height", "seed"}, "bars": {"width", "height"},
                   "static": {"width", "height"}, "fail": {"width", "height", "after"},
                   "stall": {"width", "height", "after"},
                   "fashion-mnist": {"split", "scale", "shuffle", "seed", "root"},
                   "scene": set(SCENE_KEYS)}[self.kind] | {"live"}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise SourceSpecError(f"Synthetic source {source!r}: unknown parameter(s) {', '.join(unknown)}; "
                                  f"{self.kind} accepts {', '.join(sorted(allowed))}")
        self.live = synthetic_is_live(source)
        self.loop = loop
        self.width = _int(params, "width", width or 160, source, 8)
        self.height = _int(params, "height", height or 120, source, 8)
        self.error: str | None = None
        self.ended = False
        self._period = 1.0 / fps if self.live and fps > 0 else 0.0
        self._tick: float | None = None
        self._index = 0
        self._image: np.ndarray | None = None
        self._truth: int | None = None
        self._rng = np.random.default_rng(_int(params, "seed", 0, source, 0))
        self._after = _int(params, "after", 10, source, 0)
        if self.kind == "fashion-mnist":
            root = Path(params["root"]) if "root" in params else default_fashion_mnist_root()
            self._images, self._labels = load_fashion_mnist(params.get("split", "test"), root)
            self._scale = _int(params, "scale", 4, source, 1)
            order = np.arange(len(self._labels))
            if _int(params, "shuffle", 0, source, 0):
                order = self._rng.permutation(order)
            self._order = order
        elif self.kind == "static":
            self._static = _bars(self.width, self.height, 0)
        elif self.kind == "scene":
            try:
                spec = SceneSpec(params, width, height)
            except ValueError as exc:
                raise SourceSpecError(f"Synthetic source {source!r}: {exc}") from None
            self.scene = Scene(spec)
            self.width, self.height = spec.width, spec.height
            self._clip = spec.frames

    def grab(self) -> bool:
        if self._period:
            self._wait_for_tick()
        if self.kind == "stall" and self._index >= self._after:
            threading.Event().wait(STALL_S)  # hang like a stuck driver: no frame, no error
            self.error = f"Synthetic source stalled after {self._after} frames (as configured)"
            return False
        if self.kind == "fail" and self._index >= self._after:
            self.error = f"Synthetic failure after {self._after} frames (as configured)"
            return False
        if self.kind == "scene" and self._clip and self._index >= self._clip:
            if not self.loop:
                self.error, self.ended = f"End of the {self._clip}-frame scene (loop = false)", True
                return False
            self._index = 0
        if self.kind == "fashion-mnist" and self._index >= len(self._order):
            if not self.loop:
                self.error, self.ended = "End of the Fashion-MNIST split (loop = false)", True
                return False
            self._index = 0
        self._image = None
        self._index += 1
        return True

    def _wait_for_tick(self) -> None:
        """A live source's sensor clock: block until its next tick; a reader that fell behind gets the frame
        "buffered" at the latest tick at once (the ones in between are gone, as with a driver buffer of 1)."""
        now = time.monotonic()
        if self._tick is None:
            self._tick = now
            return
        self._tick += self._period
        if self._tick > now:
            time.sleep(self._tick - now)
        else:
            self._tick += (now - self._tick) // self._period * self._period

    def retrieve(self) -> tuple[np.ndarray, int | None]:
        if self._image is None:
            self._image, self._truth = self._render(self._index - 1)
        return self._image, self._truth

    def _render(self, i: int) -> tuple[np.ndarray, int | None]:
        if self.kind == "noise":
            return self._rng.integers(0, 256, (self.height, self.width, 3), dtype=np.uint8), None
        if self.kind == "static":
            return self._static.copy(), None
        if self.kind == "scene":
            return self.scene.render(i)
        if self.kind == "fashion-mnist":
            j = int(self._order[i])
            gray = self._images[j]
            if self._scale > 1:
                gray = cv2.resize(gray, None, fx=self._scale, fy=self._scale, interpolation=cv2.INTER_NEAREST)
            return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR), int(self._labels[j])
        return _bars(self.width, self.height, i), None

    def close(self) -> None:
        self._image = None


def _bars(width: int, height: int, offset: int) -> np.ndarray:
    """Eight vertical colour bars scrolled `offset` * 4 pixels, plus a frame counter band for uniqueness."""
    x = (np.arange(width) + offset * 4) % width
    row = _BAR_COLORS[(x * len(_BAR_COLORS)) // width]
    frame = np.broadcast_to(row, (height, width, 3)).copy()
    cv2.putText(frame, str(offset), (2, height - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (128, 128, 128), 1)
    return frame


def _int(params: dict[str, str], key: str, default: int, source: str, minimum: int,
         maximum: int | None = None) -> int:
    if key not in params:
        return default
    try:
        value = int(params[key])
    except ValueError:
        raise SourceSpecError(f"Synthetic source {source!r}: {key} must be an integer, got {params[key]!r}") from None
    if value < minimum:
        raise SourceSpecError(f"Synthetic source {source!r}: {key} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise SourceSpecError(f"Synthetic source {source!r}: {key} must be <= {maximum}, got {value}")
    return value
