"""The MQTT topic scheme and payload shapes shared by the agent and the workstation tools.

All payloads are UTF-8 JSON objects with UTC epoch-second timestamps (`ts`, float). Topic levels:

    <prefix>/<device>/status            retained, QoS 1; also the Last Will ("offline")
    <prefix>/<device>/predictions       QoS configurable, never retained
    <prefix>/<device>/health            QoS 0, every N seconds
    <prefix>/<device>/model/state       retained, QoS 1
    <prefix>/<device>/model/push/<transfer>/<part>       workstation → device, QoS 1, never retained
    <prefix>/groups/<group>/model/push/<transfer>/<part> workstation → group
    <prefix>/<device>/model/push/<transfer>/ack          device → workstation (progress / resume point)
    <prefix>/<device>/cmd/<name>        workstation → device, QoS 1, payload {"id": request id, ...}
    <prefix>/<device>/cmd/<name>/result device → workstation, QoS 1, payload {"id", "ok", ...}
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

DEFAULT_PREFIX = "edgecv"
STATUS_ONLINE, STATUS_OFFLINE, STATUS_STOPPED = "online", "offline", "stopped"
MODEL_STATES = ("idle", "receiving", "verifying", "active", "rejected", "rolled_back")
COMMANDS = ("ping", "reload", "snapshot", "rollback")

_LEVEL = re.compile(r"^[A-Za-z0-9_.\-]+$")


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

    @property
    def push_filter(self) -> str:
        return f"{self.base}/model/push/#"

    def push(self, transfer: str, part: str) -> str:
        return f"{self.base}/model/push/{transfer}/{part}"

    def push_ack(self, transfer: str) -> str:
        return f"{self.base}/model/push/{transfer}/ack"

    @property
    def cmd_filter(self) -> str:
        return f"{self.base}/cmd/+"

    def cmd(self, name: str) -> str:
        return f"{self.base}/cmd/{name}"

    def cmd_result(self, name: str) -> str:
        return f"{self.base}/cmd/{name}/result"


def group_push(prefix: str, group: str, transfer: str, part: str) -> str:
    return f"{prefix}/groups/{check_level(group, 'Group')}/model/push/{transfer}/{part}"


def group_push_filter(prefix: str, group: str) -> str:
    return f"{prefix}/groups/{check_level(group, 'Group')}/model/push/#"


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
            "sha256": sha256, "error": error, "transfer": transfer}
