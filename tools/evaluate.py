"""Run exported artifacts in their real runtimes (onnxruntime, LiteRT) to measure accuracy, agreement,
latency and size.

Models are opened through the device's own adapters (`agent.runtimes.open_engine`), so what is measured
here is what a device runs: same int8 input/output handling, same thread settings.
"""

from __future__ import annotations

import gzip
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgecv.agent.errors import InferenceError
from edgecv.agent.vision.runtimes import Engine, open_engine

log = logging.getLogger(__name__)

# The bound every shipped artifact must meet against fp32 (issue #12): top-1 agreement overall, and where fp32 is
# confident (top-1 probability > 0.5).
MIN_AGREEMENT = 0.97
MIN_CONFIDENT_AGREEMENT = 0.99


@dataclass(frozen=True)
class ArtifactEval:
    """One artifact measured in its runtime: accuracy on (x, y), per-image top-1, sizes, batch-1 latency."""

    accuracy: float
    top1: np.ndarray
    bytes: int
    gzip_bytes: int
    latency_ms_median: float

    def as_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "bytes": self.bytes, "gzip_bytes": self.gzip_bytes,
                "latency_ms_median": self.latency_ms_median}


def run_logits(engine: Engine, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Logits of `engine` for every row of `x`, fed in chunks of `batch` (one by one if the model is batch-1)."""
    x = np.asarray(x, dtype=np.float32)
    outs = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        try:
            outs.append(engine.run(chunk))
        except InferenceError:
            if len(chunk) == 1:
                raise
            # Models with a fixed batch of 1 (LiteRT int8 exports) take one image at a time.
            log.debug("%s rejected a batch of %d; running images one by one", engine.name, len(chunk))
            outs.append(np.concatenate([engine.run(chunk[j:j + 1]) for j in range(len(chunk))], axis=0))
    if not outs:
        raise InferenceError("No images to evaluate; pass a non-empty evaluation set")
    return np.concatenate(outs, axis=0)


def predict_top1(path: Path, fmt: str, x: np.ndarray, threads: int = 1, batch: int = 256) -> np.ndarray:
    """Top-1 class index of every row of `x` from the model file at `path` ('onnx' or 'tflite')."""
    engine = open_engine(Path(path), fmt, threads=threads)
    return np.argmax(run_logits(engine, x, batch), axis=1)


def evaluate_artifact(path: Path, fmt: str, x: np.ndarray, y: np.ndarray, threads: int = 1, batch: int = 256,
                      latency_runs: int = 500) -> ArtifactEval:
    """Accuracy, top-1, raw/gzip size and median single-image latency of one artifact in its real runtime."""
    path = Path(path)
    engine = open_engine(path, fmt, threads=threads)
    top1 = np.argmax(run_logits(engine, x, batch), axis=1)
    accuracy = float(np.mean(top1 == np.asarray(y))) if len(top1) else 0.0
    latency = _latency(engine, np.asarray(x[:1], dtype=np.float32), runs=latency_runs,
                       warmup=min(50, latency_runs)) if latency_runs > 0 else float("nan")
    result = ArtifactEval(accuracy=accuracy, top1=top1, bytes=path.stat().st_size, gzip_bytes=gzip_size(path),
                          latency_ms_median=latency)
    log.debug("%s (%s): accuracy %.4f, %d bytes (gzip %d), %.3f ms median", path.name, engine.name, accuracy,
             result.bytes, result.gzip_bytes, latency)
    return result


def measure_latency(path: Path, fmt: str, sample: np.ndarray, runs: int = 500, threads: int = 1,
                    warmup: int = 50) -> float:
    """Median wall time in ms of one inference on `sample` (batch 1 if `sample` is one image)."""
    engine = open_engine(Path(path), fmt, threads=threads)
    sample = np.asarray(sample, dtype=np.float32)
    return _latency(engine, sample, runs=runs, warmup=warmup)


def agreement(a_top1: np.ndarray, b_top1: np.ndarray) -> float:
    """Fraction of images on which two models give the same top-1 class."""
    a, b = np.asarray(a_top1), np.asarray(b_top1)
    if a.shape != b.shape:
        raise ValueError(f"Cannot compare predictions of different lengths: {a.shape} vs {b.shape}")
    return float(np.mean(a == b)) if len(a) else 0.0


def confident_mask(outputs: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Rows whose top-1 probability exceeds `threshold`: softmax of logits, or the outputs themselves when every
    row already is a probability vector (a model that ends in Softmax)."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.size and out.min() >= 0.0 and np.allclose(out.sum(axis=1), 1.0, atol=1e-3):
        probs = out
    else:
        z = out - out.max(axis=1, keepdims=True)
        e = np.exp(z)
        probs = e / e.sum(axis=1, keepdims=True)
    return np.asarray(probs.max(axis=1) > threshold)


def gzip_size(path: Path) -> int:
    """Bytes of the file after gzip -9: what a sparse or low-entropy model costs to ship."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9, mtime=0))


def _latency(engine: Engine, sample: np.ndarray, *, runs: int, warmup: int) -> float:
    if sample.ndim < 2 or len(sample) == 0:
        raise ValueError(f"Latency sample must be a batch (1, ...), got shape {sample.shape}")
    for _ in range(warmup):
        engine.run(sample)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        engine.run(sample)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0


@dataclass(frozen=True)
class ArtifactOutcome:
    """What became of one candidate artifact: the file when it is shipped, its measured agreement with fp32, and
    one line saying so (or why not)."""

    path: Path | None
    note: str
    agreement: float | None = None
    confident_agreement: float | None = None
    confident: int = 0
    images: int = 0
    bytes: int = 0

    @property
    def shipped(self) -> bool:
        return self.path is not None

    def as_dict(self) -> dict[str, object]:
        return {"shipped": self.shipped, "agreement": self.agreement, "confident_agreement": self.confident_agreement,
                "confident_images": self.confident, "images": self.images, "bytes": self.bytes, "note": self.note}


def judge_artifact(reference: np.ndarray, path: Path, fmt: str, x_eval: np.ndarray, *, label: str,
                   runtime: str | None = None, min_agreement: float = MIN_AGREEMENT,
                   min_confident: float = MIN_CONFIDENT_AGREEMENT, force: bool = False, remove: bool = True,
                   extra: str = "") -> ArtifactOutcome:
    """Measure an artifact in its runtime against the fp32 outputs `reference` on `x_eval`: top-1 agreement overall
    and where fp32 is confident. Within both bounds (or with `force`) it is shipped; otherwise the outcome says by
    how much it missed, and the file is deleted when `remove`. `extra` is appended to the measured sentence."""
    got = run_logits(open_engine(Path(path), fmt, threads=1, runtime=runtime), x_eval)
    same = got.argmax(axis=1) == np.asarray(reference).argmax(axis=1)
    confident = confident_mask(reference)
    agree = float(same.mean())
    agree_conf = float(same[confident].mean()) if confident.any() else None
    measured = (f"{label} agrees with fp32 on {agree:.1%} of {len(same)} images"
                + (f" ({agree_conf:.1%} of the {int(confident.sum())} where fp32 is confident)"
                   if agree_conf is not None else "") + extra)
    misses = []
    if agree + 1e-9 < min_agreement:
        misses.append(f"{(min_agreement - agree) * 100:.1f} points under the {min_agreement:.0%} bound")
    if agree_conf is not None and agree_conf + 1e-9 < min_confident:
        misses.append(f"{(min_confident - agree_conf) * 100:.1f} points under the {min_confident:.0%} bound where "
                      "fp32 is confident")
    size = Path(path).stat().st_size

    def outcome(shipped: Path | None, verdict: str) -> ArtifactOutcome:
        return ArtifactOutcome(shipped, f"{measured}: {verdict}", agreement=agree, confident_agreement=agree_conf,
                               confident=int(confident.sum()), images=len(same), bytes=size)

    if not misses:
        return outcome(Path(path), "shipped")
    if force:
        return outcome(Path(path), f"{'; '.join(misses)}; shipped because of --force")
    if remove:
        Path(path).unlink(missing_ok=True)
    return outcome(None, f"{'; '.join(misses)}; not shipped (--force ships it anyway)")


def side_by_side_ms(engines: Sequence[Engine], sample: np.ndarray, runs: int = 200, rounds: int = 10) -> list[float]:
    """Median ms of one inference on `sample` per engine, timed in interleaved rounds (each engine in turn), so
    background load on the machine hits them all alike."""
    per_round = max(1, runs // rounds)
    for engine in engines:
        for _ in range(3):
            engine.run(sample)
    times: list[list[float]] = [[] for _ in engines]
    for _ in range(rounds):
        for i, engine in enumerate(engines):
            for _ in range(per_round):
                start = time.perf_counter()
                engine.run(sample)
                times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]
