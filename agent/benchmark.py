"""On-device benchmark of a bundle: every artifact × installed runtime × thread count, with the real
preprocessing, measured side by side in one run (`edgecv-agent bench` prints it)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgecv.agent.contract.bundle import Bundle
from edgecv.agent.errors import IncompatibleBundleError, RuntimeUnavailableError
from edgecv.agent.vision.classifier import selftest_frames
from edgecv.agent.vision.preprocess import Preprocessor
from edgecv.agent.vision.runtimes import RUNTIMES_FOR_FORMAT, available_runtimes, open_engine

log = logging.getLogger(__name__)

WARMUP_RUNS = 10


@dataclass(frozen=True)
class BenchRow:
    runtime: str
    artifact: str
    format: str
    precision: str
    threads: int
    runs: int
    pre_ms_median: float
    infer_ms_median: float
    infer_ms_p95: float
    total_ms_median: float
    total_ms_p95: float
    fps: float  # 1000 / total_ms_median
    speedup: float  # baseline infer median / this infer median (baseline: fp32 ONNX, 1 thread, else row 0)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_threads() -> tuple[int, ...]:
    cores = os.cpu_count() or 1
    return tuple(t for t in (1, 2, 4) if t <= cores) or (1,)


def benchmark_bundle(bundle: Bundle, runtimes: Sequence[str] | None = None,
                     threads: Sequence[int] | None = None, runs: int = 200) -> list[BenchRow]:
    """Median and p95 latency of preprocess + inference for each artifact, runtime and thread count.

    Frames are the bundle's self-test frames (cycled), or a random camera-sized frame without them.
    Artifacts whose runtime is missing or that fail to open are skipped with a warning.
    """
    wanted = list(runtimes) if runtimes is not None else available_runtimes()
    installed = set(available_runtimes())
    missing = [r for r in wanted if r not in installed]
    if missing:
        raise RuntimeUnavailableError(f"Runtime(s) {', '.join(missing)} not installed here; installed: "
                                      f"{', '.join(sorted(installed)) or 'none'}")
    thread_counts = tuple(threads) if threads else default_threads()
    pre = Preprocessor(bundle.manifest.input)
    frames = _frames(bundle)
    raw: list[dict[str, Any]] = []
    pairs = [(art, rt) for art in bundle.manifest.artifacts for rt in RUNTIMES_FOR_FORMAT.get(art.format, ())
             if rt in wanted]
    for art, runtime in pairs:
        for n in thread_counts:
            try:
                engine = open_engine(bundle.path_of(art.path), art.format, threads=n, runtime=runtime,
                                     precision=art.precision)
            except (RuntimeUnavailableError, IncompatibleBundleError) as exc:
                log.warning("Skipping %s on %s: %s", art.path, runtime, exc)
                break
            pre_ms, infer_ms = _measure(pre, engine.run, frames, runs)
            total = pre_ms + infer_ms
            raw.append({"runtime": runtime, "artifact": art.path, "format": art.format, "precision": art.precision,
                        "threads": n, "runs": runs, "pre_ms_median": float(np.median(pre_ms)),
                        "infer_ms_median": float(np.median(infer_ms)),
                        "infer_ms_p95": float(np.percentile(infer_ms, 95)),
                        "total_ms_median": float(np.median(total)), "total_ms_p95": float(np.percentile(total, 95))})
    if not raw:
        return []
    base = next((r for r in raw if r["format"] == "onnx" and r["precision"] == "fp32" and r["threads"] == 1), raw[0])
    return [BenchRow(**r, fps=1000.0 / r["total_ms_median"] if r["total_ms_median"] > 0 else float("inf"),
                     speedup=base["infer_ms_median"] / r["infer_ms_median"] if r["infer_ms_median"] > 0 else 0.0)
            for r in raw]


def format_table(rows: Sequence[BenchRow]) -> str:
    """A plain-text table of the rows, fastest inference first."""
    header = ("runtime", "artifact", "thr", "pre ms", "infer ms", "p95 ms", "total ms", "fps", "speedup")
    lines = [header]
    for r in sorted(rows, key=lambda r: r.infer_ms_median):
        lines.append((r.runtime, r.artifact, str(r.threads), f"{r.pre_ms_median:.3f}", f"{r.infer_ms_median:.3f}",
                      f"{r.infer_ms_p95:.3f}", f"{r.total_ms_median:.3f}", f"{r.fps:.0f}", f"{r.speedup:.2f}x"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(line, widths, strict=True))) for line in lines)


def _frames(bundle: Bundle) -> list[np.ndarray]:
    """The bundle's self-test frames, or random frames of the input size when it carries none."""
    frames = selftest_frames(bundle)
    if frames:
        return frames
    log.warning("Bundle %s has no readable self-test frames; benchmarking on random frames", bundle.manifest.name)
    spec = bundle.manifest.input
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (spec.height, spec.width, 3), dtype=np.uint8) for _ in range(8)]


def _measure(pre: Preprocessor, run: Any, frames: list[np.ndarray], runs: int) -> tuple[np.ndarray, np.ndarray]:
    for i in range(WARMUP_RUNS):
        run(pre(frames[i % len(frames)]))
    pre_ms = np.empty(runs)
    infer_ms = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        x = pre(frames[i % len(frames)])
        t1 = time.perf_counter()
        run(x)
        t2 = time.perf_counter()
        pre_ms[i], infer_ms[i] = (t1 - t0) * 1e3, (t2 - t1) * 1e3
    return pre_ms, infer_ms
