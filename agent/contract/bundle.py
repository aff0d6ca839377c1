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
import os
import shutil
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from edgecv.agent.contract.signing import Keyring, Signature, sign
from edgecv.agent.errors import BundleFormatError, IntegrityError, SignatureError, UnsafeArchiveError

SCHEMA = "edgecv.bundle/1"
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
BUNDLE_SUFFIX = ".edgecv"  # a gzip-compressed tar of the bundle directory

COLORS = ("RGB", "BGR", "GRAY")
LAYOUTS = ("NCHW", "NHWC")
RESIZE_MODES = ("stretch", "letterbox", "center-crop")
# onnx: ONNX for onnxruntime (OpenVINO reads it too); tflite: LiteRT; openvino: an ONNX file quantized for OpenVINO
# (NNCF's int8: slow in onnxruntime, fast in OpenVINO), run by OpenVINO only.
FORMATS = ("onnx", "tflite", "openvino")
PRECISIONS = ("int8", "fp32")
TASKS = ("classification",)

DEFAULT_MAX_BUNDLE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class InputSpec:
    """How a camera frame (uint8 HxWx3 BGR, as OpenCV delivers) becomes the model input.

    value = ((pixel * scale) - mean[c]) / std[c], after resizing to width x height and converting colour.
    The int8 input quantization of an artifact, if any, is read from the model itself by the runtime.
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

    def __post_init__(self) -> None:
        _check(self.width > 0 and self.height > 0, "input.width/height", "positive integers")
        _check(self.channels in (1, 3), "input.channels", "1 or 3")
        _check(self.color in COLORS, "input.color", f"one of {COLORS}")
        _check((self.color == "GRAY") == (self.channels == 1), "input.color",
               "GRAY exactly when channels is 1")
        _check(self.layout in LAYOUTS, "input.layout", f"one of {LAYOUTS}")
        _check(self.dtype == "float32", "input.dtype", "'float32'")
        _check(self.resize in RESIZE_MODES, "input.resize", f"one of {RESIZE_MODES}")
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

    def __post_init__(self) -> None:
        _check(self.schema == SCHEMA, "schema", repr(SCHEMA))
        _check(self.task in TASKS, "task", f"one of {TASKS}")
        _check(bool(self.name) and "/" not in self.name, "name", "a non-empty name without '/'")
        _check(bool(self.version) and "/" not in self.version, "version", "a non-empty version without '/'")
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
        return doc

    def to_bytes(self) -> bytes:
        """Canonical serialization: the bytes that are hashed and signed."""
        return (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleFormatError(f"manifest.json is not valid JSON: {exc}") from exc
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> Manifest:
        _need(doc, dict, "manifest")
        _no_unknown(doc, {f for f in cls.__dataclass_fields__}, "")
        for key in ("schema", "name", "version", "created", "labels", "input", "artifacts"):
            _check(key in doc, key, "present")
        _check(doc["schema"] == SCHEMA, "schema", f"{SCHEMA!r} (this agent reads only bundle v1)")
        inp = _need(doc["input"], dict, "input")
        _no_unknown(inp, set(InputSpec.__dataclass_fields__), "input.")
        try:
            spec = InputSpec(**{**inp, **{k: tuple(inp[k]) for k in ("mean", "std") if k in inp}})
        except TypeError as exc:
            raise BundleFormatError(f"input: {exc}") from exc
        arts = []
        for i, art in enumerate(_need(doc["artifacts"], list, "artifacts")):
            _need(art, dict, f"artifacts[{i}]")
            _no_unknown(art, set(Artifact.__dataclass_fields__), f"artifacts[{i}].")
            try:
                arts.append(Artifact(**art))
            except TypeError as exc:
                raise BundleFormatError(f"artifacts[{i}]: {exc}") from exc
        selftest = None
        if doc.get("selftest") is not None:
            st = _need(doc["selftest"], dict, "selftest")
            _no_unknown(st, set(SelfTest.__dataclass_fields__), "selftest.")
            try:
                selftest = SelfTest(**{**st, "expected_top1": tuple(int(i) for i in st["expected_top1"])})
            except (TypeError, KeyError, ValueError) as exc:
                raise BundleFormatError(f"selftest: {exc}") from exc
        rest = {k: doc[k] for k in ("task", "metrics", "min_agent_version", "description", "name",
                                    "version", "created") if k in doc}
        for key in ("name", "version", "created"):
            _need(rest[key], str, key)
        return cls(labels=tuple(str(x) for x in _need(doc["labels"], list, "labels")), input=spec,
                   artifacts=tuple(arts), selftest=selftest, **rest)


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
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise BundleFormatError(f"{root} is not a bundle: it has no {MANIFEST_NAME}")
    data = mpath.read_bytes()
    manifest = Manifest.from_bytes(data)
    sig_path = root / SIGNATURE_NAME
    signature = Signature.from_bytes(sig_path.read_bytes()) if sig_path.is_file() else None
    return Bundle(root=root, manifest=manifest, manifest_bytes=data, signature=signature)


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
    if bundle.signature is None:
        if keyring is not None and len(keyring) > 0 and not allow_unsigned:
            raise SignatureError("Bundle is unsigned and this device requires signed bundles; sign it with "
                                 "'edgecv bundle sign' (or set security.allow_unsigned = true on the device)")
        return Verification(signed_by=None, checked_files=len(files))
    if keyring is None or len(keyring) == 0:
        if allow_unsigned:
            return Verification(signed_by=None, checked_files=len(files))
        raise SignatureError("Bundle is signed but no keyring is configured to verify it; install the "
                             "workstation's public key in the device keyring")
    return Verification(signed_by=keyring.verify(bundle.manifest_bytes, bundle.signature),
                        checked_files=len(files))


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

    Refuses absolute paths, '..', links, devices and anything but regular files and directories, and stops
    at `max_bytes` of content, so a hostile archive cannot write outside `dest` or fill the disk.
    """
    dest = Path(dest)
    try:
        tar = tarfile.open(archive, mode="r:*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise BundleFormatError(f"{archive} is not a readable bundle archive: {exc}") from exc
    with tar:
        total = 0
        members = []
        try:
            for count, member in enumerate(tar, start=1):
                if count > max_members:
                    raise UnsafeArchiveError(f"Bundle archive has more than {max_members} entries")
                if not _is_safe_relpath(member.name):
                    raise UnsafeArchiveError(f"Bundle archive entry {member.name!r} would escape the bundle")
                if not (member.isfile() or member.isdir()):
                    raise UnsafeArchiveError(
                        f"Bundle archive entry {member.name!r} is a link or special file; only regular "
                        "files are allowed")
                total += member.size
                if total > max_bytes:
                    raise UnsafeArchiveError(f"Bundle archive content exceeds the limit of {max_bytes} bytes")
                members.append(member)
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BundleFormatError(f"Bundle archive {archive} is truncated or corrupt: {exc}") from exc
        dest.mkdir(parents=True, exist_ok=False)
        try:
            for member in members:
                target = dest / member.name
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                assert src is not None
                with src, open(target, "wb") as fh:
                    shutil.copyfileobj(src, fh)
                    if fh.tell() != member.size:
                        raise BundleFormatError(f"Bundle archive entry {member.name!r} is truncated")
        except (tarfile.TarError, EOFError, zlib_error()) as exc:
            shutil.rmtree(dest, ignore_errors=True)
            raise BundleFormatError(f"Bundle archive {archive} is truncated or corrupt: {exc}") from exc
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
    return dest


def open_bundle(path: Path, workdir: Path, **limits: int) -> Bundle:
    """Load a bundle from a directory, or extract an archive into `workdir` first."""
    path = Path(path)
    if not path.exists():
        raise BundleFormatError(f"Bundle {path} does not exist")
    if path.is_dir():
        return load_bundle(path)
    return load_bundle(extract_archive(path, Path(workdir), **limits))


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _is_safe_relpath(name: str) -> bool:
    if not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name:
        return False
    parts = PurePosixPath(name).parts
    return all(p not in ("..", "") for p in parts) and not PurePosixPath(name).is_absolute()


def _check(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise BundleFormatError(f"Manifest key '{key}' is invalid: expected {expected}")


def _need(value: Any, typ: type | tuple[type, ...], key: str) -> Any:
    if not isinstance(value, typ):
        name = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise BundleFormatError(f"Manifest key '{key}' must be a {name}, got {type(value).__name__}")
    return value


def _no_unknown(doc: Mapping[str, Any], known: set[str] | Sequence[str], prefix: str) -> None:
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise BundleFormatError(f"Manifest has unknown key(s) {', '.join(prefix + k for k in unknown)}")
