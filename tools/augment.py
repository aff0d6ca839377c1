"""Training-time data augmentation for image folders: random resized crop, horizontal flip, brightness and
contrast jitter, applied to each uint8 batch as it is drawn (the stored dataset is never changed).

Crop and flip are one affine warp per image (OpenCV), jitter is a vectorised numpy step, so augmenting a batch
costs a few milliseconds next to a training step. Whether flipping is allowed is the caller's decision (see
`flip_allowed`): a mirrored digit, letter or arrow is a different or meaningless image.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgecv.tools.errors import TrainingError

log = logging.getLogger(__name__)

# Class names that say the classes differ by left/right orientation: mirroring would swap them.
_ORIENTATION = re.compile(r"(^|[^a-z])(left|right)([^a-z]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class AugmentConfig:
    """crop_scale: range of the crop's area as a fraction of the image; crop_ratio: range of its aspect
    ratio (w/h); flip: mirror half the images left-right; brightness/contrast: maximum relative change."""

    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = 0.25
    contrast: float = 0.25

    def validate(self) -> None:
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise TrainingError(f"Augmentation crop scale {self.crop_scale} is invalid: expected 0 < min <= max <= 1")
        rlo, rhi = self.crop_ratio
        if not 0.0 < rlo <= rhi:
            raise TrainingError(f"Augmentation crop ratio {self.crop_ratio} is invalid: expected 0 < min <= max")
        if not (0.0 <= self.brightness < 1.0 and 0.0 <= self.contrast < 1.0):
            raise TrainingError("Augmentation brightness and contrast must be in [0, 1)")


def flip_allowed(classes: Sequence[str], requested: bool = True) -> bool:
    """Whether mirroring suits these classes: not when the caller said no (`--no-flip`: text, digits, arrows),
    and not when class names mention left or right (mirroring would turn one class into the other)."""
    if not requested:
        return False
    sided = [c for c in classes if _ORIENTATION.search(c.replace("_", " ").replace("-", " "))]
    if sided:
        log.info("Horizontal flips are off: class names %s mention left/right", ", ".join(sided[:4]))
        return False
    return True


def augment_batch(images: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """A new uint8 N×H×W×C batch: each image cropped at a random box (area and aspect ratio drawn from the
    config), resized back to H×W, mirrored with probability 0.5 when `cfg.flip`, then its brightness and
    contrast scaled by random factors."""
    import cv2

    n, h, w, c = images.shape
    out = np.empty_like(images)
    area = rng.uniform(cfg.crop_scale[0], cfg.crop_scale[1], n)
    log_ratio = rng.uniform(math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), n)
    ratio = np.exp(log_ratio)
    cw = np.clip(np.sqrt(area * ratio) * w, 1.0, w)
    ch = np.clip(np.sqrt(area / ratio) * h, 1.0, h)
    x0 = rng.uniform(0.0, 1.0, n) * (w - cw)
    y0 = rng.uniform(0.0, 1.0, n) * (h - ch)
    flips = np.logical_and(rng.random(n) < 0.5, cfg.flip)
    for i in range(n):
        sx, sy = w / cw[i], h / ch[i]
        # maps the crop box onto the whole output (pixel centres at integers); a flip mirrors the x axis
        m = np.array([[sx, 0.0, sx * (0.5 - x0[i]) - 0.5], [0.0, sy, sy * (0.5 - y0[i]) - 0.5]])
        if flips[i]:
            m[0] = [-m[0, 0], 0.0, (w - 1) - m[0, 2]]
        warped = cv2.warpAffine(images[i], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        out[i] = warped.reshape(h, w, c)
    if cfg.brightness > 0 or cfg.contrast > 0:
        x = out.astype(np.float32)
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        contrast = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast, (n, 1, 1, 1)).astype(np.float32)
        brightness = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness, (n, 1, 1, 1)).astype(np.float32)
        x = ((x - mean) * contrast + mean) * brightness
        out = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return out
