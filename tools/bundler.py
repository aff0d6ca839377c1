"""Build, sign and pack model bundles (format: agent/contract/bundle.py), self-test vectors included.

`build_bundle` copies the artifacts in under their canonical names, writes `selftest.npz` and the
manifest, and signs it when given a key; `pack` writes the `.edgecv` archive. `choose_selftest_frames`
picks the sample frames the device runs before it accepts the model.
"""

from __future__ import annotations

import io
import logging
import shutil
import zipfile
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgecv.agent.contract.bundle import (
    BUNDLE_SUFFIX,
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Bundle,
    InputSpec,
    Manifest,
    SelfTest,
    artifact_for,
    file_sha256,
    load_bundle,
    pack_bundle,
    sign_bundle,
    write_manifest,
)
from edgecv.agent.contract.signing import load_private_key
from edgecv.agent.errors import BundleError

log = logging.getLogger(__name__)

SELFTEST_NAME = "selftest.npz"
# The one name each (format, precision) has inside a bundle; the agent looks for these.
CANONICAL_NAMES: dict[tuple[str, str], str] = {
    ("onnx", "int8"): "model.int8.onnx",
    ("tflite", "int8"): "model.int8.tflite",
    ("onnx", "fp32"): "model.fp32.onnx",
    ("tflite", "fp32"): "model.fp32.tflite",
    ("openvino", "int8"): "model.int8.openvino.onnx",
}
_BUNDLE_FILES = {MANIFEST_NAME, SIGNATURE_NAME, SELFTEST_NAME, *CANONICAL_NAMES.values()}
# Fixed zip timestamp, so the same frames always give the same selftest.npz bytes (and sha256).
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

ArtifactSource = tuple[Path, str, str]  # (source path, format, precision)
LogitsFn = Callable[[np.ndarray], np.ndarray]


def build_bundle(out_dir: Path, *, name: str, version: str, labels: Sequence[str], spec: InputSpec,
                 artifacts: Sequence[ArtifactSource], selftest_frames: np.ndarray,
                 selftest_expected: Sequence[int], metrics: Mapping[str, Any] | None = None,
                 private_key: Ed25519PrivateKey | Path | str | None = None, description: str = "",
                 min_agreement: float = 1.0, output: str = "logits") -> Bundle:
    """Write a bundle directory at `out_dir` and return it parsed (signed when `private_key` is given).

    `out_dir` must be absent, empty or an earlier bundle (which is replaced). Frames are uint8 N×H×W×C
    camera-like images (BGR for 3 channels, H×W×1 for gray) and `selftest_expected` their top-1 indices.
    `output` says whether the artifacts output logits or probabilities (the manifest's `output`).
    """
    out_dir = Path(out_dir)
    if not artifacts:
        raise BundleError("A bundle needs at least one artifact; pass the int8 ONNX and/or TFLite model")
    frames = _check_frames(selftest_frames, selftest_expected, spec, len(labels))
    _prepare_dir(out_dir)
    seen: set[str] = set()
    placed = []
    for src, fmt, precision in artifacts:
        src = Path(src)
        canonical = CANONICAL_NAMES.get((fmt, precision))
        if canonical is None:
            raise BundleError(f"Unsupported artifact kind {fmt}/{precision}; use one of "
                              f"{', '.join(f'{f}/{p}' for f, p in CANONICAL_NAMES)}")
        if canonical in seen:
            raise BundleError(f"Two artifacts would both be {canonical}; give one artifact per format and precision")
        if not src.is_file():
            raise BundleError(f"Artifact {src} does not exist; export or quantize the model first")
        seen.add(canonical)
        shutil.copyfile(src, out_dir / canonical)
        placed.append(artifact_for(out_dir, canonical, fmt, precision))
    _write_selftest(out_dir / SELFTEST_NAME, frames, selftest_expected)
    manifest = Manifest(
        name=name, version=version, created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        labels=tuple(str(x) for x in labels), input=spec, artifacts=tuple(placed),
        selftest=SelfTest(path=SELFTEST_NAME, sha256=file_sha256(out_dir / SELFTEST_NAME),
                          expected_top1=tuple(int(i) for i in selftest_expected), min_agreement=min_agreement),
        metrics=_jsonable(dict(metrics or {})), description=description, output=output)
    write_manifest(out_dir, manifest)
    if private_key is not None:
        key = private_key if isinstance(private_key, Ed25519PrivateKey) else load_private_key(Path(private_key))
        sig = sign_bundle(out_dir, key)
        log.info("Signed bundle %s with key %s", out_dir, sig.key_id)
    bundle = load_bundle(out_dir)
    log.info("Wrote bundle %s %s at %s (%d artifacts)", name, version, out_dir, len(placed))
    return bundle


