"""The agent configuration: one TOML file parsed into typed, frozen dataclasses, strictly.

Unknown keys (with a "did you mean" for a near miss), wrong types and out-of-range values are reported naming the
full key path, what was expected and what was found (`camera[0].fps: expected a number >= 0, got 'fast'`), all of
them in one ConfigError. Every key has a default
except `device_id`. Relative paths are resolved against the directory of the config file. The broker
password never sits in the file: it comes from an environment variable, a file, or a systemd credential
(`$CREDENTIALS_DIRECTORY/<credential>`), see `BrokerConfig.resolve_password`.
`systemd/agent.example.toml` documents every key.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecv.agent.contract.topics import DEFAULT_PREFIX, check_level
from edgecv.agent.errors import ConfigError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
PROTOCOLS = ("5", "3.1.1")
RUNTIME_CHOICES = ("auto", "onnxruntime", "litert", "openvino")
DOWNGRADE_CHOICES = ("when-asked", "never")  # update.allow_downgrade
PUBLISH_MODES = ("every", "on_change", "rate")
UNPACED_BUDGET_MS = 1000.0  # the latency budget per frame when no camera has an fps limit
TRIGGERS = ("motion+interval", "motion", "interval", "every")
ON_CAMERAS_ENDED = ("exit", "idle")
SAMPLE_WHAT = ("crop", "frame")

_Check = tuple[Callable[[Any], bool], str]


_REQUIRED = object()


def _opt(default: Any, *, check: _Check | None = None, choices: tuple[Any, ...] | None = None,
         path: bool = False, key: str | None = None, level: bool = False, camera_source: bool = False,
         crop: bool = False) -> Any:
    """A config field: default plus how to validate it (kept next to the field it validates)."""
    meta = {"check": check, "choices": choices, "path": path, "key": key, "level": level,
            "camera_source": camera_source, "crop": crop}
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, list | dict) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata=meta)
    return field(default=default, metadata=meta)


_SECTION = {"check": None, "choices": None, "path": False, "key": None, "level": False, "camera_source": False,
            "crop": False}
_POSITIVE = (lambda v: v > 0, "a number > 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number >= 0")
_POS_INT = (lambda v: v >= 1, "an integer >= 1")
_NON_NEG_INT = (lambda v: v >= 0, "an integer >= 0")
_FRACTION = (lambda v: 0.0 <= v <= 1.0, "a number between 0 and 1")


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = _opt(False)
    ca_file: str = _opt("", path=True)
    cert_file: str = _opt("", path=True)
    key_file: str = _opt("", path=True)
    insecure: bool = _opt(False)  # skip hostname verification (testing only)


@dataclass(frozen=True)
class BrokerConfig:
    host: str = _opt("127.0.0.1", check=(lambda v: bool(v.strip()), "a non-empty host name"))
    port: int = _opt(1883, check=(lambda v: 1 <= v <= 65535, "an integer between 1 and 65535"))
    protocol: str = _opt("5", choices=PROTOCOLS)
    client_id: str = _opt("")  # "" = derived from device_id by the MQTT link
    keepalive: int = _opt(30, check=(lambda v: v >= 5, "an integer >= 5 (seconds)"))
    username: str = _opt("")
    password_env: str = _opt("")
    password_file: str = _opt("", path=True)
    credential: str = _opt("", check=(lambda v: "/" not in v and v not in (".", ".."), "a credential name "
                                       "without '/'"))
    reconnect_min_s: float = _opt(0.5, check=_POSITIVE)
    reconnect_max_s: float = _opt(30.0, check=_POSITIVE)
    tls: TlsConfig = field(default_factory=TlsConfig, metadata=_SECTION)

    def resolve_password(self) -> str | None:
        """The broker password from `password_env`, `password_file` or systemd's credentials directory.

        Returns None when no password source is configured; raises ConfigError when the configured source
        is missing (unset variable, unreadable file, no $CREDENTIALS_DIRECTORY).
        """
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"broker.password_env: environment variable {self.password_env} is not set; "
                                  "export it in the agent's environment (e.g. an EnvironmentFile=)")
            return value
        if self.password_file:
            return _read_secret(Path(self.password_file), "broker.password_file")
        if self.credential:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise ConfigError(
                    f"broker.credential: $CREDENTIALS_DIRECTORY is not set, so credential {self.credential!r} "
                    "cannot be read; run the agent under systemd with LoadCredential= or SetCredential=")
            return _read_secret(Path(directory) / self.credential, "broker.credential")
        return None


@dataclass(frozen=True)
class RegionConfig:
    """A named crop of a camera's frame, classified on its own and turned into a stable state (agent/vision/regions.py,
    agent/vision/states.py).

    `crop = [x, y, w, h]`: pixels when all four are integers (`[400, 160, 200, 240]`); fractions of the frame's width
    and height when any of them is written with a decimal point (`[0.625, 0.33, 0.31, 0.5]`). Pixel crops are checked
    against the frame size when frames arrive (the size is not known before).
    """

    name: str = _opt(_REQUIRED, level=True)
    crop: tuple[float, ...] = _opt(_REQUIRED, crop=True)
    model: str = _opt("", path=True)  # "" = the camera's model (the one pushes replace); else a bundle of its own
    trigger: str = _opt("motion+interval", choices=TRIGGERS)
    interval_s: float = _opt(5.0, check=_POSITIVE)  # for the "interval" triggers
    # fraction of the crop's pixels that must change (by > 20 grey levels) to count as motion
    motion_threshold: float = _opt(0.05, check=(lambda v: 0.0 < v <= 1.0, "a number > 0 and <= 1"))
    consecutive: int = _opt(3, check=(lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"))
    min_score: float = _opt(0.5, check=_FRACTION)  # a result counts towards a state only at this top-1 score

    @property
    def fractional(self) -> bool:
        """Whether `crop` is in fractions of the frame (any value written as a float) rather than pixels."""
        return any(isinstance(v, float) for v in self.crop)


@dataclass(frozen=True)
class CameraConfig:
    name: str = _opt("cam0", level=True)
    source: str = _opt("synthetic:fashion-mnist", check=(lambda v: bool(v.strip()), "a non-empty source"),
                       camera_source=True)
    loop: bool = _opt(True)
    fps: float = _opt(10.0, check=_NON_NEGATIVE)  # 0 = as fast as the source delivers
    open_timeout_s: float = _opt(10.0, check=_POSITIVE)
    read_timeout_s: float = _opt(5.0, check=_POSITIVE)
    width: int = _opt(0, check=_NON_NEG_INT)  # capture size hints, 0 = source default
    height: int = _opt(0, check=_NON_NEG_INT)
    # [[camera.region]]: crops classified on their own (no regions: the whole frame is classified, as always)
    regions: tuple[RegionConfig, ...] = field(default=(), metadata={**_SECTION, "key": "region"})


@dataclass(frozen=True)
class ModelConfig:
    store: str = _opt("/var/lib/edgecv/models", path=True)
    bundle: str = _opt("", path=True)  # seed bundle (dir or .edgecv) used when the store is empty
    runtime: str = _opt("auto", choices=RUNTIME_CHOICES)
    threads: int = _opt(1, check=_POS_INT)


@dataclass(frozen=True)
class PublishConfig:
    qos: int = _opt(1, choices=(0, 1, 2))
    mode: str = _opt("every", choices=PUBLISH_MODES)
    max_rate: float = _opt(0.0, check=_NON_NEGATIVE)  # messages per second per camera in mode "rate"
    min_score: float = _opt(0.0, check=_FRACTION)
    top_k: int = _opt(3, check=_POS_INT)
    expiry_s: int = _opt(0, check=_NON_NEG_INT)  # MQTT 5 message expiry, 0 = none
    buffer: int = _opt(10000, check=_POS_INT)
    spool_dir: str = _opt("", path=True)
    # 1: one JSON object per predictions message. N >= 2: each message is a JSON array of up to N predictions
    # (whatever is queued when the sender runs: one at a time at camera rates, batches at thousands per second).
    batch_max: int = _opt(1, check=(lambda v: 1 <= v <= 1000, "an integer from 1 to 1000"))


@dataclass(frozen=True)
class MotionConfig:
    enabled: bool = _opt(False)
    threshold: float = _opt(0.02, check=_FRACTION)


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = _opt(10.0, check=_POSITIVE)


@dataclass(frozen=True)
class SecurityConfig:
    keyring: str = _opt("", path=True)
    allow_unsigned: bool = _opt(False)


@dataclass(frozen=True)
class UpdateConfig:
    staging: str = _opt("", path=True)
    max_bundle_bytes: int = _opt(64 * 1024 * 1024, check=_POS_INT)
    keep_versions: int = _opt(3, check=_POS_INT)
    probation_s: float = _opt(60.0, check=_NON_NEGATIVE)
    chunk_timeout_s: float = _opt(30.0, check=_POSITIVE)
    # A pushed bundle older than the active one (or the same version with other content) is refused unless the push
    # asks for it (`edgecv push --allow-downgrade`, "when-asked"); "never" refuses it even then (docs/DELIVERY.md).
    allow_downgrade: str = _opt("when-asked", choices=DOWNGRADE_CHOICES)
    # The device's latency budget per frame (preprocess + inference + top-k, median), in ms; 0 = one frame period
    # of the fastest camera (1000 / fps; 1000 ms for unpaced cameras). A model over it is refused at self-test or
    # rolled back in probation.
    max_latency_ms: float = _opt(0.0, check=_NON_NEGATIVE)
    selftest_timeout_s: float = _opt(30.0, check=_POSITIVE)  # a self-test still running after this is a failure


@dataclass(frozen=True)
class HomeAssistantConfig:
    enabled: bool = _opt(True)
    discovery_prefix: str = _opt("homeassistant", check=(lambda v: _levels_ok(v), "MQTT topic levels "
                                                          "(letters, digits, '_', '.', '-', separated by '/')"))
    # The per-frame sensors (top label, score) read `<p>/<dev>/latest[/<camera>/<region>]`, published at most this
    # often; 0 = they read every prediction (the predictions topic), as at frame rate.
    max_rate_hz: float = _opt(1.0, check=(lambda v: 0.0 <= v <= 100.0, "a number from 0 to 100"))


@dataclass(frozen=True)
class SamplesConfig:
    """Keeping frames or region crops worth labelling on the device (agent/samples/), for `edgecv collect`.

    Off by default: storing camera images is a privacy decision. `dir` "" = `samples` next to the model store."""

    enabled: bool = _opt(False)
    dir: str = _opt("", path=True)
    max_mb: float = _opt(200.0, check=(lambda v: 1.0 <= v <= 1_000_000.0, "a number of MB from 1 to 1000000"))
    # retention: samples whose frame is older than this many hours are deleted (checked at start, on every write and
    # at least every minute); 0 = kept until the size cap or `edgecv collect --delete-after` removes them
    max_age_h: float = _opt(0.0, check=_NON_NEGATIVE)
    low_confidence: float = _opt(0.6, check=_FRACTION)  # keep a result whose top-1 score is below this; 0 = off
    state_changes: bool = _opt(True)  # keep the result that confirmed a region's new stable state
    pending: bool = _opt(True)  # keep the first result of a run towards another state (not yet confirmed)
    every_s: float = _opt(0.0, check=_NON_NEGATIVE)  # keep one result per camera/region this often; 0 = off
    # per camera/region and reason: at most one sample this often, so a flickering scene cannot fill the disk
    min_interval_s: float = _opt(2.0, check=_NON_NEGATIVE)
    what: str = _opt("crop", choices=SAMPLE_WHAT)  # a region's crop, or the whole frame it was cut from
    jpeg_quality: int = _opt(90, check=(lambda v: 10 <= v <= 100, "an integer from 10 to 100"))
    queue: int = _opt(8, check=(lambda v: 1 <= v <= 256, "an integer from 1 to 256"))  # images waiting to be written


@dataclass(frozen=True)
class SystemdConfig:
    watchdog_stall_s: float = _opt(0.0, check=_NON_NEGATIVE)  # 0 = derive from WATCHDOG_USEC


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = _opt(_REQUIRED, level=True)
    prefix: str = _opt(DEFAULT_PREFIX, check=(lambda v: _levels_ok(v), "MQTT topic levels (letters, digits, "
                                              "'_', '.', '-', separated by '/')"))
    groups: tuple[str, ...] = _opt((), level=True)
    log_level: str = _opt("info", choices=LOG_LEVELS)
    # When every camera has ended (a file or finite source with loop = false): "exit" stops the agent cleanly
    # (publishing `stopped`, exit code 0); "idle" keeps it up, serving MQTT commands and pushes.
    on_cameras_ended: str = _opt("exit", choices=ON_CAMERAS_ENDED)
    broker: BrokerConfig = field(default_factory=BrokerConfig, metadata=_SECTION)
    cameras: tuple[CameraConfig, ...] = field(default_factory=lambda: (CameraConfig(),),
                                                     metadata={**_SECTION, "key": "camera"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata=_SECTION)
    publish: PublishConfig = field(default_factory=PublishConfig, metadata=_SECTION)
    motion: MotionConfig = field(default_factory=MotionConfig, metadata=_SECTION)
    health: HealthConfig = field(default_factory=HealthConfig, metadata=_SECTION)
    security: SecurityConfig = field(default_factory=SecurityConfig, metadata=_SECTION)
    update: UpdateConfig = field(default_factory=UpdateConfig, metadata=_SECTION)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig, metadata=_SECTION)
    systemd: SystemdConfig = field(default_factory=SystemdConfig, metadata=_SECTION)
    samples: SamplesConfig = field(default_factory=SamplesConfig, metadata=_SECTION)
    source: str = field(default="<dict>", compare=False)  # where it was loaded from (not a TOML key)

    def latency_budget_ms(self) -> float:
        """The device's latency budget per frame: `update.max_latency_ms`, or when that is 0 one frame period of the
        fastest camera (a model slower than that cannot keep up with it), UNPACED_BUDGET_MS for unpaced cameras."""
        if self.update.max_latency_ms > 0:
            return self.update.max_latency_ms
        fps = max((cam.fps for cam in self.cameras), default=0.0)
        return 1000.0 / fps if fps > 0 else UNPACED_BUDGET_MS

    def samples_dir(self) -> Path:
        """Where samples are kept: `samples.dir`, else `samples` beside the model store."""
        return Path(self.samples.dir) if self.samples.dir else Path(self.model.store).parent / "samples"

    def camera(self, name: str) -> CameraConfig:
        for cam in self.cameras:
            if cam.name == name:
                return cam
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration as TOML-shaped data (no secrets: passwords are never stored here)."""
        return _to_doc(self)


