"""Camera sources through OpenCV, read in one of two modes chosen from the source string (source_is_live).

Sources (CameraConfig.source):
    "0", "/dev/video0"         V4L2 device (cv2.CAP_V4L2)
    "rtsp://…", "http://…"     network stream (cv2.CAP_FFMPEG, with open/read timeouts)
    "gst:<pipeline>"           GStreamer pipeline ending in appsink (needs an OpenCV built with GStreamer)
    "synthetic:…"              generated frames, see agent.synthetic
    anything else              a video file (looped when loop = true)

Live sources (devices, streams, pipelines, synthetic with live=1) run on their own clock, so a grabber thread
reads them continuously and keeps only the newest frame: the driver's buffer never goes stale, frames the
consumer did not take in time are replaced and counted as skipped, and at most `fps` frames per second are
decoded. Files and other synthetic sources deliver frames on demand, so they get no thread: `latest()` reads
the next frame on the caller's thread ("pull mode"), paced at `fps` (0 = as fast as the caller asks). That
saves the per-frame hand-off between threads (most of the cost of a cheap frame on one core), decodes nothing
for nobody, and skips no frame of a file (a consumer slower than the file's frame rate plays it slower than
real time). Both modes share one state machine (Camera._step): failures (open error, read error or timeout,
vanished file) close the source and reopen it after an exponential backoff with full jitter; in pull mode the
backoff never holds `latest()` past its timeout. The end of a file or finite source with loop = false is not a
failure: the camera goes to state "ended" and is never reopened, so a clip is played exactly once.
"""

from __future__ import annotations

import logging
import math
import random
import re
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import cv2
import numpy as np

from edgecv.agent.config import CameraConfig
from edgecv.agent.errors import CameraError
from edgecv.agent.vision.synthetic import PREFIX as SYNTHETIC_PREFIX
from edgecv.agent.vision.synthetic import SourceSpecError, SyntheticSource, synthetic_is_live

log = logging.getLogger(__name__)

STATE_OPENING, STATE_OPEN, STATE_REOPENING = "opening", "open", "reopening"
STATE_FAILED, STATE_ENDED = "failed", "ended"
WARN_INTERVAL_S = 30.0
_FPS_WINDOW = 30


class Frame(NamedTuple):
    """One captured frame: uint8 HxWx3 BGR (or HxWx1 gray), capture time (epoch s), per-camera sequence
    number (monotonic across reopens), the true class when the source knows it (synthetic), camera name.
    A NamedTuple: one is made per frame, and it is several times cheaper to build than a frozen dataclass."""

    image: np.ndarray
    ts: float
    seq: int
    truth: int | None = None
    camera: str = ""


class FrameSource(Protocol):
    """What a Camera reads. `grab()` advances (False on failure or end, reason in `.error`; `.ended` set when the
    source has no more frames by design: the end of a file or finite source with loop = false); `retrieve()` decodes
    the grabbed frame. Whether it is drained by a grabber thread is decided from the source string
    (source_is_live), before anything is opened."""

    error: str | None
    ended: bool

    def grab(self) -> bool: ...

    def retrieve(self) -> tuple[np.ndarray, int | None]: ...

    def close(self) -> None: ...


def has_gstreamer() -> bool:
    info = cv2.getBuildInformation()
    match = re.search(r"GStreamer:\s*(\S+)", info)
    return bool(match) and match.group(1).upper() != "NO"  # type: ignore[union-attr]


def source_is_live(source: str) -> bool:
    """Whether a source runs on its own clock (devices, streams, pipelines, synthetic with live=1: a grabber
    thread drains it) or delivers frames on demand (files, other synthetic sources: read on the consumer's thread).
    """
    if source.startswith(SYNTHETIC_PREFIX):
        try:
            return synthetic_is_live(source)
        except SourceSpecError:
            return False  # opening it fails for good, on the consumer's first read
    return source.isdigit() or source.startswith(("/dev/video", "gst:")) or "://" in source


def redact(source: str) -> str:
    """Hide credentials in stream URLs (rtsp://user:pass@host → rtsp://***@host) for logs and status."""
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", source)