def pack(bundle_dir: Path, out: Path) -> Path:
    """Write the reproducible `.edgecv` archive (gzip tar) of a bundle directory."""
    out = Path(out)
    if out.suffix != BUNDLE_SUFFIX:
        raise BundleError(f"Bundle archive name {out.name} must end in {BUNDLE_SUFFIX}")
    out.parent.mkdir(parents=True, exist_ok=True)
    return pack_bundle(Path(bundle_dir), out)


def dataset_to_frames(images: np.ndarray) -> np.ndarray:
    """Turn dataset images (uint8 N×H×W×C, RGB or gray) into camera-like frames: BGR, gray stays H×W×1."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise BundleError(f"Expected uint8 images N×H×W×1 or N×H×W×3, got {images.dtype} {images.shape}")
    if images.shape[-1] == 3:
        images = images[..., ::-1]
    return np.ascontiguousarray(images)


def choose_selftest_frames(images: np.ndarray, preprocess: Callable[[np.ndarray], np.ndarray],
                           reference: LogitsFn, candidates: Mapping[str, LogitsFn], *, count: int = 8,
                           min_margin: float = 0.3, floor: float = 0.02, pool: int = 512,
                           seed: int = 0, output: str = "logits") -> tuple[np.ndarray, list[int]]:
    """Pick `count` test images on which every candidate agrees with the fp32 reference by a clear margin.

    `images` are dataset images (RGB or gray); they are converted to camera-like frames, and `preprocess`
    (frames → float32 model input, the device's math) feeds `reference` and each candidate (→ logits).
    An image's margin is the smallest, over all models, of top-1 minus runner-up probability (softmax of the
    outputs, or the outputs themselves when `output` is "probabilities").
    Images where all models give the same top-1 with margin ≥ `min_margin` come first, so int8 rounding on
    another CPU cannot flip them; an under-confident model is filled up with the clearest remaining
    agreeing images (margin ≥ `floor`). Frames are spread over classes. Returns (frames, expected top-1).
    """
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(images))[:pool])
    frames = dataset_to_frames(np.asarray(images)[idx])
    x = preprocess(frames)
    scores = _softmax if output == "logits" else (lambda p: p)
    ref = scores(np.asarray(reference(x), dtype=np.float64))
    top = ref.argmax(axis=1)
    margin = _margin(ref)
    agree = np.ones(len(x), dtype=bool)
    for name, fn in candidates.items():
        probs = scores(np.asarray(fn(x), dtype=np.float64))
        same = probs.argmax(axis=1) == top
        agree &= same
        margin = np.minimum(margin, _margin(probs))
        log.debug("Self-test candidate %s agrees with fp32 on %.1f%% of %d images", name, 100 * same.mean(), len(x))
    eligible = np.flatnonzero(agree & (margin >= floor))
    if len(eligible) < count:
        raise BundleError(f"Only {len(eligible)} of {len(x)} images give the same top-1 in every artifact with a "
                          f"margin of at least {floor} (need {count}); the int8 models disagree with fp32 too "
                          "often — check quantization (more --calib images, another --method)")
    strong = [int(i) for i in eligible if margin[i] >= min_margin]
    weak = sorted((int(i) for i in eligible if margin[i] < min_margin), key=lambda i: -margin[i])
    chosen = _spread(strong, top, count)
    if len(chosen) < count:
        chosen += _spread(weak, top, count - len(chosen))
        log.warning("Only %d self-test images have a probability margin >= %.2f; the rest have margins down to %.3f "
                    "(the model is not very confident)", len(strong), min_margin, min(margin[chosen]))
    return frames[chosen], [int(top[i]) for i in chosen]


def _spread(indices: Sequence[int], top: np.ndarray, count: int) -> list[int]:
    """Up to `count` of `indices` (kept in order within a class), round-robin over predicted classes."""
    by_class: dict[int, list[int]] = {}
    for i in indices:
        by_class.setdefault(int(top[i]), []).append(i)
    chosen: list[int] = []
    while len(chosen) < count and any(by_class.values()):
        for cls in sorted(by_class):
            if by_class[cls] and len(chosen) < count:
                chosen.append(by_class[cls].pop(0))
    return chosen


def read_selftest(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(frames, expected_top1) from a selftest.npz."""
    with np.load(Path(path), allow_pickle=False) as data:
        return data["frames"], data["expected_top1"]


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _margin(probs: np.ndarray) -> np.ndarray:
    part = np.sort(probs, axis=1)
    return part[:, -1] - part[:, -2]