def load_config(path: Path | str) -> AgentConfig:
    """Read and validate a TOML config file. Relative paths inside it resolve against its directory."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Cannot read config file {path}: {exc.strerror or exc}; check the path") from exc
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}; fix the syntax") from exc
    return parse_config(doc, source=str(path), base_dir=path.resolve().parent)


def parse_config(doc: Mapping[str, Any], source: str = "<dict>", base_dir: Path | None = None) -> AgentConfig:
    """Validate a TOML-shaped mapping. `base_dir` (default: the current directory) anchors relative paths.

    Every problem is collected before anything is raised: one ConfigError lists them all (`problems`), each with its
    key path, so a config is fixed in one round."""
    problems = _Problems()
    if not isinstance(doc, Mapping):
        raise ConfigError(f"<root>: expected a table, got {type(doc).__name__}")
    if "device_id" not in doc:
        problems.add("device_id", "required key is missing; set it to this device's name, e.g. "
                                  'device_id = "pi-kitchen"')
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    cfg = _build(AgentConfig, doc, "", base, problems)
    if cfg is not _INVALID:
        _check_consistency(cfg, doc, problems)
    problems.raise_if_any(source)
    return dataclasses.replace(cfg, source=source)


def _check_consistency(cfg: AgentConfig, doc: Mapping[str, Any], problems: _Problems) -> None:
    """Rules across keys, for the parts whose keys were valid on their own."""
    if not cfg.cameras and problems.clean("camera"):
        problems.add("camera", "expected at least one [[camera]] table, got none")
    seen: set[str] = set()
    for i, cam in enumerate(cfg.cameras):
        if not problems.clean(f"camera[{i}].name"):
            continue
        if cam.name in seen:
            problems.add(f"camera[{i}].name", f"expected a unique camera name, got duplicate {cam.name!r}")
        seen.add(cam.name)
        regions: set[str] = set()
        for j, region in enumerate(cam.regions):
            if region.name in regions:
                problems.add(f"camera[{i}].region[{j}].name", f"expected a region name unique within camera "
                                                               f"{cam.name!r}, got duplicate {region.name!r}")
            regions.add(region.name)
    broker = cfg.broker
    if problems.clean("broker"):
        sources = [k for k in ("password_env", "password_file", "credential") if getattr(broker, k)]
        if len(sources) > 1:
            problems.add(f"broker.{sources[1]}", f"expected at most one password source, got "
                                                 f"{' and '.join('broker.' + s for s in sources)}; keep one")
        if broker.reconnect_max_s < broker.reconnect_min_s:
            problems.add("broker.reconnect_max_s", f"expected a number >= broker.reconnect_min_s "
                                                   f"({broker.reconnect_min_s}), got {broker.reconnect_max_s}")
        tls = broker.tls
        if bool(tls.cert_file) != bool(tls.key_file):
            problems.add("broker.tls.key_file", "expected cert_file and key_file together (client certificate), "
                                                f"got cert_file={tls.cert_file!r} key_file={tls.key_file!r}")
    if problems.clean("publish") and cfg.publish.mode == "rate" and cfg.publish.max_rate <= 0:
        problems.add("publish.max_rate", f"expected a number > 0 when publish.mode is 'rate', "
                                         f"got {cfg.publish.max_rate}")


def resolve_camera_source(source: str, base: Path) -> str:
    """File sources given as relative paths are anchored at the config directory; others are unchanged."""
    if (source.isdigit() or source.startswith(("/", "synthetic:", "gst:")) or "://" in source
            or source.startswith("~")):
        return os.path.expanduser(source)
    return str(base / source)


# --- generic dataclass builder -------------------------------------------------------------------------

_HINTS: dict[type, dict[str, Any]] = {}
_INVALID: Any = object()  # what a section or list entry with problems builds to (its problems are recorded)


class _Problems:
    """The problems found so far, each `key.path: what was expected, what was found`, in the order found."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, path: str, message: str) -> None:
        self.items.append((path, f"{path}: {message}"))

    def add_error(self, exc: ConfigError) -> None:
        for text in exc.problems:
            self.items.append((text.split(": ", 1)[0], text))

    def clean(self, prefix: str) -> bool:
        """Whether no problem was found at `prefix` or below it."""
        return not any(p == prefix or p.startswith((f"{prefix}.", f"{prefix}[")) for p, _ in self.items)

    def raise_if_any(self, source: str) -> None:
        if not self.items:
            return
        texts = [text for _, text in self.items]
        if len(texts) == 1:
            raise ConfigError(texts[0])
        lines = "\n".join(f"  {t}" for t in texts)
        raise ConfigError(f"{source} has {len(texts)} problems:\n{lines}", problems=texts)


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _did_you_mean(word: str, known: Iterable[str]) -> str | None:
    match = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return match[0] if match else None


