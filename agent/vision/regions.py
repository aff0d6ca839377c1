"""Camera regions: named crops of a camera's frame, each classified on its own when its trigger fires, with its own
stable state (agent/vision/states.py).

A region (`[[camera.region]]`, config.RegionConfig) has a crop, in pixels or in fractions of the frame, resolved to
pixels when frames arrive and again whenever the frame size changes; a pixel crop that does not fit the frame is a
CropError, reported in the camera's status and counted, never a crash. The crop is a view of the frame (no copy);
preprocessing resizes it to the model's input, so a garage door in a corner fills the model's input instead of a
few of its pixels.

Triggers decide, per frame, whether a region is classified:

    every            every frame the camera delivers
    interval         when `interval_s` passed since the region was last classified
    motion           when the crop changed: at least `motion_threshold` of its pixels (a fraction) differ by more
                     than MOTION_DELTA grey levels from the last crop that moved, both reduced to MOTION_WIDTH pixels
                     wide and lightly blurred (so sensor noise, JPEG artefacts and a pixel of camera shake do not
                     count, a slow lighting drift counts once it adds up); and on the frames after, while a state
                     change is pending (so a change seen while something moved is confirmed without more motion)
    motion+interval  either (the default): changes are seen at once, a slow drift at least every `interval_s`

A frame a region does not classify is counted as skipped for that region (health: cameras.<camera>.regions).
A region classifies with the camera's model (the one `edgecv push` replaces) unless it names a bundle of its own
(`model = "..."`); such a bundle is loaded, verified against the keyring and self-tested at start
(`load_region_model`) and is never replaced by a push. Each Region is used by its camera's loop thread only; other
threads read its counters and status.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from edgecv.agent.config import AgentConfig, RegionConfig
from edgecv.agent.contract.bundle import load_bundle, open_bundle, verify_bundle
from edgecv.agent.contract.signing import Keyring
from edgecv.agent.contract.topics import PredictionEncoder
from edgecv.agent.errors import BundleError, CropError, EdgecvError
from edgecv.agent.vision.classifier import Classifier, run_selftest
from edgecv.agent.vision.states import Stabiliser, StateChange

log = logging.getLogger(__name__)

MIN_CROP_PX = 2  # a fractional crop smaller than this (in pixels, on this frame) is an error
MOTION_WIDTH = 32  # crops are compared at this width (or their own, if narrower)
MOTION_DELTA = 20  # grey levels a pixel must change by to count as moved


class Box(NamedTuple):
    """A crop in pixels of one frame size."""

    x: int
    y: int
    w: int
    h: int


def resolve_crop(cfg: RegionConfig, width: int, height: int, where: str = "crop") -> Box:
    """The region's crop in pixels on a `width` x `height` frame. Raises CropError when it does not fit."""
    x, y, w, h = cfg.crop
    if cfg.fractional:
        x0, y0 = round(x * width), round(y * height)
        x1, y1 = min(width, round((x + w) * width)), min(height, round((y + h) * height))
        if x1 - x0 < MIN_CROP_PX or y1 - y0 < MIN_CROP_PX:
            raise CropError(f"{where}: {list(cfg.crop)} (fractions) is {x1 - x0}x{y1 - y0} pixels on the "
                            f"{width}x{height} frame; make it larger")
        return Box(x0, y0, x1 - x0, y1 - y0)
    box = Box(int(x), int(y), int(w), int(h))
    if box.x + box.w > width or box.y + box.h > height:
        raise CropError(f"{where}: {list(cfg.crop)} (pixels: x, y, width, height) does not fit the {width}x{height} "
                        f"frame (it reaches {box.x + box.w}x{box.y + box.h}); fix it, or give fractions of the "
                        "frame such as [0.5, 0.0, 0.5, 0.5]")
    return box


