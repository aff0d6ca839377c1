"""The on-disk layout of a collected dataset (docs/DATASETS.md): the reserved folder and file names, the
sidecar that carries each sample's prediction, and the rules that class names and sample ids must follow
before they become file names. `edgecv collect` writes this layout, `edgecv label` sorts it, and the
training loader reads its class folders (it skips every folder whose name starts with `_` or `.`).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecv.tools.datasets import IMAGE_SUFFIXES
from edgecv.tools.errors import DatasetError, NameNotAllowedError

UNLABELLED = "_unlabelled"
JUNK = "_junk"
LABELS_LOG = "_labels.log"
SIDECAR_SUFFIX = ".json"
REASONS = ("low_confidence", "state_change", "pending", "periodic")
MAX_SIDECAR_BYTES = 64 * 1024
MAX_CLASS_NAME = 64
MAX_SAMPLE_ID = 128

# Sample ids are ASCII so they survive every file system, URL and shell unquoted; no leading dot (hidden
# files are in-progress writes) and no path separators.
_SAMPLE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Characters a class name may hold besides letters and digits (any script, NFC-normalised).
_CLASS_PUNCTUATION = frozenset(" -_.+")


# os.path rather than pathlib in these two: they run for every file of a folder on every page refresh.
def is_image_name(name: str) -> bool:
    """A file name the dataset treats as an image: known suffix, not hidden (hidden = being written)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def sidecar_name(image_name: str) -> str:
    """`<id>.jpg` -> `<id>.json`."""
    return os.path.splitext(image_name)[0] + SIDECAR_SUFFIX


def check_sample_id(sample_id: str) -> str:
    """Return `sample_id` if it may name a sample file (`<id>.jpg`, `<id>.json`), else raise."""
    if (not isinstance(sample_id, str) or len(sample_id) > MAX_SAMPLE_ID or not _SAMPLE_ID.fullmatch(sample_id)
            or ".." in sample_id):
        raise NameNotAllowedError(
            f"Sample id {sample_id!r} is not allowed: use 1-{MAX_SAMPLE_ID} ASCII letters, digits, '.', '_' or "
            "'-', starting with a letter or digit, without '..'")
    return sample_id


def check_class_name(name: str) -> str:
    """Return the NFC form of `name` if it may be a class folder name, else raise NameNotAllowedError.

    Allowed: 1-64 characters; letters and digits of any script, space, '-', '_', '.', '+'; starting with a
    letter or digit (so never `_`/`.`, the reserved prefixes, nor '-', which reads as an option); not ending
    with a space or '.'.
    """
    if not isinstance(name, str):
        raise NameNotAllowedError(f"Class name must be text, got {type(name).__name__}")
    norm = unicodedata.normalize("NFC", name)
    problem = None
    if not norm:
        problem = "it is empty"
    elif len(norm) > MAX_CLASS_NAME:
        problem = f"it is longer than {MAX_CLASS_NAME} characters"
    elif not norm[0].isalnum():
        problem = "it must start with a letter or digit (names starting with '_' or '.' are reserved)"
    elif norm[-1] in " .":
        problem = "it must not end with a space or '.'"
    else:
        bad = sorted({c for c in norm if not (c.isalnum() or c in _CLASS_PUNCTUATION)})
        if bad:
            problem = "it contains " + ", ".join(repr(c) for c in bad[:5])
    if problem:
        raise NameNotAllowedError(f"Class name {name!r} is not allowed: {problem}; use letters, digits, space, "
                                  "'-', '_', '.', '+'")
    return norm


@functools.lru_cache(maxsize=4096)
def folder_for_label(label: str) -> str | None:
    """The class folder name for a model label: the label itself when allowed, else with each run of other
    characters replaced by '-' ("T-shirt/top" -> "T-shirt-top"); None when nothing usable is left."""
    norm = unicodedata.normalize("NFC", label)
    text = re.sub(r"-{2,}", "-", "".join(c if c.isalnum() or c in _CLASS_PUNCTUATION else "-" for c in norm))
    start = next((i for i, c in enumerate(text) if c.isalnum()), None)
    if start is None:
        return None
    text = text[start:start + MAX_CLASS_NAME].rstrip(" .")
    try:
        return check_class_name(text)
    except NameNotAllowedError:
        return None


# ---------------------------------------------------------------- sidecar


