"""Image bytes for the labelling page: small JPEG thumbnails (cached), and full images in a format every
browser shows (JPEG, PNG, GIF, WebP, BMP are sent as they are; TIFF, PGM, PPM are converted to PNG)."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

THUMB_SIDE = 192
MAX_IMAGE_BYTES = 64 * 1024 * 1024
BROWSER_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
                 ".webp": "image/webp", ".bmp": "image/bmp"}


def _decode(path: Path) -> np.ndarray | None:
    import cv2

    try:
        if os.path.getsize(path) > MAX_IMAGE_BYTES:
            return None
        raw = np.fromfile(path, dtype=np.uint8)
        img = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    except (OSError, cv2.error):
        return None
    return img if img is not None and img.size else None


def thumbnail(path: Path, side: int = THUMB_SIDE) -> bytes | None:
    """A JPEG at most `side` pixels on its longer edge (never enlarged); None when unreadable."""
    import cv2

    img = _decode(path)
    if img is None:
        return None
    h, w = img.shape[:2]
    scale = side / max(h, w)
    if scale < 1.0:
        img = cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    return buf.tobytes() if ok else None


def browser_image(path: Path) -> tuple[bytes, str] | None:
    """(bytes, content type) of the full image as a browser can show it; None when unreadable."""
    import cv2

    kind = BROWSER_TYPES.get(path.suffix.lower())
    try:
        if kind is not None and os.path.getsize(path) <= MAX_IMAGE_BYTES:
            return path.read_bytes(), kind
    except OSError:
        return None
    img = _decode(path)
    if img is None:
        return None
    ok, buf = cv2.imencode(".png", img)
    return (buf.tobytes(), "image/png") if ok else None


class ThumbnailCache:
    """Thumbnails keyed by file identity (path, size, mtime), least recently used evicted; thread-safe."""

    def __init__(self, max_items: int = 1024) -> None:
        self.max_items = max_items
        self._items: OrderedDict[tuple[str, int, int], bytes | None] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> bytes | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = (str(path), st.st_size, st.st_mtime_ns)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = thumbnail(path)  # outside the lock: decoding is the slow part
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return data