def _build(cls: type, doc: Any, prefix: str, base: Path, problems: _Problems) -> Any:
    """`cls` built from the table `doc`, every problem in it recorded; keys with problems keep their defaults, and a
    table that cannot be built at all (not a table, a required key missing) is _INVALID."""
    where = prefix.rstrip(".") or "<root>"
    if not isinstance(doc, Mapping):
        problems.add(where, f"expected a table, got {_show(doc)}")
        return _INVALID
    fields = [f for f in dataclasses.fields(cls) if f.metadata]
    keys = {(f.metadata.get("key") or f.name): f for f in fields}
    for key in sorted(set(doc) - set(keys), key=str):
        close = _did_you_mean(str(key), keys)
        known = f"known keys: {', '.join(sorted(keys))}"
        problems.add(f"{prefix}{key}", f"unknown key; did you mean {close!r}? ({known})" if close else
                     f"unknown key; {known}")
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for key, f in keys.items():
        if key not in doc:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and prefix:
                problems.add(f"{prefix}{key}", "required key is missing; systemd/agent.example.toml shows it")
            continue
        try:
            value = _value(hints[f.name], doc[key], f, f"{prefix}{key}", base, problems)
        except ConfigError as exc:
            problems.add_error(exc)
            continue
        if value is not _INVALID:
            values[f.name] = value
    try:  # with problems, a partial object (their keys at the defaults) lets the rules across keys judge the rest
        return cls(**values)
    except TypeError:  # a required key missing (already recorded)
        return _INVALID