class SidecarError(DatasetError):
    """A sidecar file is unreadable or does not follow the schema in docs/DATASETS.md."""


@dataclass(frozen=True)
class ModelRef:
    """The model that made a prediction. `labels`, optional, lists every label the model can output."""

    name: str
    version: str
    sha: str
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Sidecar:
    """What the device knew about one sample (`<id>.json` beside `<id>.jpg`).

    `predicted` is the model's label as the model names it (map it to a folder with `folder_for_label`),
    `score` its probability in [0, 1], `ts` Unix seconds, `region` the camera region's name or None for the
    whole frame, `reason` one of REASONS. `truth`, optional, is the class index the camera source knew for the
    frame (synthetic and scene cameras do; real cameras never), for scripted labelling in benchmarks.
    """

    predicted: str | None
    score: float | None
    camera: str | None
    region: str | None
    ts: float | None
    reason: str | None
    device: str | None
    model: ModelRef | None
    truth: int | None = None

    def to_json(self) -> dict[str, Any]:
        model: dict[str, Any] | None = None
        if self.model is not None:
            model = {"name": self.model.name, "version": self.model.version, "sha": self.model.sha}
            if self.model.labels is not None:
                model["labels"] = list(self.model.labels)
        doc = {"predicted": self.predicted, "score": self.score, "camera": self.camera, "region": self.region,
               "ts": self.ts, "reason": self.reason, "device": self.device, "model": model}
        if self.truth is not None:
            doc["truth"] = self.truth
        return doc

    @classmethod
    def from_json(cls, data: object) -> Sidecar:
        """Validate a decoded sidecar; unknown keys are ignored (newer writers may add some), missing ones
        are None, a key of the wrong type or an out-of-range value raises SidecarError."""
        if not isinstance(data, dict):
            raise SidecarError(f"Sidecar must be a JSON object, got {type(data).__name__}")
        score = _number(data, "score")
        if score is not None and not 0.0 <= score <= 1.0:
            raise SidecarError(f"Sidecar 'score' must be between 0 and 1, got {score}")
        reason = _text(data, "reason")
        if reason is not None and reason not in REASONS:
            raise SidecarError(f"Sidecar 'reason' must be one of {', '.join(REASONS)}, got {reason!r}")
        truth = data.get("truth")
        if truth is not None and (isinstance(truth, bool) or not isinstance(truth, int) or not 0 <= truth < 1 << 31):
            raise SidecarError(f"Sidecar 'truth' must be a class index (an integer >= 0) or null, got {truth!r}")
        return cls(predicted=_text(data, "predicted"), score=score, camera=_text(data, "camera"),
                   region=_text(data, "region"), ts=_number(data, "ts"), reason=reason,
                   device=_text(data, "device"), model=_model(data.get("model")), truth=truth)


def _text(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise SidecarError(f"Sidecar {key!r} must be a string or null, got {type(value).__name__}")
    return value


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SidecarError(f"Sidecar {key!r} must be a finite number or null, got {value!r}")
    return float(value)


def _model(value: object) -> ModelRef | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SidecarError(f"Sidecar 'model' must be an object or null, got {type(value).__name__}")
    fields = {k: _text(value, k) or "" for k in ("name", "version", "sha")}
    labels = value.get("labels")
    if labels is not None and (not isinstance(labels, list) or not all(isinstance(x, str) for x in labels)):
        raise SidecarError("Sidecar 'model.labels' must be a list of strings or absent")
    return ModelRef(labels=tuple(labels) if labels is not None else None, **fields)


def read_sidecar(path: Path) -> Sidecar:
    """Read and validate one sidecar file (at most MAX_SIDECAR_BYTES)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_SIDECAR_BYTES + 1)
    except OSError as exc:
        raise SidecarError(f"Cannot read sidecar {path}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_SIDECAR_BYTES:
        raise SidecarError(f"Sidecar {path} is larger than {MAX_SIDECAR_BYTES} bytes")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SidecarError(f"Sidecar {path} is not valid JSON: {exc}") from exc
    return Sidecar.from_json(data)


def write_sidecar(path: Path, sidecar: Sidecar) -> None:
    """Write a sidecar atomically: a hidden temporary file in the same folder, then os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(sidecar.to_json(), fh, ensure_ascii=False, sort_keys=True)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
