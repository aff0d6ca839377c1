"""Model bundle v1: a directory (or a .tar / .tar.gz of one) holding manifest.json, manifest.sig and artifacts.

This module is the single definition of the format. The workstation writes bundles with
`write_manifest` / `sign_bundle` / `pack_bundle`; the device reads them with `extract_archive`,
`load_bundle` and `verify_bundle`. Parsing is strict: unknown keys and wrong types are errors that name
the key path, so a bundle that parses is one both sides understand the same way.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecv.agent.contract import archive as _archive
from edgecv.agent.contract import documents as D
from edgecv.agent.contract.names import is_name
from edgecv.agent.contract.signing import MAX_SIGNATURE_BYTES, Keyring, Signature, sign
from edgecv.agent.errors import BundleFormatError, DocumentError, IntegrityError, SignatureError
from edgecv.agent.errors import UnsafeArchiveError as UnsafeArchiveError  # re-exported: what extract_archive raises

SCHEMA = "edgecv.bundle/1"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
BUNDLE_SUFFIX = ".edgecv"  # a gzip-compressed tar of the bundle directory

COLORS = ("RGB", "BGR", "GRAY")
LAYOUTS = ("NCHW", "NHWC")
RESIZE_MODES = ("stretch", "letterbox", "center-crop", "shorter-side")
# What an artifact's output holds: raw class scores (the agent applies softmax) or probabilities (used as they
# are). A manifest without the key means logits, so bundles written before the key existed keep their bytes.
OUTPUT_KINDS = ("logits", "probabilities")
# onnx: ONNX for onnxruntime (OpenVINO reads it too); tflite: LiteRT; openvino: an ONNX file quantized for OpenVINO
# (NNCF's int8: slow in onnxruntime, fast in OpenVINO), run by OpenVINO only.
FORMATS = ("onnx", "tflite", "openvino")
PRECISIONS = ("int8", "fp32")
TASKS = ("classification",)

DEFAULT_MAX_BUNDLE_BYTES = 64 * 1024 * 1024
# Bounds on what a manifest may declare, checked before anything is allocated from it.
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_MANIFEST_DEPTH = 32
MAX_INPUT_SIDE = 16384
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 256
MAX_SELFTEST_FRAMES = 4096
MAX_ARTIFACT_BYTES = 1 << 40
MAX_TEXT = 4096


@dataclass(frozen=True)
class InputSpec:
    """How a camera frame (uint8 HxWx3 BGR, as OpenCV delivers) becomes the model input.

    value = ((pixel * scale) - mean[c]) / std[c], after resizing to width x height and converting colour.
    The int8 input quantization of an artifact, if any, is read from the model itself by the runtime.
    `resize = "shorter-side"` scales the frame so its shorter side is `shorter_side` pixels (aspect kept), then
    takes the centred width x height crop (ImageNet's "resize 256, center-crop 224"); `shorter_side` is
    written to the manifest only for that mode.
    """

    width: int
    height: int
    channels: int
    color: str = "RGB"
    layout: str = "NCHW"
    dtype: str = "float32"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    resize: str = "stretch"
    shorter_side: int | None = None

    def __post_init__(self) -> None:
        _check(0 < self.width <= MAX_INPUT_SIDE and 0 < self.height <= MAX_INPUT_SIDE, "input.width/height",
               f"integers from 1 to {MAX_INPUT_SIDE}")
        _check(math.isfinite(self.scale) and all(math.isfinite(v) for v in (*self.mean, *self.std)),
               "input.scale/mean/std", "finite numbers")
        _check(self.channels in (1, 3), "input.channels", "1 or 3")
        _check(self.color in COLORS, "input.color", f"one of {COLORS}")
        _check((self.color == "GRAY") == (self.channels == 1), "input.color",
               "GRAY exactly when channels is 1")
        _check(self.layout in LAYOUTS, "input.layout", f"one of {LAYOUTS}")
        _check(self.dtype == "float32", "input.dtype", "'float32'")
        _check(self.resize in RESIZE_MODES, "input.resize", f"one of {RESIZE_MODES}")
        if self.resize == "shorter-side":
            _check(isinstance(self.shorter_side, int) and not isinstance(self.shorter_side, bool)
                   and self.shorter_side >= min(self.width, self.height), "input.shorter_side",
                   "an integer of at least min(width, height) when resize is 'shorter-side'")
        else:
            _check(self.shorter_side is None, "input.shorter_side", "absent unless resize is 'shorter-side'")
        _check(len(self.mean) in (1, self.channels), "input.mean", f"1 or {self.channels} values")
        _check(len(self.std) in (1, self.channels) and all(s > 0 for s in self.std), "input.std",
               f"1 or {self.channels} positive values")

    def shape(self, batch: int = 1) -> tuple[int, int, int, int]:
        if self.layout == "NCHW":
            return (batch, self.channels, self.height, self.width)
        return (batch, self.height, self.width, self.channels)


@dataclass(frozen=True)
class Artifact:
    path: str
    format: str
    precision: str
    sha256: str
    bytes: int

    def __post_init__(self) -> None:
        _check(self.format in FORMATS, "artifacts[].format", f"one of {FORMATS}")
        _check(self.precision in PRECISIONS, "artifacts[].precision", f"one of {PRECISIONS}")
        _check(len(self.sha256) == 64 and all(c in "0123456789abcdef" for c in self.sha256),
               "artifacts[].sha256", "64 lowercase hex digits")
        _check(_is_safe_relpath(self.path), "artifacts[].path", "a relative path inside the bundle")


@dataclass(frozen=True)
class SelfTest:
    """Sample frames (uint8 HxWxC as a camera gives them, in selftest.npz under key 'frames') and the
    top-1 class index each artifact must produce. The device runs these before it accepts a model."""

    path: str
    sha256: str
    expected_top1: tuple[int, ...]
    min_agreement: float = 1.0

    def __post_init__(self) -> None:
        _check(_is_safe_relpath(self.path), "selftest.path", "a relative path inside the bundle")
        _check(0.0 < self.min_agreement <= 1.0, "selftest.min_agreement", "a number in (0, 1]")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    created: str
    labels: tuple[str, ...]
    input: InputSpec
    artifacts: tuple[Artifact, ...]
    task: str = "classification"
    schema: str = SCHEMA
    selftest: SelfTest | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    min_agent_version: str = "0.1.0"
    description: str = ""
    output: str = "logits"

    def __post_init__(self) -> None:
        _check(self.schema == SCHEMA, "schema", repr(SCHEMA))
        _check(self.output in OUTPUT_KINDS, "output", f"one of {OUTPUT_KINDS}")
        _check(self.task in TASKS, "task", f"one of {TASKS}")
        _check(bool(self.name) and "/" not in self.name and len(self.name) <= 128
               and not any(ord(c) < 32 or c == "\x7f" for c in self.name), "name",
               "a non-empty name of at most 128 characters, without '/' or control characters")
        _check(is_name(self.version), "version", "1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
               "or digit (it names a directory on the device), e.g. 1.2.0")
        _check(len(self.labels) >= 2, "labels", "at least 2 class labels")
        _check(len(self.artifacts) >= 1, "artifacts", "at least one artifact")
        if self.selftest is not None:
            _check(all(0 <= i < len(self.labels) for i in self.selftest.expected_top1),
                   "selftest.expected_top1", "class indices within labels")

    def artifact(self, fmt: str, precision: str | None = None) -> Artifact | None:
        for art in self.artifacts:
            if art.format == fmt and (precision is None or art.precision == precision):
                return art
        return None

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["labels"] = list(self.labels)
        doc["metrics"] = dict(self.metrics)
        # Defaults that older manifests lack stay absent, so those manifests serialize to the same bytes.
        if self.output == "logits":
            del doc["output"]
        if self.input.shorter_side is None:
            del doc["input"]["shorter_side"]
        return doc

    def to_bytes(self) -> bytes:
        """Canonical serialization: the bytes that are hashed and signed."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse manifest bytes: bounded (size, nesting) before JSON parsing, then typed field by field."""
        try:
            # NaN may appear in `metrics` (e.g. a latency that was not measured); typed fields refuse it
            doc = D.parse(data, "manifest.json", max_bytes=MAX_MANIFEST_BYTES, max_depth=MAX_MANIFEST_DEPTH,
                          allow_nonfinite=True)
        except DocumentError as exc:
            raise BundleFormatError(str(exc)) from None
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> Manifest:
        """A Manifest from parsed JSON; every wrong type or range is a BundleFormatError naming the key path."""
        try:
            return cls._from_dict(doc)
        except DocumentError as exc:
            raise BundleFormatError(str(exc)) from None

    @classmethod
    def _from_dict(cls, doc: Any) -> Manifest:
        _need(doc, dict, "manifest")
        _no_unknown(doc, {f for f in cls.__dataclass_fields__}, "")
        for key in ("schema", "name", "version", "created", "labels", "input", "artifacts"):
            _check(key in doc, key, "present")
        _check(doc["schema"] == SCHEMA, "schema", f"{SCHEMA!r} (this agent reads only bundle v1)")
        inp = _need(doc["input"], dict, "input")
        _no_unknown(inp, set(InputSpec.__dataclass_fields__), "input.")
        side = (_int(1, MAX_INPUT_SIDE))
        spec = InputSpec(
            width=_key(inp, "width", "input.", side), height=_key(inp, "height", "input.", side),
            channels=_key(inp, "channels", "input.", _int(1, 4)),
            color=_key(inp, "color", "input.", _str(16), "RGB"), layout=_key(inp, "layout", "input.", _str(16), "NCHW"),
            dtype=_key(inp, "dtype", "input.", _str(16), "float32"),
            scale=_key(inp, "scale", "input.", _num(-1e9, 1e9), 1.0 / 255.0),
            mean=_key(inp, "mean", "input.", _nums(-1e9, 1e9), (0.0,)),
            std=_key(inp, "std", "input.", _nums(-1e9, 1e9), (1.0,)),
            resize=_key(inp, "resize", "input.", _str(16), "stretch"),
            shorter_side=_key(inp, "shorter_side", "input.", _int(1, 4 * MAX_INPUT_SIDE), None))
        arts = []
        raw_arts = _need(doc["artifacts"], list, "artifacts")
        _check(len(raw_arts) <= 16, "artifacts", "at most 16 artifacts")
        for i, art in enumerate(raw_arts):
            where = f"artifacts[{i}]."
            _need(art, dict, where[:-1])
            _no_unknown(art, set(Artifact.__dataclass_fields__), where)
            arts.append(Artifact(path=_key(art, "path", where, _str(255)), format=_key(art, "format", where, _str(16)),
                                 precision=_key(art, "precision", where, _str(16)),
                                 sha256=_key(art, "sha256", where, _str(64)),
                                 bytes=_key(art, "bytes", where, _int(0, MAX_ARTIFACT_BYTES))))
        selftest = None
        if doc.get("selftest") is not None:
            st = _need(doc["selftest"], dict, "selftest")
            _no_unknown(st, set(SelfTest.__dataclass_fields__), "selftest.")
            frames = _key(st, "expected_top1", "selftest.", _list(MAX_SELFTEST_FRAMES, _int(0, MAX_LABELS)))
            selftest = SelfTest(path=_key(st, "path", "selftest.", _str(255)),
                                sha256=_key(st, "sha256", "selftest.", _str(64)), expected_top1=tuple(frames),
                                min_agreement=_key(st, "min_agreement", "selftest.", _num(0.0, 1.0), 1.0))
        labels = _key(doc, "labels", "", _list(MAX_LABELS, _str(MAX_LABEL_CHARS)))
        rest: dict[str, Any] = {key: _key(doc, key, "", _str(MAX_TEXT)) for key in
                                ("name", "version", "created", "task", "min_agent_version", "description",
                                 "output") if key in doc}
        if "metrics" in doc:
            rest["metrics"] = _need(doc["metrics"], dict, "metrics")
        return cls(labels=tuple(labels), input=spec, artifacts=tuple(arts), selftest=selftest, **rest)


@dataclass(frozen=True)
class Bundle:
    """A bundle directory on disk, parsed (not yet verified: call verify_bundle)."""

    root: Path
    manifest: Manifest
    manifest_bytes: bytes
    signature: Signature | None

    def path_of(self, relpath: str) -> Path:
        return self.root / relpath

    @property
    def manifest_sha256(self) -> str:
        """Identifies this exact bundle (the manifest binds all artifacts)."""
        return hashlib.sha256(self.manifest_bytes).hexdigest()


def load_bundle(root: Path) -> Bundle:
    """Parse a bundle directory. Raises BundleFormatError with the key path on any schema problem."""
    root = Path(root)
    data = _read_bounded(root / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    if data is None:
        raise BundleFormatError(f"{root} is not a bundle: it has no {MANIFEST_NAME}")
    manifest = Manifest.from_bytes(data)
    return Bundle(root=root, manifest=manifest, manifest_bytes=data, signature=_read_signature(root))


def check_signature(root: Path, keyring: Keyring | None, *, allow_unsigned: bool = False) -> str | None:
    """Apply the signature rule of `verify_bundle` to a bundle directory's raw manifest bytes, before the manifest
    is parsed: on a device with a keyring, an unsigned or forged manifest is refused without being read as JSON.
    Returns the key id that signed, or None when unsigned bundles are allowed."""
    root = Path(root)
    data = _read_bounded(root / MANIFEST_NAME, MAX_MANIFEST_BYTES)
    if data is None:
        raise BundleFormatError(f"The bundle has no {MANIFEST_NAME}; build it with 'edgecv bundle' or pack_bundle")
    return _signature_rule(data, _read_signature(root), keyring, allow_unsigned)


def _read_bounded(path: Path, limit: int) -> bytes | None:
    """A regular file's bytes, or None when it does not exist; BundleFormatError when it is larger than `limit`."""
    if path.is_symlink() or not path.is_file():
        return None
    size = path.stat().st_size
    if size > limit:
        raise BundleFormatError(f"{path.name} is {size} bytes; the limit is {limit}")
    return path.read_bytes()


def _read_signature(root: Path) -> Signature | None:
    data = _read_bounded(root / SIGNATURE_NAME, MAX_SIGNATURE_BYTES) if not (root / SIGNATURE_NAME).is_symlink() \
        else None
    return Signature.from_bytes(data) if data is not None else None


@dataclass(frozen=True)
class Verification:
    signed_by: str | None  # key id, or None when unsigned bundles were explicitly allowed
    checked_files: int


def verify_bundle(bundle: Bundle, keyring: Keyring | None, *, allow_unsigned: bool = False) -> Verification:
    """Check every artifact's sha256 and size, then the signature.

    With a keyring that holds at least one key, a signature is required and must verify, unless
    `allow_unsigned` is set (an explicit configuration switch) and the bundle carries no signature at all;
    a bundle that carries a bad signature is always refused.
    """
    files = [(a.path, a.sha256, a.bytes) for a in bundle.manifest.artifacts]
    if bundle.manifest.selftest is not None:
        files.append((bundle.manifest.selftest.path, bundle.manifest.selftest.sha256, -1))
    for rel, digest, size in files:
        path = bundle.root / rel
        if not path.is_file() or path.is_symlink():
            raise IntegrityError(f"Bundle file {rel} named in the manifest is missing")
        actual_size = path.stat().st_size
        if size >= 0 and actual_size != size:
            raise IntegrityError(f"Bundle file {rel} has {actual_size} bytes, the manifest says {size}")
        actual = file_sha256(path)
        if actual != digest:
            raise IntegrityError(f"Bundle file {rel} has sha256 {actual[:12]}…, the manifest says {digest[:12]}…")
    signed_by = _signature_rule(bundle.manifest_bytes, bundle.signature, keyring, allow_unsigned)
    return Verification(signed_by=signed_by, checked_files=len(files))


def _signature_rule(manifest_bytes: bytes, signature: Signature | None, keyring: Keyring | None,
                    allow_unsigned: bool) -> str | None:
    if signature is None:
        if keyring is not None and len(keyring) > 0 and not allow_unsigned:
            raise SignatureError("Bundle is unsigned and this device requires signed bundles; sign it with "
                                 "'edgecv bundle sign' (or set security.allow_unsigned = true on the device)")
        return None
    if keyring is None or len(keyring) == 0:
        if allow_unsigned:
            return None
        raise SignatureError("Bundle is signed but no keyring is configured to verify it; install the "
                             "workstation's public key in the device keyring")
    return keyring.verify(manifest_bytes, signature)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifact_for(root: Path, relpath: str, fmt: str, precision: str) -> Artifact:
    """Describe a file already placed in a bundle directory."""
    path = Path(root) / relpath
    return Artifact(path=relpath, format=fmt, precision=precision, sha256=file_sha256(path),
                    bytes=path.stat().st_size)


def write_manifest(root: Path, manifest: Manifest) -> bytes:
    """Write manifest.json (canonical bytes) and remove any signature, which it would invalidate."""
    data = manifest.to_bytes()
    _atomic_write(Path(root) / MANIFEST_NAME, data)
    (Path(root) / SIGNATURE_NAME).unlink(missing_ok=True)
    return data


def sign_bundle(root: Path, private_key: Any) -> Signature:
    """Sign the manifest of a bundle directory in place (writes manifest.sig)."""
    data = (Path(root) / MANIFEST_NAME).read_bytes()
    Manifest.from_bytes(data)  # refuse to sign something that does not parse
    signature = sign(data, private_key)
    _atomic_write(Path(root) / SIGNATURE_NAME, signature.to_bytes())
    return signature


def pack_bundle(root: Path, out: Path) -> Path:
    """Write a reproducible .tar.gz of the bundle directory (sorted entries, zeroed metadata)."""
    root, out = Path(root), Path(out)
    names = [MANIFEST_NAME]
    if (root / SIGNATURE_NAME).exists():
        names.append(SIGNATURE_NAME)
    manifest = load_bundle(root).manifest
    names += sorted({a.path for a in manifest.artifacts} |
                    ({manifest.selftest.path} if manifest.selftest else set()))
    tmp = out.with_name(out.name + ".part")
    import gzip

    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            data = (root / name).read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return out


def extract_archive(archive: Path, dest: Path, *, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES,
                    max_members: int = 64) -> Path:
    """Safely extract a bundle archive into `dest` (which must not exist yet) and return it.

    A strict, bounded reader (agent/contract/archive.py): only regular files and directories with safe names,
    every header and size checked against its limit before it is read, at most `max_bytes` of content; a
    hostile archive cannot write outside `dest`, fill the disk or the memory.
    """
    return _archive.extract(Path(archive), Path(dest), max_bytes=max_bytes, max_members=max_members)


def open_bundle(path: Path, workdir: Path, **limits: int) -> Bundle:
    """Load a bundle from a directory, or extract an archive into `workdir` first."""
    path = Path(path)
    if not path.exists():
        raise BundleFormatError(f"Bundle {path} does not exist")
    if path.is_dir():
        return load_bundle(path)
    return load_bundle(extract_archive(path, Path(workdir), **limits))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _is_safe_relpath(name: str) -> bool:
    """A relative path of safe names (names.is_name for each part), at most 255 characters."""
    return 0 < len(name) <= 255 and all(is_name(part) for part in name.split("/"))


def _check(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise BundleFormatError(f"Manifest key '{key}' is invalid: expected {expected}")


def _key(doc: Mapping[str, Any], key: str, prefix: str, read: Callable[[Any, str], Any], default: Any = ...) -> Any:
    """doc[key] through `read` (a typed reader from documents.py) with the key path in its error; `default` when
    absent (required when no default is given)."""
    if key not in doc:
        if default is ...:
            raise BundleFormatError(f"Manifest key '{prefix}{key}' is missing")
        return default
    return read(doc[key], f"Manifest key '{prefix}{key}'")


def _int(lo: int, hi: int) -> Callable[[Any, str], int]:
    return lambda v, where: D.need_int(v, where, lo, hi)


def _num(lo: float, hi: float) -> Callable[[Any, str], float]:
    return lambda v, where: D.need_number(v, where, lo, hi)


def _str(max_len: int) -> Callable[[Any, str], str]:
    return lambda v, where: D.need_str(v, where, max_len)


def _list(max_len: int, item: Callable[[Any, str], Any]) -> Callable[[Any, str], list[Any]]:
    def read(v: Any, where: str) -> list[Any]:
        if not isinstance(v, list) or len(v) > max_len:
            raise DocumentError(f"{where} must be an array of at most {max_len} items, got {D.describe(v)}")
        return [item(x, f"{where[:-1]}[{i}]'") for i, x in enumerate(v)]
    return read


def _nums(lo: float, hi: float) -> Callable[[Any, str], tuple[float, ...]]:
    return lambda v, where: tuple(_list(4, _num(lo, hi))(v, where))


def _need(value: Any, typ: type | tuple[type, ...], key: str) -> Any:
    if not isinstance(value, typ):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise BundleFormatError(f"Manifest key '{key}' must be a {name}, got {type(value).__name__}")
    return value


def _no_unknown(doc: Mapping[str, Any], known: set[str] | Sequence[str], prefix: str) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise BundleFormatError(f"Manifest has unknown key(s) {', '.join(prefix + k for k in unknown)}")