def _check_frames(frames: np.ndarray, expected: Sequence[int], spec: InputSpec, classes: int) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4:
        raise BundleError(f"Self-test frames must be uint8 N×H×W×C, got {frames.dtype} with shape {frames.shape}")
    if frames.shape[-1] != spec.channels:
        raise BundleError(f"Self-test frames have {frames.shape[-1]} channels but the model input has "
                          f"{spec.channels}; give BGR frames for colour models and H×W×1 for gray")
    if len(frames) == 0 or len(frames) != len(expected):
        raise BundleError(f"Got {len(frames)} self-test frames and {len(expected)} expected labels; "
                          "give at least one frame and one label per frame")
    if any(not 0 <= int(i) < classes for i in expected):
        raise BundleError(f"Self-test expected labels must be class indices below {classes}")
    return np.ascontiguousarray(frames)


def _prepare_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise BundleError(f"Bundle output {out_dir} exists and is not a directory; choose another --out")
        entries = {p.name for p in out_dir.iterdir()}
        if entries and MANIFEST_NAME not in entries:
            raise BundleError(f"Bundle output {out_dir} is a non-empty directory that is not a bundle; "
                              "choose an empty or new directory")
        if entries - _BUNDLE_FILES:
            raise BundleError(f"Bundle output {out_dir} holds files that are not part of a bundle "
                              f"({', '.join(sorted(entries - _BUNDLE_FILES))}); remove them or choose another --out")
        for name in entries:
            (out_dir / name).unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_selftest(path: Path, frames: np.ndarray, expected: Sequence[int]) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key, arr in (("frames", frames), ("expected_top1", np.asarray(expected, dtype=np.int64))):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _jsonable(value: Any) -> Any:
    """Numbers and containers as plain JSON types (numpy scalars/arrays, tuples, Paths)."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise BundleError(f"Bundle metric value {value!r} of type {type(value).__name__} is not JSON-serializable")


def build_version(base: str = "1.0.0", when: datetime | None = None) -> str:
    """The default version of a new build: `<base>.post<UTC yyyymmddHHMMSS>`, e.g. 1.0.0.post20261129181502.

    It differs per build and orders the way the device's anti-rollback check orders versions
    (`edgecv.agent.contract.versions`, PEP 440): a later build of the same base sorts higher, every build sorts
    above the bare `base` and below the next release (1.0.1). It is a safe name (no '+'), as every version must be:
    it names a directory in the device's model store. Two builds are told apart on the wire by `model.sha` too.
    """
    when = when or datetime.now(UTC)
    return f"{base}.post{when:%Y%m%d%H%M%S}"
