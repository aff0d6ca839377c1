"""Home Assistant MQTT discovery: announce a device's predictions and health as Home Assistant sensors.

What this relies on, from Home Assistant's MQTT documentation (https://www.home-assistant.io/integrations/mqtt/
"Discovery topic", "Using availability topics", "Adding information about the origin", and
https://www.home-assistant.io/integrations/sensor.mqtt/ "Configuration variables"):

- config topic `<discovery_prefix>/<component>/[<node_id>/]<object_id>/config`; node_id and object_id only
  `[a-zA-Z0-9_-]`; payload a JSON object, published retained so Home Assistant finds it after a restart;
- a sensor needs `state_topic`; `unique_id` makes it an entity Home Assistant keeps (and is needed for the
  `device` mapping to register a device); `device` needs `identifiers` (or `connections`) and may carry
  `name`, `model`, `sw_version`, `manufacturer`; `origin` names the software that sent the discovery message;
- `availability` is a list of `{topic, payload_available, payload_not_available, value_template}`;
- Home Assistant publishes `online` on `<discovery_prefix>/status` (its birth message) when it (re)starts:
  devices re-send their discovery payloads then.

Per-frame sensors (top label and score) would make Home Assistant record a state at the camera's frame rate: they
read `<p>/<dev>/latest` (and `latest/<camera>/<region>` for regions), which the agent publishes at most
`homeassistant.max_rate_hz` times per second (0: the device sensors read every prediction, as before). Each camera
region also gets a state sensor on its retained `state/<camera>/<region>` topic, which changes only when the region's
stable state does, with the evidence as attributes.

Our status topic carries JSON (`{"state": "online"|"offline"|"stopped", ...}`, see agent/contract/topics.py), so
the availability template maps `online` to available and anything else (`offline` Last Will, `stopped`) to
unavailable.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from edgecv.agent import __version__
from edgecv.agent.config import AgentConfig
from edgecv.agent.contract.topics import STATUS_ONLINE, DeviceTopics
from edgecv.agent.link.protocol import Link

log = logging.getLogger(__name__)

MANUFACTURER = "edgecv"
AVAILABILITY_TEMPLATE = ("{{ 'online' if (value_json.state if value_json is defined else value) == 'online' "
                         "else 'offline' }}")
# health.latency_ms.infer_p50 (agent/system/health.py) is null before the first inference: render "None", which Home
# Assistant's MQTT sensor turns into an unknown state instead of a non-numeric error.
_LATENCY_TEMPLATE = ("{% set l = value_json.latency_ms.infer_p50 %}"
                     "{{ (l | round(2)) if l is number else none }}")


@dataclass(frozen=True)
class Sensor:
    key: str  # object_id and unique_id suffix
    name: str
    kind: str  # which device topic: predictions | health | model_state
    value_template: str
    unit: str | None = None
    state_class: str | None = None
    device_class: str | None = None
    icon: str | None = None
    diagnostic: bool = False
    topic: str | None = None  # an explicit state topic (region sensors), instead of the device topic `kind` names
    attributes_template: str | None = None  # json_attributes_template over the state topic


# A predictions payload is one object, or an array of them with publish.batch_max >= 2: use the newest.
_NEWEST = "{% set p = value_json if value_json is mapping else value_json[-1] %}"

SENSORS: tuple[Sensor, ...] = (
    Sensor("top_label", "Top label", "predictions",
           _NEWEST + "{{ p.top[0].label if p.top else 'none' }}", icon="mdi:label-outline"),
    Sensor("top_score", "Top score", "predictions",
           _NEWEST + "{{ ((p.top[0].score * 100) | round(1)) if p.top else 0 }}",
           unit="%", state_class="measurement", icon="mdi:percent-outline"),
    Sensor("fps", "Frames per second", "health",
           "{{ (value_json.fps | round(1)) if value_json.fps is number else none }}",
           unit="fps", state_class="measurement", icon="mdi:camera-timer", diagnostic=True),
    Sensor("inference_latency", "Inference latency", "health", _LATENCY_TEMPLATE,
           unit="ms", state_class="measurement", device_class="duration", icon="mdi:timer-outline",
           diagnostic=True),
    Sensor("model_version", "Model version", "model_state",
           "{{ value_json.name ~ ' ' ~ value_json.version if value_json.version else 'none' }}",
           icon="mdi:brain", diagnostic=True),
)

# The same two sensors over the rate-limited `latest` payloads (contract/topics.py latest_payload).
_LATEST_LABEL = "{{ value_json.label if value_json.label else 'none' }}"
_LATEST_SCORE = "{{ ((value_json.score * 100) | round(1)) if value_json.score is number else 0 }}"
# A region's state: null (unknown: just started, or the model changed) renders "None", Home Assistant's unknown.
_STATE = "{% set s = value_json.state %}{{ s if s is string else none }}"
_STATE_ATTRIBUTES = ("{{ {'previous': value_json.previous, 'since': value_json.since, 'score': value_json.score, "
                     "'count': value_json.count, 'reason': value_json.reason} | tojson }}")

_NODE_BAD = re.compile(r"[^A-Za-z0-9_-]")


def node_id(device: str) -> str:
    """Home Assistant allows only [a-zA-Z0-9_-] in discovery topic ids; device ids may also contain '.'."""
    return _NODE_BAD.sub("_", device)


def model_identity(model: Any) -> tuple[str, str] | None:
    """(name, version) of a Bundle, Manifest, Classifier or {"name", "version"} mapping; None when unknown."""
    if model is None:
        return None
    if isinstance(model, Mapping):
        name, version = model.get("name"), model.get("version")
        return (str(name), str(version)) if name else None
    for attr in ("bundle", "manifest"):  # Classifier -> Bundle -> Manifest
        inner = getattr(model, attr, None)
        if inner is not None:
            return model_identity(inner)
    name, version = getattr(model, "name", None), getattr(model, "version", None)
    return (str(name), str(version)) if isinstance(name, str) and name else None


def sensors_for(config: AgentConfig, topics: DeviceTopics) -> list[Sensor]:
    """The sensors of this device: the device's own (the top label and score only when a camera classifies whole
    frames, from `latest` when rate-limited), then state, label and score of every camera region."""
    throttled = config.homeassistant.max_rate_hz > 0
    out = []
    whole_frames = any(not cam.regions for cam in config.cameras)
    for sensor in SENSORS:
        if sensor.kind == "predictions":
            if not whole_frames:
                continue
            if throttled:
                template = _LATEST_LABEL if sensor.key == "top_label" else _LATEST_SCORE
                sensor = replace(sensor, topic=topics.latest, value_template=template)
        out.append(sensor)
    for cam in config.cameras:
        for region in cam.regions:
            key, name = f"{cam.name}_{region.name}", f"{cam.name} {region.name}"
            latest = topics.latest_region(cam.name, region.name)
            out += [
                Sensor(f"{key}_state", f"{name} state", "state", _STATE, icon="mdi:state-machine",
                       topic=topics.state(cam.name, region.name), attributes_template=_STATE_ATTRIBUTES),
                Sensor(f"{key}_label", f"{name} label", "latest", _LATEST_LABEL, icon="mdi:label-outline",
                       topic=latest),
                Sensor(f"{key}_score", f"{name} score", "latest", _LATEST_SCORE, unit="%", state_class="measurement",
                       icon="mdi:percent-outline", topic=latest),
            ]
    return out


def discovery_messages(config: AgentConfig, topics: DeviceTopics, model: Any) -> list[tuple[str, bytes]]:
    """Every discovery config message for this device: (topic, payload), to publish retained at QoS 1."""
    prefix = config.homeassistant.discovery_prefix
    node = node_id(topics.device)
    ident = model_identity(model)
    uid_base = f"{topics.prefix.replace('/', '_')}_{topics.device}"
    device = {
        "identifiers": [uid_base],
        "name": topics.device,
        "manufacturer": MANUFACTURER,
        "model": f"edgecv agent ({ident[0]})" if ident else "edgecv agent",
        "sw_version": __version__,
    }
    origin = {"name": "edgecv", "sw_version": __version__}
    availability = [{
        "topic": topics.status,
        "value_template": AVAILABILITY_TEMPLATE,
        "payload_available": STATUS_ONLINE,
        "payload_not_available": "offline",
    }]
    state_topics = {"predictions": topics.predictions, "health": topics.health, "model_state": topics.model_state}
    messages = []
    for sensor in sensors_for(config, topics):
        state_topic = sensor.topic or state_topics[sensor.kind]
        payload: dict[str, Any] = {
            "name": sensor.name,
            "unique_id": f"{uid_base}_{node_id(sensor.key)}",
            "state_topic": state_topic,
            "value_template": sensor.value_template,
            "availability": availability,
            "availability_mode": "latest",
            "device": device,
            "origin": origin,
        }
        if sensor.unit:
            payload["unit_of_measurement"] = sensor.unit
        if sensor.state_class:
            payload["state_class"] = sensor.state_class
        if sensor.device_class:
            payload["device_class"] = sensor.device_class
        if sensor.icon:
            payload["icon"] = sensor.icon
        if sensor.diagnostic:
            payload["entity_category"] = "diagnostic"
        if sensor.attributes_template:
            payload["json_attributes_topic"] = state_topic
            payload["json_attributes_template"] = sensor.attributes_template
        topic = f"{prefix}/sensor/{node}/{node_id(sensor.key)}/config"
        messages.append((topic, json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()))
    return messages


class HomeAssistantDiscovery:
    """Publishes the discovery messages on every (re)connect, on Home Assistant's birth message and after a
    model change; does nothing when `homeassistant.enabled = false`. `current_model()` names the running model
    (a Classifier, or None on a device still waiting for one)."""

    def __init__(self, config: AgentConfig, topics: DeviceTopics, link: Link,
                 current_model: Callable[[], Any]) -> None:
        self.config = config
        self.topics = topics
        self.link = link
        self._current_model = current_model
        self.enabled = bool(self.config.homeassistant.enabled)
        self.birth_topic = f"{self.config.homeassistant.discovery_prefix}/status"
        self.publications = 0  # how many times the whole set was published
        self._lock = threading.Lock()
        self._last_model: tuple[str, str] | None = None

    def start(self) -> HomeAssistantDiscovery:
        if not self.enabled:
            log.info("Home Assistant discovery is disabled (homeassistant.enabled = false)")
            return self
        link = self.link
        link.subscribe(self.birth_topic, self._on_birth)
        link.subscribe(self.topics.model_state, self._on_model_state)
        link.add_on_connect(self._republish)
        if link.is_connected():
            self.publish()
        return self

    def publish(self) -> int:
        """Queue every discovery message (retained, QoS 1); returns how many."""
        if not self.enabled:
            return 0
        model = self._current_model()
        messages = discovery_messages(self.config, self.topics, model)
        with self._lock:
            for topic, payload in messages:
                self.link.publish(topic, payload, qos=1, retain=True)
            self._last_model = model_identity(model)
            self.publications += 1
        log.info("Published %d Home Assistant discovery messages under %s/sensor/%s/", len(messages),
                 self.config.homeassistant.discovery_prefix, node_id(self.topics.device))
        return len(messages)

    def _republish(self) -> None:
        self.publish()

    def _on_birth(self, topic: str, payload: bytes) -> None:
        if payload.strip().lower() == STATUS_ONLINE.encode():
            log.info("Home Assistant came online (%s); re-publishing discovery", topic)
            self.publish()

    def _on_model_state(self, topic: str, payload: bytes) -> None:
        # The device model shown in Home Assistant names the active model: refresh it after a swap.
        if model_identity(self._current_model()) != self._last_model:
            self.publish()