def _value(typ: Any, raw: Any, f: dataclasses.Field[Any], path: str, base: Path, problems: _Problems) -> Any:
    origin = typing.get_origin(typ)
    if f.metadata.get("crop"):
        return _crop(raw, path)
    if origin is tuple:
        item = typing.get_args(typ)[0]
        if not isinstance(raw, list):
            raise ConfigError(f"{path}: expected a list, got {_show(raw)}")
        found = len(problems.items)
        entries = []
        for i, entry in enumerate(raw):
            if dataclasses.is_dataclass(item):
                entries.append(_build(typing.cast(type, item), entry, f"{path}[{i}].", base, problems))
                continue
            try:
                entries.append(_scalar(item, entry, f, f"{path}[{i}]", base))
            except ConfigError as exc:
                problems.add_error(exc)
        # an entry that could not be built at all: the list is dropped (its default stays), as the indices of the
        # others would no longer match their key paths
        return _INVALID if len(problems.items) > found and _INVALID in entries else tuple(entries)
    if dataclasses.is_dataclass(typ):
        return _build(typing.cast(type, typ), raw, f"{path}.", base, problems)
    return _scalar(typ, raw, f, path, base)


def _scalar(typ: Any, raw: Any, f: dataclasses.Field[Any], path: str, base: Path) -> Any:
    choices = f.metadata.get("choices")
    check = f.metadata.get("check")
    if choices is not None and (raw not in choices or isinstance(raw, bool)):
        shown = " or ".join(repr(c) for c in choices)
        close = _did_you_mean(raw, [str(c) for c in choices]) if isinstance(raw, str) else None
        raise ConfigError(f"{path}: expected one of {shown}, got {_show(raw)}"
                          + (f"; did you mean {close!r}?" if close else ""))
    if typ is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"{path}: expected true or false, got {_show(raw)}")
        value: Any = raw
    elif typ is int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{path}: expected {check[1] if check else 'an integer'}, got {_show(raw)}")
        value = raw
    elif typ is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ConfigError(f"{path}: expected {check[1] if check else 'a number'}, got {_show(raw)}")
        value = float(raw)
    else:
        if not isinstance(raw, str):
            raise ConfigError(f"{path}: expected a string, got {_show(raw)}")
        value = raw
    if check is not None and not check[0](value):
        raise ConfigError(f"{path}: expected {check[1]}, got {_show(raw)}")
    if f.metadata.get("level"):
        try:
            check_level(value, "value")
        except ValueError:
            raise ConfigError(f"{path}: expected an MQTT topic level (letters, digits, '_', '.' or '-'), "
                              f"got {_show(raw)}") from None
    if f.metadata.get("path") and value:
        value = str(base / os.path.expanduser(value))
    if f.metadata.get("camera_source"):
        value = resolve_camera_source(value, base)
    return value