class CaptureSource:
    """A cv2.VideoCapture (V4L2, FFmpeg stream, GStreamer or file)."""

    def __init__(self, cfg: CameraConfig) -> None:
        self.cfg = cfg
        self.error: str | None = None
        self.ended = False
        src = cfg.source
        self.path: Path | None = None
        self._inode: tuple[int, int] | None = None
        self._checked = 0.0
        if src.isdigit() or src.startswith("/dev/video"):
            self.live, self.kind = True, "v4l2"
            self._cap = cv2.VideoCapture(int(src) if src.isdigit() else src, cv2.CAP_V4L2)
        elif src.startswith("gst:"):
            if not has_gstreamer():
                raise SourceSpecError(
                    "This OpenCV build has no GStreamer support (cv2.getBuildInformation() says 'GStreamer: "
                    "NO'), so 'gst:' sources cannot work; install an OpenCV built with GStreamer (e.g. Debian's "
                    "python3-opencv) or use a V4L2 / RTSP / file source")
            self.live, self.kind = True, "gstreamer"
            self._cap = cv2.VideoCapture(src[4:], cv2.CAP_GSTREAMER)
        elif "://" in src:
            self.live, self.kind = True, "stream"
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(cfg.open_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(cfg.read_timeout_s * 1000)]
            self._cap = cv2.VideoCapture(src, cv2.CAP_FFMPEG, params)
        else:
            self.live, self.kind = False, "file"
            self.path = Path(src)
            self._cap = self._open_file()
        if not self._cap.isOpened():
            self._cap.release()
            raise CameraError(f"Cannot open {self.kind} source {redact(src)}; check that it exists and is reachable")
        if self.live:
            self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
            if cfg.width:
                self._cap.set(cv2.CAP_PROP_FRAME_WIDTH, cfg.width)
            if cfg.height:
                self._cap.set(cv2.CAP_PROP_FRAME_HEIGHT, cfg.height)

    def _open_file(self) -> cv2.VideoCapture:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError as exc:
            raise CameraError(f"Video file {self.path} does not exist or is unreadable ({exc.strerror}); "
                              "check camera.source") from exc
        self._inode = (st.st_dev, st.st_ino)
        self._checked = time.monotonic()
        return cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)

    def _file_vanished(self) -> bool:
        assert self.path is not None
        try:
            st = self.path.stat()
        except OSError:
            return True
        return (st.st_dev, st.st_ino) != self._inode

    def grab(self) -> bool:
        if self.path is not None and time.monotonic() - self._checked > 1.0:
            self._checked = time.monotonic()
            if self._file_vanished():
                self.error = f"Video file {self.path} vanished or was replaced"
                return False
        if self._cap.grab():
            return True
        if self.path is not None and self.cfg.loop:
            # Rewind by reopening the path: also notices a file that was deleted or replaced.
            self._cap.release()
            if self._file_vanished():
                self.error = f"Video file {self.path} vanished or was replaced"
                return False
            self._cap = self._open_file()
            if self._cap.grab():
                return True
        if self.path is not None and not self.cfg.loop:
            self.error, self.ended = "End of video file (loop = false)", True
        else:
            self.error = f"Read from {self.kind} source failed or timed out"
        return False

    def retrieve(self) -> tuple[np.ndarray, int | None]:
        ok, image = self._cap.retrieve()
        if not ok or image is None:
            raise CameraError(f"Decoding a frame from {self.kind} source failed")
        if image.ndim == 2:
            image = image[:, :, None]
        return image, None

    def close(self) -> None:
        self._cap.release()


def open_source(cfg: CameraConfig) -> FrameSource:
    """Open the source a camera config names. Raises CameraError (SourceSpecError when retrying is futile)."""
    if cfg.source.startswith(SYNTHETIC_PREFIX):
        return SyntheticSource(cfg.source, loop=cfg.loop, width=cfg.width, height=cfg.height, fps=cfg.fps)
    return CaptureSource(cfg)


