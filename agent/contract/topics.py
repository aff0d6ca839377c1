"""The MQTT topic scheme and payload shapes shared by the agent and the workstation tools.

All payloads are UTF-8 JSON objects with UTC epoch-second timestamps (`ts`, float), except `predictions` from
a device with `publish.batch_max` >= 2: a JSON array of prediction objects (`decode_predictions` reads both).
Topic levels:

    <prefix>/<device>/status            retained, QoS 1; also the Last Will ("offline")
    <prefix>/<device>/predictions       QoS configurable, never retained
    <prefix>/<device>/health            QoS 0, every N seconds
    <prefix>/<device>/model/state       retained, QoS 1
    <prefix>/<device>/state/<camera>/<region>   retained, QoS 1: a region's stable state, on change
    <prefix>/<device>/latest            retained, QoS 0: newest whole-frame prediction (homeassistant.max_rate_hz)
    <prefix>/<device>/latest/<camera>/<region>  retained, QoS 0: a region's newest result, likewise
    <prefix>/<device>/model/push/<transfer>/<part>       workstation → device, QoS 1, never retained
    <prefix>/groups/<group>/model/push/<transfer>/<part> workstation → group
    <prefix>/<device>/model/push/<transfer>/ack          device → workstation (progress / resume point)
    <prefix>/<device>/cmd/<name>        workstation → device, QoS 1, payload {"id": request id, ...}
    <prefix>/<device>/cmd/<name>/result device → workstation, QoS 1, payload {"id", "ok", ...}
    <prefix>/announce                   workstation → every device, QoS 1: re-publish status and model state
"""

from __future__ import annotations

import json
import math
import operator
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgecv.agent.contract.names import check_name

DEFAULT_PREFIX = "edgecv"
STATUS_ONLINE, STATUS_OFFLINE, STATUS_STOPPED = "online", "offline", "stopped"
MODEL_STATES = ("idle", "receiving", "verifying", "active", "rejected", "rolled_back")
COMMANDS = ("ping", "reload", "snapshot", "rollback", "samples", "sample", "samples.delete")
# The result topic level for a request whose command name is not a safe name (names.check_name): the request
# still gets its one result, on `<p>/<dev>/cmd/_invalid/result` (no safe name starts with '_').
INVALID_COMMAND = "_invalid"
MAX_ERROR_CHARS = 300  # error texts in published states and results are cut to this length

_LEVEL = re.compile(r"^[A-Za-z0-9_.\-]+$")
SHORT_SHA = 12  # hex digits of a bundle's manifest sha256 that identify a model build in payloads and tables


def check_level(value: str, what: str) -> str:
    """A topic level must be non-empty and free of MQTT wildcards and separators."""
    if not _LEVEL.match(value or ""):
        raise ValueError(f"{what} {value!r} must be letters, digits, '_', '.' or '-' (it becomes an MQTT topic level)")
    return value


@dataclass(frozen=True)
class DeviceTopics:
    """Every topic of one device."""

    prefix: str
    device: str

    def __post_init__(self) -> None:
        for level in self.prefix.split("/"):
            check_level(level, "Topic prefix level")
        check_level(self.device, "Device id")

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def predictions(self) -> str:
        return f"{self.base}/predictions"

    @property
    def health(self) -> str:
        return f"{self.base}/health"

    @property
    def model_state(self) -> str:
        return f"{self.base}/model/state"

    def state(self, camera: str, region: str) -> str:
        """A region's stable state (retained)."""
        return f"{self.base}/state/{camera}/{region}"

    @property
    def state_filter(self) -> str:
        return f"{self.base}/state/#"

    @property
    def latest(self) -> str:
        """The newest whole-frame prediction of any camera, rate-limited (Home Assistant's per-frame sensors)."""
        return f"{self.base}/latest"

    def latest_region(self, camera: str, region: str) -> str:
        """A region's newest result, rate-limited (its Home Assistant label and score sensors)."""
        return f"{self.base}/latest/{camera}/{region}"

    @property
    def push_filter(self) -> str:
        return f"{self.base}/model/push/#"

    def push(self, transfer: str, part: str) -> str:
        return f"{self.base}/model/push/{check_name(transfer, 'Transfer id')}/{part}"

    def push_ack(self, transfer: str) -> str:
        """The ack topic of a transfer; the id must be a safe name (UnsafeNameError otherwise), so an ack can never
        be published on a topic the broker refuses or that matches more than one transfer."""
        return f"{self.base}/model/push/{check_name(transfer, 'Transfer id')}/ack"

    @property
    def cmd_filter(self) -> str:
        return f"{self.base}/cmd/+"

    def cmd(self, name: str) -> str:
        return f"{self.base}/cmd/{check_name(name, 'Command name')}"

    def cmd_result(self, name: str) -> str:
        """The result topic of a command: a safe name, or INVALID_COMMAND (UnsafeNameError otherwise)."""
        level = name if name == INVALID_COMMAND else check_name(name, "Command name")
        return f"{self.base}/cmd/{level}/result"


