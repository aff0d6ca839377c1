"""The fleet as the broker sees it: retained status (and model state) plus recent health, per device.

`discover()` subscribes to `<p>/+/status`, `<p>/+/model/state`, `<p>/+/state/#` (camera regions' stable states) and
`<p>/+/health`, collects for a short while and returns one `DeviceInfo` per device. Retained messages arrive at once;
health is not retained, so listening longer (`wait`) fills in fps and latency. After subscribing it also publishes the
announce request (`<p>/announce`), to which every online device answers by re-publishing its status and model state:
on brokers that never hand retained messages to wildcard subscriptions (RabbitMQ 3.x) that is how the fleet is
found.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgecv.agent.contract import topics as T
from edgecv.tools.errors import FleetError
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received

log = logging.getLogger(__name__)


@dataclass
class DeviceInfo:
    device: str
    state: str = "unknown"  # online | offline | stopped
    agent_version: str | None = None
    model: str | None = None  # "name version"
    model_version: str | None = None
    model_sha: str | None = None  # first digits of the bundle's manifest sha256: tells builds apart
    model_state: str | None = None
    groups: tuple[str, ...] = ()
    last_seen: float | None = None  # epoch seconds of the newest message from it
    fps: float | None = None
    latency_p50_ms: float | None = None
    # "<camera>/<region>" -> {"state", "since", "score", "error"}: from the retained state topics and status
    regions: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, now: float | None = None) -> list[str]:
        now = now or time.time()
        seen = "-" if self.last_seen is None else _ago(now - self.last_seen)
        return [self.device, self.state, self.model_version or "-", self.model_sha or "-", self.model_state or "-",
                seen,
                "-" if self.fps is None else f"{self.fps:.1f}",
                "-" if self.latency_p50_ms is None else f"{self.latency_p50_ms:.1f}",
                ",".join(self.groups) or "-", self.region_states()]

    def region_states(self) -> str:
        """`cam/region=state` for each region ("?" while unknown, "!" when the crop does not fit)."""
        parts = []
        for key, info in sorted(self.regions.items()):
            value = "!" if info.get("error") else (info.get("state") or "?")
            parts.append(f"{key}={value}")
        return " ".join(parts) or "-"


HEADERS = ["DEVICE", "STATE", "MODEL", "SHA", "MODEL STATE", "LAST SEEN", "FPS", "P50 MS", "GROUPS", "REGIONS"]


def discover(options: ClientOptions, prefix: str = T.DEFAULT_PREFIX, wait: float = 1.0) -> dict[str, DeviceInfo]:
    """Collect device information for `wait` seconds (retained status arrives immediately)."""
    infos: dict[str, DeviceInfo] = {}
    with MqttClient(options) as client:
        for kind in ("status", "model/state", "state/#", "health"):
            client.subscribe(T.fleet_filter(prefix, kind), qos=1 if kind != "health" else 0)
        request_announce(client, prefix)
        for msg in client.iter_messages(timeout=wait):
            update(infos, prefix, msg)
    return infos


def request_announce(client: MqttClient, prefix: str) -> bool:
    """Ask every online device to re-publish its retained status and model state (call it after subscribing).
    Best effort: a broker ACL that refuses the request leaves the retained messages as the only source."""
    try:
        client.publish(T.announce_topic(prefix), {"id": uuid.uuid4().hex[:12], "ts": T.now()}, qos=1)
    except FleetError as exc:
        log.debug("Announce request not sent: %s", exc)
        return False
    return True


def update(infos: dict[str, DeviceInfo], prefix: str, msg: Received) -> None:
    parsed = T.parse_device_topic(prefix, msg.topic)
    if parsed is None:
        return
    device, kind = parsed
    if not msg.payload:  # an empty retained message clears a topic
        return
    try:
        doc = msg.json()
    except ValueError:
        return
    info = infos.setdefault(device, DeviceInfo(device))
    ts = doc.get("ts")
    if isinstance(ts, int | float):
        info.last_seen = max(info.last_seen or 0.0, float(ts))
    if kind == "status":
        info.state = str(doc.get("state", "unknown"))
        info.agent_version = doc.get("agent_version")
        model = doc.get("model") or {}
        if isinstance(model, dict) and model:
            info.model_version = model.get("version")
            info.model = f"{model.get('name')} {model.get('version')}"
            sha = model.get("sha256")
            info.model_sha = sha[:T.SHORT_SHA] if isinstance(sha, str) and sha else info.model_sha
        groups = doc.get("groups") or ()
        info.groups = tuple(str(g) for g in groups) if isinstance(groups, list | tuple) else ()
        cameras = doc.get("cameras")
        for cam, cst in (cameras.items() if isinstance(cameras, dict) else ()):
            regions = cst.get("regions") if isinstance(cst, dict) else None
            for name, rst in (regions.items() if isinstance(regions, dict) else ()):
                if isinstance(rst, dict):
                    info.regions.setdefault(f"{cam}/{name}", {})["error"] = rst.get("error")
    elif kind.startswith("state/"):
        key = kind[len("state/"):]
        entry = info.regions.setdefault(key, {})
        entry.update(state=doc.get("state"), since=doc.get("since"), score=doc.get("score"))
    elif kind == "model/state":
        info.model_state = doc.get("state")
        if doc.get("state") == "active" and doc.get("version"):
            info.model_version = info.model_version or doc.get("version")
            sha = doc.get("sha256")
            if isinstance(sha, str) and sha and not info.model_sha:
                info.model_sha = sha[:T.SHORT_SHA]
    elif kind == "health":
        fps = doc.get("fps")
        info.fps = float(fps) if isinstance(fps, int | float) else info.fps
        lat = doc.get("latency_ms")
        if isinstance(lat, dict):
            p50 = lat.get("p50", lat.get("total_p50"))
            if isinstance(p50, int | float):
                info.latency_p50_ms = float(p50)
        elif isinstance(lat, int | float):
            info.latency_p50_ms = float(lat)


def group_members(infos: dict[str, DeviceInfo], group: str, online_only: bool = True) -> list[str]:
    """Devices whose retained status lists `group` (online ones only, unless told otherwise)."""
    return sorted(d for d, i in infos.items() if group in i.groups and (i.state == T.STATUS_ONLINE or not online_only))


def describe_offline(info: DeviceInfo, now: float | None = None) -> str:
    """`pi-1 is offline (last seen 3m ago)`: for a note before a command that will wait for it."""
    seen = "" if info.last_seen is None else f", last seen {_ago((now or time.time()) - info.last_seen)}"
    state = "never reported" if info.state == "unknown" else info.state
    return f"{info.device} is {state}{seen}"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"