class CropMotion:
    """Whether a region's crop moved since the last crop that moved (see the module docstring). Measured on a
    32-pixel-wide copy: on the synthetic scene's door crop (192x288) a pixel of camera shake changed the mean absolute
    difference by ~2 % of full scale, the frame-level MotionGate's measure, while under 0.1 % of pixels here."""

    __slots__ = ("_reference", "last_fraction", "threshold")

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._reference: np.ndarray | None = None
        self.last_fraction: float | None = None

    def moved(self, crop: np.ndarray) -> bool:
        small = _small_blurred_gray(crop)
        ref = self._reference
        if ref is None or ref.shape != small.shape:
            self._reference, self.last_fraction = small, None
            return True
        _, changed = cv2.threshold(cv2.absdiff(small, ref), MOTION_DELTA, 255, cv2.THRESH_BINARY)
        fraction = cv2.countNonZero(changed) / changed.size
        self.last_fraction = fraction
        if fraction >= self.threshold:
            self._reference = small
            return True
        return False


def _small_blurred_gray(crop: np.ndarray) -> np.ndarray:
    if crop.ndim == 3 and crop.shape[2] == 3:
        gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    else:
        gray = crop[:, :, 0] if crop.ndim == 3 else crop
    h, w = gray.shape[:2]
    if w > MOTION_WIDTH:
        gray = cv2.resize(gray, (MOTION_WIDTH, max(1, round(h * MOTION_WIDTH / w))), interpolation=cv2.INTER_AREA)
    return cv2.GaussianBlur(gray, (3, 3), 0)


class Trigger:
    """Whether a region is classified on this frame (see the module docstring)."""

    __slots__ = ("_gate", "_last", "interval_s", "mode")

    def __init__(self, cfg: RegionConfig) -> None:
        self.mode = cfg.trigger
        self.interval_s = cfg.interval_s if "interval" in cfg.trigger else math.inf
        self._gate = CropMotion(cfg.motion_threshold) if "motion" in cfg.trigger else None
        self._last = -math.inf  # monotonic time of the last classification

    def fires(self, crop: np.ndarray, now: float, pending: bool) -> bool:
        """`now` is monotonic seconds; `pending`: a state change awaits confirmation."""
        if self.mode == "every":
            return True
        gate = self._gate
        # The motion reference is kept current on every frame, whether or not something else fires.
        if gate is not None and (gate.moved(crop) or pending):
            return True
        return self.interval_s != math.inf and now - self._last >= self.interval_s

    def classified(self, now: float) -> None:
        self._last = now

    @property
    def last_motion(self) -> float | None:
        """The fraction of the crop's pixels that changed, at the last motion check."""
        return None if self._gate is None else self._gate.last_fraction