def _crop(raw: Any, path: str) -> tuple[float, ...]:
    """`[x, y, w, h]`: four integers (pixels) or, when any is written as a float, four fractions of the frame."""
    if (not isinstance(raw, list) or len(raw) != 4
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in raw)):
        raise ConfigError(f"{path}: expected [x, y, w, h]: four integers (pixels) or four fractions of the frame "
                          f"such as [0.5, 0.0, 0.5, 0.5], got {raw!r}")
    x, y, w, h = raw
    if any(isinstance(v, float) for v in raw):
        if not all(0.0 <= v <= 1.0 for v in raw):
            raise ConfigError(f"{path}: expected fractions of the frame between 0 and 1 (a value with a decimal point "
                              f"makes the crop fractional; write pixel crops as integers), got {raw!r}")
        if w <= 0 or h <= 0 or x + w > 1.0 + 1e-9 or y + h > 1.0 + 1e-9:
            raise ConfigError(f"{path}: expected a crop inside the frame with w, h > 0 and x + w, y + h <= 1, "
                              f"got {raw!r}")
        return (float(x), float(y), float(w), float(h))
    if x < 0 or y < 0 or w < 1 or h < 1:
        raise ConfigError(f"{path}: expected pixels with x, y >= 0 and w, h >= 1, got {raw!r}")
    return (int(x), int(y), int(w), int(h))


def _levels_ok(value: str) -> bool:
    return all(re.match(r"^[A-Za-z0-9_.\-]+$", level) for level in value.split("/"))


def _read_secret(path: Path, key: str) -> str:
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path}: {exc.strerror or exc}; create it (mode 0600) or fix the "
                          "path") from exc


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _to_doc(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {}
        for f in dataclasses.fields(obj):
            if not f.metadata:
                continue
            out[f.metadata.get("key") or f.name] = _to_doc(getattr(obj, f.name))
        return out
    if isinstance(obj, tuple):
        return [_to_doc(x) for x in obj]
    return obj