def group_push(prefix: str, group: str, transfer: str, part: str) -> str:
    return f"{prefix}/groups/{check_level(group, 'Group')}/model/push/{check_name(transfer, 'Transfer id')}/{part}"


def group_push_filter(prefix: str, group: str) -> str:
    return f"{prefix}/groups/{check_level(group, 'Group')}/model/push/#"


def announce_topic(prefix: str) -> str:
    """The fleet-wide request to re-publish the retained `status` and `model/state` (so they arrive live, on
    brokers that do not deliver retained messages to wildcard subscriptions: RabbitMQ 3.x). Two levels, so no
    `<prefix>/+/<kind>` filter matches it and no device id can collide with it."""
    return f"{prefix}/announce"


def fleet_filter(prefix: str, kind: str, device: str = "+") -> str:
    """Subscription filter for one kind of message ('status', 'predictions', 'health', 'model/state')."""
    return f"{prefix}/{device}/{kind}"


def parse_device_topic(prefix: str, topic: str) -> tuple[str, str] | None:
    """Split '<prefix>/<device>/<kind...>' into (device, kind); None when it is not a device topic."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    device, _, kind = topic[len(head):].partition("/")
    if not device or not kind or device == "groups":
        return None
    return device, kind


def now() -> float:
    return round(time.time(), 3)


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def decode_predictions(data: bytes | str) -> list[dict[str, Any]]:
    """The predictions in one `predictions` payload: one object, or an array of them (`publish.batch_max` >= 2)."""
    doc = json.loads(data)
    docs = doc if isinstance(doc, list) else [doc]
    if not all(isinstance(d, dict) for d in docs):
        raise ValueError("predictions payload is neither a JSON object nor an array of objects")
    return docs


class PredictionEncoder:
    """The `predictions` JSON of one (device, camera, model), written with a cached %-template instead of a dict
    and json.dumps: it runs once per published frame, and this is several times cheaper (~2 µs instead of 12 µs).

    Same document as `encode` of the dict would give (keys sorted): ts and frame_ts to 0.1 ms, scores to 5
    decimals, latencies to 3; a non-finite number (a broken model's NaN score) becomes null, never invalid JSON.
    Each top entry's constant part (index and label) is written once per label, not per prediction.
    """

    def __init__(self, *, boot: str, device: str, camera: str, model_name: str, model_version: str,
                 labels: tuple[str, ...] | list[str], model_sha: str = "", region: str | None = None) -> None:
        d = json.dumps
        # model.sha: the first 12 hex digits of the bundle's manifest sha256, so two builds with the same name
        # and version are told apart on the wire (absent when the caller has no bundle hash).
        model: dict[str, str] = {"name": model_name, "version": model_version}
        sha = f',"sha":{d(model_sha[:SHORT_SHA])}' if model_sha else ""
        if model_sha:
            model = {"name": model_name, "sha": model_sha[:SHORT_SHA], "version": model_version}
        self._identity: dict[str, Any] = {"boot": boot, "camera": camera, "device": device, "model": model}
        self._head = f'{{"boot":{d(boot)},"camera":{d(camera)},"device":{d(device)},"frame_ts":'
        self._model = f',"model":{{"name":{d(model_name)}{sha},"version":{d(model_version)}}},"seq":'
        if region is not None:  # a camera region's predictions name it (keys stay sorted: model < region < seq)
            self._identity["region"] = region
            self._model = (f',"model":{{"name":{d(model_name)}{sha},"version":{d(model_version)}}},'
                           f'"region":{d(region)},"seq":')
        self._label_names = tuple(labels)
        # '{"index":3,"label":"Dress","score":' per label: the template then formats only the score
        self._entries = [f'{{"index":{i},"label":{d(label)},"score":' for i, label in enumerate(labels)]
        # (number of top entries, truth given, number of latency keys) -> (template, latency values getter)
        self._templates: dict[tuple[int, bool, int], tuple[str, Callable[[dict[str, float]], tuple[float, ...]]]] = {}

    def __call__(self, seq: int, ts: float, frame_ts: float, top: list[dict[str, Any]],
                 latency_ms: dict[str, float], truth: int | None = None) -> bytes:
        shape = (len(top), truth is not None, len(latency_ms))
        cached = self._templates.get(shape)
        if cached is None:
            cached = self._template(shape, latency_ms)
        template, latencies = cached
        try:
            values = [frame_ts, *latencies(latency_ms), seq]
        except KeyError:  # other latency keys than the template was made for (same number of them)
            template, latencies = self._template(shape, latency_ms)
            values = [frame_ts, *latencies(latency_ms), seq]
        entries = self._entries
        for t in top:
            values += (entries[t["index"]], t["score"])
        if truth is not None:
            values.append(truth)
        values.append(ts)
        text = template % tuple(values)
        if ":nan" in text or ":inf" in text or ":-inf" in text:  # rare: a NaN or infinity, which JSON lacks
            return self._with_nulls(seq, ts, frame_ts, top, latency_ms, truth)
        return text.encode()

    def _template(self, shape: tuple[int, bool, int], latency_ms: dict[str, float]) -> tuple[
            str, Callable[[dict[str, float]], tuple[float, ...]]]:
        n_top, with_truth, _ = shape
        keys = sorted(latency_ms)

        def esc(text: str) -> str:
            return text.replace("%", "%%")

        latency = ",".join(f"{esc(json.dumps(k))}:%.3f" for k in keys)
        tops = ",".join(["%s%.5f}"] * n_top)
        template = (esc(self._head) + '%.4f,"latency_ms":{' + latency + "}" + esc(self._model) + '%d,"top":[' + tops
                    + "]" + (',"truth":%d' if with_truth else "") + ',"ts":%.4f}')
        getter = _values_getter(keys)
        self._templates[shape] = (template, getter)
        return template, getter

    def _with_nulls(self, seq: int, ts: float, frame_ts: float, top: list[dict[str, Any]],
                    latency_ms: dict[str, float], truth: int | None) -> bytes:
        """The same document through json, with every non-finite number as null."""
        doc = {**self._identity, "seq": seq, "ts": _finite(ts, 4), "frame_ts": _finite(frame_ts, 4),
               "top": [{"index": t["index"], "label": self._label_names[t["index"]],
                        "score": _finite(t["score"], 5)} for t in top],
               "latency_ms": {k: _finite(v, 3) for k, v in latency_ms.items()}}
        if truth is not None:
            doc["truth"] = truth
        return encode(doc)


def _values_getter(keys: list[str]) -> Callable[[dict[str, float]], tuple[float, ...]]:
    """d -> (d[k] for k in keys) as a tuple, in one C call (raises KeyError for a missing key)."""
    if len(keys) == 1:
        one = operator.itemgetter(keys[0])
        return lambda d: (one(d),)
    if not keys:
        return lambda d: ()
    return operator.itemgetter(*keys)


def _finite(x: float, places: int) -> float | None:
    return round(x, places) if math.isfinite(x) else None


def decode(data: bytes | str) -> dict[str, Any]:
    doc = json.loads(data)
    if not isinstance(doc, dict):
        raise ValueError("payload is not a JSON object")
    return doc


# Payload keys, the schema consumers may rely on (tests check every published payload against these).
STATUS_KEYS = frozenset({"state", "ts", "device", "agent_version", "model", "cameras", "groups"})
# `boot`: random id per agent process start; `seq` restarts at 0 with each boot (docs/MQTT.md).
PREDICTION_KEYS = frozenset({"ts", "seq", "device", "camera", "model", "top", "latency_ms", "frame_ts", "boot"})
HEALTH_KEYS = frozenset({"ts", "device", "uptime_s", "fps", "frames", "inferred", "skipped", "published",
                         "dropped", "queue_depth", "latency_ms", "cpu_percent", "rss_mb"})
MODEL_STATE_KEYS = frozenset({"state", "ts", "device", "name", "version", "sha256", "error", "transfer"})
# A region's stable state (<p>/<dev>/state/<camera>/<region>); docs/MQTT.md explains each key.
STATE_KEYS = frozenset({"ts", "device", "boot", "camera", "region", "state", "previous", "since", "reason", "score",
                        "count", "frame", "frame_ts", "model"})
LATEST_KEYS = frozenset({"ts", "device", "camera", "frame_ts", "label", "score", "top", "model"})


def status_payload(device: str, state: str, agent_version: str, model: dict[str, Any] | None,
                   cameras: dict[str, Any] | None = None, groups: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    return {"state": state, "ts": now(), "device": device, "agent_version": agent_version,
            "model": model, "cameras": cameras or {}, "groups": list(groups)}


def model_state_payload(device: str, state: str, *, name: str | None = None, version: str | None = None,
                        sha256: str | None = None, error: str | None = None,
                        transfer: str | None = None) -> dict[str, Any]:
    if state not in MODEL_STATES:
        raise ValueError(f"unknown model state {state!r}")
    return {"state": state, "ts": now(), "device": device, "name": name, "version": version,
            "sha256": sha256, "error": bounded(error), "transfer": transfer}


def bounded(text: str | None, limit: int = MAX_ERROR_CHARS) -> str | None:
    """An error text fit to publish: at most `limit` characters (hostile input can make an error text huge)."""
    if text is None or len(text) <= limit:
        return text
    return text[:limit - 1] + "…"


def state_payload(device: str, boot: str, camera: str, region: str, *, state: str | None, previous: str | None,
                  since: float, reason: str, score: float | None = None, count: int = 0, frame: int | None = None,
                  frame_ts: float | None = None, model: dict[str, str] | None = None) -> dict[str, Any]:
    """A region's stable state; `state` None = unknown (at start, or after a model that cannot name it)."""
    return {"ts": now(), "device": device, "boot": boot, "camera": camera, "region": region, "state": state,
            "previous": previous, "since": round(since, 4), "reason": reason,
            "score": None if score is None else _finite(score, 5), "count": count, "frame": frame,
            "frame_ts": None if frame_ts is None else round(frame_ts, 4), "model": model}


def latest_payload(device: str, camera: str, frame_ts: float, top: list[dict[str, Any]], model: dict[str, str],
                   region: str | None = None) -> dict[str, Any]:
    """The newest result of a camera (or of one of its regions, with `region`), for low-rate consumers."""
    best = top[0] if top else None
    doc = {"ts": now(), "device": device, "camera": camera, "frame_ts": round(frame_ts, 4),
           "label": best["label"] if best else None,
           "score": _finite(best["score"], 5) if best else None,
           "top": [{"label": t["label"], "index": t["index"], "score": _finite(t["score"], 5)} for t in top],
           "model": model}
    if region is not None:
        doc["region"] = region
    return doc