class Camera:
    """One camera: its source (read by a grabber thread when live, by `latest()` otherwise), the newest frame,
    and a status for health reports."""

    def __init__(self, cfg: CameraConfig, *, backoff_min_s: float = 0.5, backoff_max_s: float = 30.0,
                 opener: Any = None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.live = source_is_live(cfg.source)
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self._opener = opener or open_source
        self._interval = 1.0 / cfg.fps if cfg.fps > 0 else 0.0
        self._lock = threading.Lock()  # guards the frame and the statistics (entered directly on the hot path)
        self._cond = threading.Condition(self._lock)  # ... and wakes latest() of a live camera
        self._reader = threading.Lock()  # held while reading, opening or closing the source: one reader at a time
        self._stop = threading.Event()  # waited on for backoff and pacing
        self._stopping = False  # the same, read once or twice per frame: an attribute costs less than is_set()
        self._running = False
        self._thread: threading.Thread | None = None
        self._source: FrameSource | None = None
        self._attempt = 0
        self._reopen_at = -math.inf
        self._due = -math.inf  # when the next frame may be decoded (fps limit)
        self._frame: Frame | None = None
        self._returned_seq = -1
        self._seq = 0
        self._state = STATE_OPENING  # until the first open; "reopening" only after a failure
        self._error: str | None = None
        self._last_error: str | None = None
        self._reopens = 0
        self._frames = 0
        self._skipped = 0
        self._times: deque[float] = deque(maxlen=_FPS_WINDOW)
        self._last_warn = -WARN_INTERVAL_S
        self._suppressed = 0
        self._opened = False  # opened at least once: later opens are reopens, logged at most once per interval
        self._last_reopen_log = -WARN_INTERVAL_S
        self._unlogged_reopens = 0
        self._shape: tuple[int, ...] | None = None  # of the newest frame

    # -- consumer side ----------------------------------------------------------------------------------

    def start(self) -> Camera:
        """Arm the camera; a live one starts its grabber thread. The first open happens on the grabber thread or
        in the first `latest()` call; status() says 'opening' until then."""
        if self._running:
            return self
        self._stop.clear()
        self._stopping = False
        self._running = True
        if self.live:
            self._thread = threading.Thread(target=self._run, name=f"camera-{self.name}", daemon=True)
            self._thread.start()
        return self

    def latest(self, timeout: float = 1.0) -> Frame | None:
        """The newest frame not returned before (live) or the next frame read now (pull mode), waiting up to
        `timeout` seconds; None if none could be had in time, and at once after stop()."""
        deadline = time.monotonic() + timeout
        if not self.live:
            return self._pull(deadline)
        with self._cond:
            while self._frame is None or self._frame.seq <= self._returned_seq:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(remaining)
            self._returned_seq = self._frame.seq
            return self._frame

    def status(self) -> dict[str, Any]:
        """{name, source, state, error, last_error, fps, reopens, frames, skipped, width, height, last_frame_ts}.

        `state`: opening (not opened yet), open, reopening (failed; retrying with backoff), failed (the source string
        is wrong; no retry), ended (a finite source played once). `error` is the current problem (None while open);
        `last_error` keeps the most recent one for diagnosis, also after the camera recovered.
        """
        with self._cond:
            times = list(self._times)
            fps = 0.0
            if len(times) >= 2 and time.monotonic() - times[-1] < 5.0 and times[-1] > times[0]:
                fps = (len(times) - 1) / (times[-1] - times[0])
            return {
                "name": self.name,
                "source": redact(self.cfg.source),
                "state": self._state,
                "error": self._error,
                "last_error": self._last_error,
                "fps": round(fps, 2),
                "reopens": self._reopens,
                "frames": self._frames,
                "skipped": self._skipped,
                "width": int(self._shape[1]) if self._shape else None,
                "height": int(self._shape[0]) if self._shape else None,
                "last_frame_ts": self._frame.ts if self._frame else None,
            }

    @property
    def state(self) -> str:
        return self._state

    @property
    def grabber(self) -> threading.Thread | None:
        """The grabber thread of a started live camera (None in pull mode)."""
        return self._thread

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading and release the source. Waits up to `timeout` for a grabber blocked in a read; a
        `latest()` caller mid-read is not waited for: it closes the source itself when its read returns."""
        self._stopping = True
        self._stop.set()
        self._running = False
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("Camera %s: grabber did not stop within %.1f s (blocked read)", self.name, timeout)
            self._thread = None
        self._release()

    def __enter__(self) -> Camera:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- reading: the grabber thread (live) or latest() (pull mode), one state machine ---------------------

    def _run(self) -> None:
        with self._reader:
            while not self._stop.is_set() and self._state not in (STATE_FAILED, STATE_ENDED):
                self._step(math.inf)
        self._release()

    def _pull(self, deadline: float) -> Frame | None:
        """Pull mode: read the next frame on the caller's thread, stepping until one is read or `deadline`."""
        if self._stopping:
            return None
        if not self._running:  # not started: nothing to read, but no busy loop for a caller that polls
            self._sleep_until(deadline)
            return None
        if not self._reader.acquire(blocking=False) and not self._reader.acquire(
                timeout=max(0.0, deadline - time.monotonic())):
            return None
        try:
            while not self._stopping:
                frame = self._step(deadline)
                if frame is not None or time.monotonic() >= deadline:
                    return frame
            return None
        finally:
            self._reader.release()
            if self._stopping:
                self._release()

    def _step(self, deadline: float) -> Frame | None:
        """One step, with the reader lock held: open the source when its reopen is due, read one frame, or record
        a failure and schedule the reopen. Waits (on the stop event) for the reopen or the fps pacing, but not
        past `deadline` (monotonic; infinite for the grabber). Returns the frame read, if any."""
        if self._state in (STATE_FAILED, STATE_ENDED):
            self._sleep_until(deadline)
            return None
        source = self._source
        if source is None:
            if self._reopen_at > deadline:
                self._sleep_until(deadline)
                return None
            if not self._sleep_until(self._reopen_at):
                return None
            try:
                source = self._source = self._opener(self.cfg)
            except SourceSpecError as exc:
                self._set_state(STATE_FAILED, str(exc))
                log.error("Camera %s: %s", self.name, exc)
                return None
            except Exception as exc:  # OpenCV and OS errors alike: retry later
                self._fail(str(exc))
                return None
            self._log_open()
        if self._interval and not self.live:  # pull mode: pace at fps, on the caller's thread, within its timeout
            if self._due > deadline:
                self._sleep_until(deadline)
                return None
            if not self._sleep_until(self._due):
                return None
            self._due = time.monotonic() + self._interval
        try:
            frame = self._read(source)
            error = source.error
        except Exception as exc:
            frame, error = None, f"{type(exc).__name__}: {exc}"
        if frame is not None:
            if self._state != STATE_OPEN:
                self._set_state(STATE_OPEN, None)
            self._attempt = 0
            return frame
        ended = getattr(source, "ended", False)
        self._close()
        if ended:
            self._set_state(STATE_ENDED, None)
            log.info("Camera %s: %s; not reopened", self.name, error or "the source ended")
        elif not self._stopping:
            self._fail(error or "Read failed")
        return None

    def _read(self, source: FrameSource) -> Frame | None:
        """Grab, decode and publish one frame; None when the source failed (reason in source.error)."""
        if self.live:
            # Drain the driver's queue continuously; decode only when the fps limit allows. The limit is a
            # schedule, not a minimum gap since the last decode: a camera running at (a multiple of) `fps` would
            # otherwise have most frames arrive a hair early and be dropped, decoding well below `fps`.
            while True:
                if not source.grab():
                    return None
                now = time.monotonic()
                if now >= self._due or self._stopping:
                    break
            self._due = max(self._due + self._interval, now)
        elif not source.grab():
            return None
        image, truth = source.retrieve()
        now = time.monotonic()
        with self._lock:
            frame = Frame(image, time.time(), self._seq, truth, self.name)
            self._seq += 1
            self._frames += 1
            self._times.append(now)
            self._shape = image.shape
            if self.live:
                if self._frame is not None and self._frame.seq > self._returned_seq:
                    self._skipped += 1  # replaced before the consumer took it
                self._frame = frame
                self._cond.notify_all()  # wake latest()
            else:
                self._frame = frame
                self._returned_seq = frame.seq  # pull mode: the caller reading it takes it
        return frame

    def _sleep_until(self, t: float) -> bool:
        """Wait on the stop event until monotonic time `t` (forever when infinite); False once stopping."""
        wait = t - time.monotonic()
        if wait <= 0:
            return not self._stopping
        return not self._stop.wait(None if math.isinf(wait) else wait)

    def _fail(self, error: str) -> None:
        """Record a failure and schedule the reopen after an exponential backoff with full jitter."""
        with self._cond:
            self._reopens += 1
        self._set_state(STATE_REOPENING, error)
        self._warn("Camera %s: %s; reopening (attempt %d)", self.name, error, self._attempt + 1)
        ceiling = min(self.backoff_max_s, self.backoff_min_s * (2 ** min(self._attempt, 30)))
        self._reopen_at = time.monotonic() + random.uniform(0.0, ceiling)
        self._attempt += 1

    def _close(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            try:
                source.close()
            except Exception:
                log.debug("Camera %s: closing the source failed", self.name, exc_info=True)

    def _release(self) -> None:
        """Close the source once stopping, unless a reader holds it: that reader calls this again when done."""
        if self._stopping and self._reader.acquire(blocking=False):
            try:
                self._close()
            finally:
                self._reader.release()

    def _set_state(self, state: str, error: str | None) -> None:
        with self._cond:
            self._state = state
            if error is not None or state == STATE_OPEN:
                self._error = error
            if error is not None:
                self._last_error = error

    def _log_open(self) -> None:
        """The first open at INFO; reopens (a camera that keeps failing reopens every few seconds) at INFO at most once
        per WARN_INTERVAL_S with how many there were, the others at DEBUG, like the failures themselves."""
        source = redact(self.cfg.source)
        if not self._opened:
            self._opened = True
            log.info("Camera %s: opened %s", self.name, source)
            return
        now = time.monotonic()
        self._unlogged_reopens += 1
        if now - self._last_reopen_log >= WARN_INTERVAL_S:
            log.info("Camera %s: reopened %s%s", self.name, source,
                     f" ({self._unlogged_reopens} reopens since the previous such line)"
                     if self._unlogged_reopens > 1 else "")
            self._last_reopen_log, self._unlogged_reopens = now, 0
        else:
            log.debug("Camera %s: reopened %s", self.name, source)

    def _warn(self, msg: str, *args: object) -> None:
        """At most one warning per WARN_INTERVAL_S per camera; the rest are counted and summarised."""
        now = time.monotonic()
        if now - self._last_warn >= WARN_INTERVAL_S:
            if self._suppressed:
                msg += f" ({self._suppressed} similar warnings suppressed)"
                self._suppressed = 0
            log.warning(msg, *args)
            self._last_warn = now
        else:
            self._suppressed += 1