class Region:
    """One region of one camera while the agent runs: crop, trigger, stabiliser, counters, its own model if any."""

    def __init__(self, camera: str, cfg: RegionConfig, model: Classifier | None = None, where: str = "") -> None:
        self.camera = camera
        self.name = cfg.name
        self.cfg = cfg
        self.key = f"{camera}/{cfg.name}"  # publish policy and warnings
        self.where = where or f"camera {camera!r} region {cfg.name!r} crop"
        self.model = model  # its own classifier; None = the camera's (hosted) model
        self.trigger = Trigger(cfg)
        self.stabiliser = Stabiliser(cfg.consecutive, cfg.min_score)
        self.box: Box | None = None
        self.error: str | None = None
        self.classified = 0
        self.skipped = 0
        self.errors = 0
        # what the loop thread keeps between frames
        self.clf: Classifier | None = None  # the model of the last classification (a swap is noticed by identity)
        self.encoder: PredictionEncoder | None = None
        self.latest_due = 0.0
        self._shape: tuple[int, ...] | None = None

    def crop(self, image: np.ndarray) -> np.ndarray:
        """The region's view of `image`; raises CropError when the crop does not fit this frame size."""
        shape = image.shape
        if shape != self._shape:
            self._shape = shape
            self.box = None
            try:
                self.box = resolve_crop(self.cfg, int(shape[1]), int(shape[0]), self.where)
            except CropError as exc:
                self.error = str(exc)
                raise
            self.error = None
        box = self.box
        if box is None:
            raise CropError(self.error or f"{self.where}: unusable crop")
        return image[box.y:box.y + box.h, box.x:box.x + box.w]

    def model_info(self) -> str:
        m = self.model
        return "camera" if m is None else f"{m.name} {m.version}"

    def status(self) -> dict[str, Any]:
        """For the retained status: configuration as resolved, and why the region is not classified, if it is not."""
        return {"crop": list(self.cfg.crop), "box": list(self.box) if self.box else None,
                "trigger": self.cfg.trigger, "model": self.model_info(), "error": self.error}

    def health(self) -> dict[str, Any]:
        last = self.stabiliser.last
        return {"classified": self.classified, "skipped": self.skipped, "errors": self.errors,
                "state": self.stabiliser.state, "since": None if last is None else round(last.since, 3)}

    def take(self, image: np.ndarray, mono: float) -> np.ndarray | None:
        """The crop to classify on this frame, or None when the trigger does not fire (counted as skipped).
        `mono`: monotonic seconds. Raises CropError (counted) when the crop does not fit the frame."""
        try:
            crop = self.crop(image)
        except CropError:
            self.errors += 1
            raise
        if not self.trigger.fires(crop, mono, self.stabiliser.pending):
            self.skipped += 1
            return None
        return crop

    def record(self, clf: Classifier, top: list[dict[str, Any]], ts: float, mono: float, frame: int,
               frame_ts: float) -> list[StateChange]:
        """A classification of this region by `clf`: counted, fed to the stabiliser; returns the state changes to
        publish, in order (a model swap noticed here may first make the state unknown)."""
        self.trigger.classified(mono)
        self.classified += 1
        changes = []
        if self.clf is not clf:
            if self.clf is not None:  # a model swap: the run in progress came from the old model
                swapped = self.stabiliser.model_changed(clf.labels, ts)
                if swapped is not None:
                    changes.append(swapped)
            self.clf, self.encoder = clf, None
        best = top[0] if top else None
        change = self.stabiliser.observe(best["label"] if best else None, best["score"] if best else 0.0, ts, frame,
                                         frame_ts)
        if change is not None:
            changes.append(change)
        return changes

    def encoder_for(self, clf: Classifier, boot: str, device: str) -> PredictionEncoder:
        """The prediction encoder of this region and model (made again after a model swap)."""
        if self.encoder is None or self.clf is not clf:
            self.clf = clf
            self.encoder = PredictionEncoder(boot=boot, device=device, camera=self.camera, model_name=clf.name,
                                             model_version=clf.version, labels=clf.labels, region=self.name,
                                             model_sha=clf.bundle.manifest_sha256)
        return self.encoder


def load_region_model(path: str, config: AgentConfig, keyring: Keyring | None, where: str) -> Classifier:
    """A region's own bundle (directory or .edgecv archive): verified like the seed bundle (sha256 of every file,
    signature against the keyring unless security.allow_unsigned), loaded in the configured runtime and self-tested.
    Raises ConfigError-like EdgecvError naming `where` (the config key) on any failure."""
    tmp: str | None = None
    try:
        source = Path(path)
        if source.is_dir():
            bundle = load_bundle(source)
        else:
            tmp = tempfile.mkdtemp(prefix="edgecv-region-")
            bundle = open_bundle(source, Path(tmp), max_bytes=config.update.max_bundle_bytes)
        verify_bundle(bundle, keyring, allow_unsigned=config.security.allow_unsigned)
        m = config.model
        clf = Classifier.load(bundle, runtime=m.runtime, threads=m.threads, top_k=config.publish.top_k,
                              min_score=config.publish.min_score)
        run_selftest(clf).raise_for_failure()
    except (BundleError, OSError) as exc:
        raise BundleError(f"{where}: the region's model {path} cannot be used: {exc}") from exc
    except EdgecvError as exc:
        raise type(exc)(f"{where}: the region's model {path} cannot be used: {exc}") from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: own model %s %s (%s)", where, clf.name, clf.version, clf.engine.name)
    return clf


def load_region_models(config: AgentConfig, keyring: Keyring | None) -> dict[tuple[str, str], Classifier]:
    """Every region's own model, by (camera, region); regions without `model` use the camera's."""
    out = {}
    for i, cam in enumerate(config.cameras):
        for j, region in enumerate(cam.regions):
            if region.model:
                out[(cam.name, region.name)] = load_region_model(region.model, config, keyring,
                                                                 f"camera[{i}].region[{j}].model")
    return out
