"""A bundle made runnable: preprocessing + engine + top-k in one object, and the on-device self-test.

`Classifier.load` opens the best artifact for this device, checks that the model's output matches the
bundle's labels with one warm-up inference, and `classify` returns scored labels with the time spent in
each stage. `run_selftest` replays the bundle's self-test frames through that same full path and compares
top-1 with what the workstation recorded; the updater refuses a model that fails it.
"""

from __future__ import annotations

import logging
import statistics
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgecv.agent.contract.bundle import Bundle, load_bundle
from edgecv.agent.errors import IncompatibleBundleError, InferenceError, SelfTestError
from edgecv.agent.vision.postprocess import top_k as rank
from edgecv.agent.vision.preprocess import Preprocessor
from edgecv.agent.vision.runtimes import CodesEngine, Engine, load_engine

log = logging.getLogger(__name__)


class Result(NamedTuple):
    """One classified frame: `top` as [{"label", "index", "score"}], raw logits (classes,), and
    `latency_ms` with keys pre, infer, post, total. A NamedTuple: cheap to build once per frame."""

    top: list[dict[str, Any]]
    logits: np.ndarray
    latency_ms: dict[str, float]


class Classifier:
    """Thread-compatible: one classify() at a time per instance (the service loop owns it)."""

    def __init__(self, bundle: Bundle, engine: Engine, top_k: int = 3, min_score: float = 0.0) -> None:
        self.bundle = bundle
        self.engine = engine
        self.labels: tuple[str, ...] = bundle.manifest.labels
        self.preprocessor = Preprocessor(bundle.manifest.input)
        # Int8-input models: normalisation + input quantization folded into one table look-up per pixel.
        self._codes: tuple[CodesEngine, np.ndarray] | None = None  # (engine, code table) for int8-input models
        if isinstance(engine, CodesEngine) and engine.input_quantizer is not None:
            self._codes = (engine, self.preprocessor.code_table(engine.input_quantizer))
        self.top_k = top_k
        self.min_score = min_score
        # A model that ends in softmax outputs probabilities already: softmax again would flatten the scores.
        self.probabilities = bundle.manifest.output == "probabilities"
        # How the runtime was chosen (`selection.SelectionReport.as_dict()`), when it was measured on this device.
        self.runtime_choice: dict[str, Any] | None = None

    @classmethod
    def load(cls, bundle: Bundle | Path | str, runtime: str = "auto", threads: int = 1, top_k: int = 3,
             min_score: float = 0.0) -> Classifier:
        """Open the bundle's best artifact for `runtime` and verify its output has one logit per label.

        Raises RuntimeUnavailableError (no runtime fits), IncompatibleBundleError (model unusable or its
        output does not match the labels).
        """
        if not isinstance(bundle, Bundle):
            bundle = load_bundle(Path(bundle))
        engine = load_engine(bundle, runtime=runtime, threads=threads)
        return cls.from_engine(bundle, engine, top_k=top_k, min_score=min_score)

    @classmethod
    def from_engine(cls, bundle: Bundle, engine: Engine, top_k: int = 3, min_score: float = 0.0) -> Classifier:
        """Wrap an opened engine after one warm-up inference shows it gives one output per label.

        Raises IncompatibleBundleError when the model does not run on the manifest's input shape or its output
        does not match the labels.
        """
        spec = bundle.manifest.input
        try:
            out = engine.run(np.zeros(spec.shape(1), dtype=np.float32))
        except InferenceError as exc:
            raise IncompatibleBundleError(
                f"Model of bundle {bundle.manifest.name} {bundle.manifest.version} does not run on input shape "
                f"{spec.shape(1)} from its manifest: {exc}; rebuild the bundle") from exc
        if out.shape != (1, len(bundle.manifest.labels)):
            raise IncompatibleBundleError(
                f"Model of bundle {bundle.manifest.name} {bundle.manifest.version} outputs shape {out.shape} but "
                f"the manifest has {len(bundle.manifest.labels)} labels; rebuild the bundle")
        log.info("Loaded %s %s with %s (%s)", bundle.manifest.name, bundle.manifest.version, engine.name,
                 engine.describe().get("path"))
        return cls(bundle, engine, top_k=top_k, min_score=min_score)

    @property
    def name(self) -> str:
        return self.bundle.manifest.name

    @property
    def version(self) -> str:
        return self.bundle.manifest.version

    def classify(self, image: np.ndarray, top_k: int | None = None) -> Result:
        """uint8 frame (HxWx3 BGR or HxWx1 gray) → Result. Raises InferenceError if the runtime fails."""
        logits, pre_ms, infer_ms = self.forward(image)
        t = time.perf_counter()
        top = rank(logits, self.labels, self.top_k if top_k is None else top_k, self.min_score,
                   probabilities=self.probabilities)
        post_ms = (time.perf_counter() - t) * 1e3
        return Result(top=top, logits=logits, latency_ms={
            "pre": pre_ms, "infer": infer_ms, "post": post_ms, "total": pre_ms + infer_ms + post_ms})

    def forward(self, image: np.ndarray) -> tuple[np.ndarray, float, float]:
        """(logits, preprocess ms, inference ms) of one frame: the serving path, which the self-test replays.

        Int8-input models take codes straight from the code table; others take the float tensor.
        """
        t0 = time.perf_counter()
        if self._codes is not None:
            codes_engine, table = self._codes
            feed = self.preprocessor.codes(image, table)
            t1 = time.perf_counter()
            logits = codes_engine.run_codes(feed)[0]
        else:
            feed = self.preprocessor(image)
            t1 = time.perf_counter()
            logits = self.engine.run(feed)[0]
        return logits, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

    def describe(self) -> dict[str, Any]:
        doc = {"name": self.name, "version": self.version, "sha256": self.bundle.manifest_sha256,
               "output": self.bundle.manifest.output, "engine": self.engine.describe()}
        if self.runtime_choice is not None:
            doc["runtime_choice"] = self.runtime_choice
        return doc


