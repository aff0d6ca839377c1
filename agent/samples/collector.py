"""Deciding which classification results to keep as samples (on the camera thread, cheap), and writing them (on one
writer thread: JPEG encoding and disk writes never slow the camera loop).

A result is kept for one reason, in this order of precedence: `state_change` (it confirmed a region's new stable
state), `pending` (it began a run towards another state), `low_confidence` (top-1 score below the threshold) or
`periodic` (none of those for `every_s` on this camera/region). Per camera/region and reason at most one sample per
`min_interval_s`: a flickering scene cannot fill the disk, and a pending sample does not hide the state change that
follows it a few frames later. The image is copied and handed to a bounded queue; when it is full the sample is
counted as `dropped` and the camera loop carries on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgecv.agent.config import SamplesConfig
from edgecv.agent.contract.samples import MAX_LABELS_BYTES
from edgecv.agent.errors import EdgecvError
from edgecv.agent.samples.store import SampleStore
from edgecv.agent.vision.classifier import Classifier

log = logging.getLogger(__name__)

WARN_EVERY_S = 30.0
EXPIRE_EVERY_S = 60.0  # the idle writer applies samples.max_age_h at least this often


@dataclass(frozen=True)
class PendingSample:
    """What the writer thread needs: the image (a private copy) and its sidecar fields."""

    image: np.ndarray
    meta: dict[str, Any]
    ts: float


class SampleCollector:
    """`offer(...)` from the camera loops; `start()` runs the writer thread, `threads` is for the supervisor."""

    def __init__(self, cfg: SamplesConfig, store: SampleStore, device_id: str) -> None:
        self.cfg = cfg
        self.store = store
        self.device_id = device_id
        self._queue: queue.Queue[PendingSample | None] = queue.Queue(maxsize=cfg.queue)
        self._last: dict[tuple[str, str], float] = {}  # (camera/region, reason) -> monotonic time of the last one
        self._last_any: dict[str, float] = {}  # camera/region -> monotonic time of its last sample (periodic)
        self._labels: dict[str, list[str] | None] = {}  # model sha -> its labels, when small enough to travel
        self._thread: threading.Thread | None = None
        self.offered = Counter[str]()
        self.dropped = 0
        self.limited = 0
        self.errors = 0
        self._warned = -1e9

    # --------------------------------------------------------------------------------- camera threads
    def reason(self, key: str, top: list[dict[str, Any]], now: float, *, state_change: bool = False,
               pending: bool = False) -> str | None:
        """Why this result is worth keeping (see the module docstring), or None. Marks it taken."""
        cfg = self.cfg
        score = float(top[0]["score"]) if top else 0.0
        if state_change and cfg.state_changes:
            reason = "state_change"
        elif pending and cfg.pending:
            reason = "pending"
        elif cfg.low_confidence > 0 and score < cfg.low_confidence:
            reason = "low_confidence"
        elif cfg.every_s > 0 and now - self._last_any.get(key, -1e18) >= cfg.every_s:
            reason = "periodic"
        else:
            return None
        if now - self._last.get((key, reason), -1e18) < cfg.min_interval_s:
            self.limited += 1
            return None
        self._last[(key, reason)] = now
        self._last_any[key] = now
        return reason

    def offer(self, *, camera: str, region: str | None, crop: np.ndarray | None, frame: np.ndarray,
              top: list[dict[str, Any]], clf: Classifier, frame_ts: float, truth: int | None,
              state_change: bool = False, pending: bool = False) -> str | None:
        """Keep this result if a rule says so: returns the reason when it was queued. Never blocks."""
        key = camera if region is None else f"{camera}/{region}"
        reason = self.reason(key, top, time.monotonic(), state_change=state_change, pending=pending)
        if reason is None:
            return None
        image = crop if crop is not None and self.cfg.what == "crop" else frame
        best = top[0] if top else {}
        meta = {"predicted": best.get("label"), "score": _score(best.get("score")), "camera": camera,
                "region": region, "ts": round(frame_ts, 3), "reason": reason, "device": self.device_id,
                "model": {"name": clf.name, "version": clf.version, "sha": clf.bundle.manifest_sha256,
                          **({"labels": labels} if (labels := self._model_labels(clf)) is not None else {})},
                "truth": truth}
        try:
            self._queue.put_nowait(PendingSample(np.array(image, copy=True), meta, frame_ts))
        except queue.Full:
            self.dropped += 1
            return None
        self.offered[reason] += 1
        return reason

    def _model_labels(self, clf: Classifier) -> list[str] | None:
        """The model's labels for the sidecar, unless the list is too long to travel with every sample."""
        key = clf.bundle.manifest_sha256
        if key not in self._labels:
            labels = [str(x) for x in clf.labels]
            self._labels[key] = labels if sum(len(x) + 4 for x in labels) <= MAX_LABELS_BYTES else None
        return self._labels[key]

    # ---------------------------------------------------------------------------------- writer thread
    def start(self) -> SampleCollector:
        """Start the writer; it runs until `stop()` (not the agent's stop event: it writes what the loops queued
        while they finished, and a writer that ended early would look like a death to the supervisor)."""
        self._thread = threading.Thread(target=self._run, name="samples", daemon=True)
        self._thread.start()
        return self

    @property
    def threads(self) -> list[threading.Thread]:
        return [self._thread] if self._thread is not None else []

    def stop(self) -> None:
        """Write what is queued, then end the writer (after the camera loops stopped)."""
        try:
            self._queue.put(None, timeout=5.0)
        except queue.Full:
            log.warning("The sample writer is stuck; %d sample(s) not written", self._queue.qsize())
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=EXPIRE_EVERY_S)
            except queue.Empty:  # idle: still apply the age limit
                self._expire()
                continue
            if item is None:
                return
            self.write(item)

    def _expire(self) -> None:
        try:
            self.store.expire()
        except Exception as exc:  # a failing disk must not end the writer
            self.errors += 1
            log.warning("Expiring old samples failed: %s", exc)

    def write(self, item: PendingSample) -> None:
        """Encode and store one sample; a failure is counted and logged (rate-limited), never raised."""
        import cv2

        try:
            ok, jpeg = cv2.imencode(".jpg", item.image, [int(cv2.IMWRITE_JPEG_QUALITY), self.cfg.jpeg_quality])
            if not ok:
                raise EdgecvError("JPEG encoding failed")
            self.store.add(jpeg.tobytes(), item.meta, item.ts)
        except Exception as exc:  # a full disk must not end the writer: count it and go on
            self.errors += 1
            now = time.monotonic()
            if now - self._warned >= WARN_EVERY_S:
                self._warned = now
                log.warning("Storing a sample failed: %s", exc)

    # ----------------------------------------------------------------------------------------- health
    def health(self) -> dict[str, Any]:
        stats = self.store.stats()
        stats.update(dropped=self.dropped, limited=self.limited, errors=self.errors, queued=self._queue.qsize())
        return stats


def _score(value: Any) -> float | None:
    return round(float(value), 6) if isinstance(value, int | float) and not isinstance(value, bool) else None
