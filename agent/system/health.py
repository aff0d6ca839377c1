"""Run-time statistics of the agent and the periodic `health` payload built from them.

Each camera loop records what happens to each frame (skipped, inferred with its latencies, published, failed) in
its own FrameCounters; `payload()` sums them into the health message (topics.HEALTH_KEYS): rates over the last
interval, latency percentiles, the process's CPU share (from /proc/self/stat deltas, percent of one core) and
resident memory (/proc/self/statm), plus the SoC temperature and throttling state when the machine exposes them
(agent/system/thermal.py).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from edgecv.agent.contract.topics import now

log = logging.getLogger(__name__)

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def read_cpu_seconds() -> float | None:
    """User + system CPU time of this process in seconds, from /proc/self/stat (None off Linux)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            raw = fh.read().decode()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime (fields 14 and 15 of the full line)


def read_rss_mb() -> float | None:
    """Resident set size of this process in MiB, from /proc/self/statm (None off Linux)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * _PAGE / (1024 * 1024)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of a list; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


class FrameCounters:
    """One camera loop's counts and latency windows; each frame the loop takes is counted once, as skipped,
    inferred or failed.

    Written only by that loop's thread, so without a lock: at thousands of frames per second a lock and a method
    call per frame are a measurable share of an ~80 µs frame. Readers (the health thread, probation) only read
    ints and copy deques, which are atomic under the GIL.

    A classified frame is recorded by Agent.process itself, inline (a method call per frame costs ~0.6 µs there):
    frames and inferred += 1, published += 1 if it went out, its "total" and "infer" latencies appended.
    """

    __slots__ = ("errors", "frames", "infer_ms", "inferred", "published", "skipped", "total_ms")

    def __init__(self, window: int, probation_window: int) -> None:
        self.frames = 0
        self.inferred = 0
        self.published = 0
        self.errors = 0
        self.skipped: dict[str, int] = {}
        self.total_ms: deque[float] = deque(maxlen=window)  # since the last health payload
        self.infer_ms: deque[float] = deque(maxlen=probation_window)  # newest N inferences, any report

    def skip(self, reason: str) -> None:
        self.frames += 1
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def error(self) -> None:
        """A frame whose processing raised."""
        self.frames += 1
        self.errors += 1


class HealthMonitor:
    """Sums the camera loops' FrameCounters; `payload()` is called by the health timer."""

    def __init__(self, device: str, *, window: int = 2000, probation_window: int = 200,
                 thermal: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.device = device
        self._clock = clock
        self._lock = threading.Lock()
        self._window, self._probation_window = window, probation_window
        self._loops: list[FrameCounters] = []
        self.started = clock()
        self._last_t = self.started
        self._last_inferred = 0
        self._last_cpu = read_cpu_seconds()
        self._thermal = thermal

    def counters(self) -> FrameCounters:
        """New counters for one camera loop (its thread alone writes them)."""
        counters = FrameCounters(self._window, self._probation_window)
        with self._lock:
            self._loops = [*self._loops, counters]  # copy-on-write: readers iterate without the lock
        return counters

    @property
    def frames(self) -> int:
        return sum(c.frames for c in self._loops)

    @property
    def inferred(self) -> int:
        return sum(c.inferred for c in self._loops)

    @property
    def published(self) -> int:
        return sum(c.published for c in self._loops)

    @property
    def skipped(self) -> dict[str, int]:
        out = {"motion": 0, "stale": 0}
        for c in self._loops:
            for reason, n in list(c.skipped.items()):
                out[reason] = out.get(reason, 0) + n
        return out

    # ------------------------------------------------------------------------------------- model swaps
    @property
    def errors(self) -> int:
        """Frames that failed since start."""
        return sum(c.errors for c in self._loops)

    def reset_infer_window(self) -> None:
        """Forget inference times (called on a model swap so `infer_p50` reflects the new model only)."""
        for c in self._loops:
            c.infer_ms.clear()

    # --------------------------------------------------------------------------------------- payload
    def payload(self, *, dropped: int, queue_depth: int, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The health message (topics.HEALTH_KEYS, plus soc_temp_c/throttled when available, plus `extra`)."""
        t = self._clock()
        cpu = read_cpu_seconds()
        loops = self._loops
        inferred = sum(c.inferred for c in loops)
        totals = [v for c in loops for v in _take_all(c.total_ms)]
        infer = [v for c in loops for v in list(c.infer_ms)]
        skipped = self.skipped
        dt = max(1e-6, t - self._last_t)
        fps = (inferred - self._last_inferred) / dt
        self._last_t, self._last_inferred = t, inferred
        doc: dict[str, Any] = {
            "ts": now(), "device": self.device, "uptime_s": round(t - self.started, 1),
            "fps": round(fps, 2), "frames": self.frames, "inferred": inferred,
            "skipped": sum(skipped.values()), "skipped_by": skipped,
            "published": self.published, "dropped": dropped, "queue_depth": queue_depth,
            "errors": self.errors,
        }
        cpu_percent = None
        if cpu is not None and self._last_cpu is not None:
            cpu_percent = round(100.0 * (cpu - self._last_cpu) / dt, 1)
        self._last_cpu = cpu
        rss = read_rss_mb()
        doc["latency_ms"] = {"p50": _r(percentile(totals, 50)), "p95": _r(percentile(totals, 95)),
                             "infer_p50": _r(percentile(infer, 50))}
        doc["cpu_percent"] = cpu_percent
        doc["rss_mb"] = round(rss, 1) if rss is not None else None
        if self._thermal:
            doc.update(_thermal_readings())
        if extra:
            doc.update(extra)
        return doc


def _take_all(values: deque[float]) -> list[float]:
    """Empty a deque another thread appends to, losing nothing (popleft and append are atomic)."""
    return [values.popleft() for _ in range(len(values))]


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _thermal_readings() -> dict[str, Any]:
    """soc_temp_c and throttled from agent/system/thermal.py; absent values are left out."""
    try:
        from edgecv.agent.system import thermal
    except ImportError:  # pragma: no cover - thermal.py ships with the agent
        return {}
    out: dict[str, Any] = {}
    try:
        temp = thermal.read_soc_temperature()
        if temp is not None:
            out["soc_temp_c"] = temp
        throttled = thermal.read_throttling()
        if throttled is not None:
            out["throttled"] = throttled
    except Exception as exc:  # never let a sensor break the health report
        log.debug("Thermal readings failed: %s", exc)
    return out