@dataclass(frozen=True)
class SelfTestReport:
    passed: bool
    agreement: float
    median_infer_ms: float
    detail: str
    frames: int = 0
    mismatches: tuple[int, ...] = field(default=())  # indices of frames whose top-1 differed

    def raise_for_failure(self) -> None:
        if not self.passed:
            raise SelfTestError(self.detail)


MAX_SELFTEST_BYTES = 32 * 1024 * 1024  # self-test frames are a few MB at most; more is a decompression bomb


def load_selftest_frames(path: Path) -> np.ndarray:
    """The `frames` array of a selftest.npz, after checking from the .npy header (before any allocation) that it
    is uint8 and at most MAX_SELFTEST_BYTES: a small npz cannot make the device allocate gigabytes."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("frames.npy")
        if info.file_size > MAX_SELFTEST_BYTES + 4096:
            raise ValueError(f"frames.npy is {info.file_size} bytes; the limit is {MAX_SELFTEST_BYTES}")
        with zf.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"frames.npy has an unsupported format version {version}")
    if dtype != np.uint8:
        raise ValueError(f"frames are {dtype}, expected uint8 camera frames")
    if int(np.prod(shape, dtype=np.float64)) > MAX_SELFTEST_BYTES:
        raise ValueError(f"frames of shape {shape} exceed the limit of {MAX_SELFTEST_BYTES} bytes")
    with np.load(path, allow_pickle=False) as npz:
        return np.asarray(npz["frames"])


def selftest_frames(bundle: Bundle) -> list[np.ndarray]:
    """The bundle's self-test frames (real images of its task, loaded within the same bounds as the self-test), for
    timing a model on this device; [] when it carries none or they cannot be read."""
    st = bundle.manifest.selftest
    if st is None:
        return []
    try:
        return list(load_selftest_frames(bundle.path_of(st.path)))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("Self-test frames of %s are unreadable (%s)", bundle.manifest.name, exc)
        return []


def run_selftest(classifier: Classifier, *, time_limit_s: float | None = None,
                 max_latency_ms: float | None = None) -> SelfTestReport:
    """Replay the bundle's self-test frames through the classifier's own serving path; compare top-1 indices.

    With `time_limit_s` a self-test still running after that long fails; with `max_latency_ms` (the device's
    budget) a model whose median latency per frame (preprocess + inference) is over it fails, judged from the third
    frame on, so a model seconds too slow is refused after three frames, not after all of them.

    Never raises for a mismatch or unreadable vectors: returns passed=False with a detail sentence fit for a
    SelfTestError (see `SelfTestReport.raise_for_failure`).
    """
    manifest = classifier.bundle.manifest
    st = manifest.selftest
    if st is None:
        return SelfTestReport(True, 1.0, float("nan"), "Bundle has no self-test vectors; nothing was compared")
    try:
        frames = load_selftest_frames(classifier.bundle.path_of(st.path))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return SelfTestReport(False, 0.0, float("nan"),
                              f"Self-test vectors {st.path} are unreadable ({exc}); rebuild the bundle")
    expected = st.expected_top1
    if frames.ndim not in (3, 4) or len(frames) != len(expected) or len(frames) == 0:
        return SelfTestReport(False, 0.0, float("nan"),
                              f"Self-test vectors {st.path} hold {len(frames)} frames of shape {frames.shape[1:]} "
                              f"but the manifest expects {len(expected)} results; rebuild the bundle")
    got: list[int] = []
    infer_ms: list[float] = []
    frame_ms: list[float] = []
    engine = classifier.engine.name
    started = time.monotonic()
    try:
        for frame in frames:
            logits, pre, infer = classifier.forward(frame)
            infer_ms.append(infer)
            frame_ms.append(pre + infer)
            got.append(int(np.argmax(logits)))
            elapsed = time.monotonic() - started
            if time_limit_s is not None and elapsed > time_limit_s and len(got) < len(frames):
                return SelfTestReport(False, 0.0, statistics.median(infer_ms), (
                    f"Self-test on {engine} took longer than its limit of {time_limit_s:g} s "
                    f"(update.selftest_timeout_s): {len(got)} of {len(frames)} frames in {elapsed:.1f} s; the model "
                    "is too slow for this device"), frames=len(got))
            if max_latency_ms is not None and len(frame_ms) >= min(3, len(frames)):
                median_ms = statistics.median(frame_ms)
                if median_ms > max_latency_ms:
                    return SelfTestReport(False, 0.0, statistics.median(infer_ms), (
                        f"Model is too slow for this device: median {median_ms:.1f} ms per frame on {engine} over "
                        f"{len(frame_ms)} self-test frames exceeds the latency budget of {max_latency_ms:.1f} ms "
                        "(update.max_latency_ms; by default one frame period of the camera)"), frames=len(got))
    except (InferenceError, ValueError) as exc:
        return SelfTestReport(False, 0.0, float("nan"), f"Self-test could not run the model: {exc}",
                              frames=len(frames))
    mismatches = tuple(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e)
    agreement = 1.0 - len(mismatches) / len(expected)
    median = statistics.median(infer_ms)
    if agreement + 1e-9 >= st.min_agreement:
        detail = (f"Self-test passed: {len(expected) - len(mismatches)}/{len(expected)} frames agree "
                  f"(required {st.min_agreement:.2f}) on {engine}, median inference {median:.2f} ms")
        return SelfTestReport(True, agreement, median, detail, len(expected), mismatches)
    labels = classifier.labels
    examples = ", ".join(f"frame {i} gave {labels[got[i]]!r} ({got[i]}), expected {labels[expected[i]]!r} "
                         f"({expected[i]})" for i in mismatches[:3])
    detail = (f"Self-test failed on {engine}: {len(mismatches)} of {len(expected)} frames disagree "
              f"(agreement {agreement:.2f} < required {st.min_agreement:.2f}); e.g. {examples}. The model or its "
              "preprocessing on this device differs from what was bundled: rebuild or re-export the bundle")
    return SelfTestReport(False, agreement, median, detail, len(expected), mismatches)
