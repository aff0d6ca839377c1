"""Home Assistant discovery: payloads against HA's documented MQTT discovery schema, templates rendered with
Jinja2 against real payload shapes, retained on a real broker, re-published on HA's birth message."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import jinja2
import pytest

from edgecv.agent.config import BrokerConfig, parse_config
from edgecv.agent.contract.topics import DeviceTopics, encode, status_payload
from edgecv.agent.link.discovery import SENSORS, HomeAssistantDiscovery, discovery_messages, node_id
from edgecv.agent.link.mqtt import MqttLink
from edgecv.agent.link.outbox import Outbox
from tests.broker import Broker
from tests.ops.probe import Probe
from tests.waiting import wait_until

# Keys Home Assistant documents for an MQTT sensor (https://www.home-assistant.io/integrations/sensor.mqtt/),
# for the `device` mapping and the `origin` mapping (https://www.home-assistant.io/integrations/mqtt/).
SENSOR_KEYS = {
    "availability", "availability_mode", "availability_template", "availability_topic", "default_entity_id",
    "device", "device_class", "enabled_by_default", "encoding", "entity_category", "entity_picture",
    "expire_after", "force_update", "icon", "json_attributes_template", "json_attributes_topic",
    "last_reset_value_template", "name", "object_id", "options", "origin", "payload_available",
    "payload_not_available", "platform", "qos", "state_class", "state_topic", "suggested_display_precision",
    "unique_id", "unit_of_measurement", "value_template",
}
DEVICE_KEYS = {"configuration_url", "connections", "hw_version", "identifiers", "manufacturer", "model",
               "model_id", "name", "serial_number", "suggested_area", "sw_version", "via_device"}
ORIGIN_KEYS = {"name", "sw_version", "support_url"}
AVAILABILITY_KEYS = {"topic", "payload_available", "payload_not_available", "value_template"}
STATE_CLASSES = {"measurement", "measurement_angle", "total", "total_increasing"}
DURATION_UNITS = {"d", "h", "min", "s", "ms", "µs"}
TOPIC = re.compile(r"^(?P<prefix>.+)/sensor/(?P<node>[A-Za-z0-9_-]+)/(?P<object>[A-Za-z0-9_-]+)/config$")

MODEL = SimpleNamespace(bundle=SimpleNamespace(manifest=SimpleNamespace(name="fashion-cnn", version="1.2.0")))


def check_ha_schema(messages: list[tuple[str, bytes]], prefix: str = "homeassistant") -> list[dict[str, Any]]:
    docs = []
    for topic, raw in messages:
        m = TOPIC.match(topic)
        assert m and m["prefix"] == prefix, topic
        doc = json.loads(raw)
        assert set(doc) <= SENSOR_KEYS, set(doc) - SENSOR_KEYS
        assert doc["state_topic"] and doc["unique_id"] and doc["name"]
        assert set(doc["device"]) <= DEVICE_KEYS
        assert isinstance(doc["device"]["identifiers"], list) and doc["device"]["identifiers"]
        assert doc["device"]["manufacturer"] == "edgecv"
        assert set(doc["origin"]) <= ORIGIN_KEYS and doc["origin"]["name"]
        for av in doc["availability"]:
            assert set(av) <= AVAILABILITY_KEYS and av["topic"]
            assert (av["payload_available"], av["payload_not_available"]) == ("online", "offline")
        assert doc.get("state_class", "measurement") in STATE_CLASSES
        assert doc.get("entity_category", "diagnostic") in ("config", "diagnostic")
        if doc.get("device_class") == "duration":
            assert doc["unit_of_measurement"] in DURATION_UNITS
        docs.append(doc)
    uids = [d["unique_id"] for d in docs]
    assert len(set(uids)) == len(uids), "unique_id must be unique"
    return docs


def render(template: str, payload: Any) -> str:
    """Render like Home Assistant: `value` is the raw payload, `value_json` only when it parses as JSON."""
    env = jinja2.Environment(undefined=jinja2.ChainableUndefined)
    raw = payload if isinstance(payload, str) else json.dumps(payload)
    ctx: dict[str, Any] = {"value": raw}
    try:
        ctx["value_json"] = json.loads(raw)
    except ValueError:
        pass
    return env.from_string(template).render(**ctx).strip()


def cfg(device: str = "pi-kitchen", **ha: Any) -> Any:
    return parse_config({"device_id": device, "homeassistant": ha} if ha else {"device_id": device})


def test_payloads_follow_the_documented_schema() -> None:
    topics = DeviceTopics("edgecv", "pi-kitchen")
    messages = discovery_messages(cfg(), topics, MODEL)
    docs = check_ha_schema(messages)
    assert [TOPIC.match(t)["object"] for t, _ in messages] == [s.key for s in SENSORS]  # type: ignore[index]
    by_key = {s.key: d for s, d in zip(SENSORS, docs, strict=True)}
    # per-frame sensors read the rate-limited `latest` topic (homeassistant.max_rate_hz, default 1 per second)
    assert by_key["top_label"]["state_topic"] == "edgecv/pi-kitchen/latest"
    assert by_key["top_score"]["state_topic"] == "edgecv/pi-kitchen/latest"
    unlimited = dict(zip(SENSORS, check_ha_schema(discovery_messages(cfg(max_rate_hz=0), topics, MODEL)),
                         strict=True))
    assert {s.key: d["state_topic"] for s, d in unlimited.items()}["top_label"] == "edgecv/pi-kitchen/predictions"
    assert by_key["fps"]["state_topic"] == "edgecv/pi-kitchen/health"
    assert by_key["inference_latency"]["unit_of_measurement"] == "ms"
    assert by_key["model_version"]["state_topic"] == "edgecv/pi-kitchen/model/state"
    assert all(d["availability"][0]["topic"] == "edgecv/pi-kitchen/status" for d in docs)
    device = docs[0]["device"]
    assert device["name"] == "pi-kitchen" and "fashion-cnn" in device["model"] and device["sw_version"]
    assert all(d["device"] == device for d in docs)


def test_unique_ids_differ_between_devices_and_ids_are_sanitised() -> None:
    a = check_ha_schema(discovery_messages(cfg("pi.a"), DeviceTopics("edgecv", "pi.a"), None))
    b = check_ha_schema(discovery_messages(cfg("pi_a"), DeviceTopics("edgecv", "pi_a"), None))
    assert not {d["unique_id"] for d in a} & {d["unique_id"] for d in b}
    assert node_id("pi.a") == "pi_a"
    topics = [t for t, _ in discovery_messages(cfg("pi.a", discovery_prefix="ha/x"), DeviceTopics("edgecv", "pi.a"),
                                               None)]
    assert all(t.startswith("ha/x/sensor/pi_a/") for t in topics)


def test_templates_render_real_payloads() -> None:
    docs = {json.loads(p)["unique_id"].rsplit("pi-kitchen_", 1)[1]: json.loads(p)
            for _, p in discovery_messages(cfg(max_rate_hz=0), DeviceTopics("edgecv", "pi-kitchen"), MODEL)}
    prediction = {"ts": 1.0, "seq": 3, "device": "pi-kitchen", "camera": "cam0", "model": {"name": "m"},
                  "top": [{"label": "Sneaker", "index": 7, "score": 0.9731}, {"label": "Bag", "index": 8,
                                                                             "score": 0.02}],
                  "latency_ms": {"pre": 0.1, "infer": 0.4, "post": 0.01, "total": 0.6}, "frame_ts": 0.9}
    assert render(docs["top_label"]["value_template"], prediction) == "Sneaker"
    assert render(docs["top_score"]["value_template"], prediction) == "97.3"
    assert render(docs["top_label"]["value_template"], {**prediction, "top": []}) == "none"
    # publish.batch_max >= 2: the payload is an array of predictions; the sensors show the newest
    older = {**prediction, "top": [{"label": "Bag", "index": 8, "score": 0.5}]}
    assert render(docs["top_label"]["value_template"], [older, prediction]) == "Sneaker"
    assert render(docs["top_score"]["value_template"], [older, prediction]) == "97.3"
    health = {"fps": 9.876, "latency_ms": {"p50": 0.6, "p95": 0.9, "infer_p50": 0.4321}}  # agent/system/health.py
    assert render(docs["fps"]["value_template"], health) == "9.9"
    assert render(docs["inference_latency"]["value_template"], health) == "0.43"
    idle = {"fps": 0.0, "latency_ms": {"p50": None, "p95": None, "infer_p50": None}}
    assert render(docs["inference_latency"]["value_template"], idle) == "None"  # HA: unknown
    state = {"state": "active", "name": "fashion-cnn", "version": "1.2.0"}
    assert render(docs["model_version"]["value_template"], state) == "fashion-cnn 1.2.0"
    av = docs["top_label"]["availability"][0]["value_template"]
    for payload, expected in ((status_payload("pi-kitchen", "online", "0.1", None), "online"),
                              (status_payload("pi-kitchen", "stopped", "0.1", None), "offline"),
                              (status_payload("pi-kitchen", "offline", "0.1", None), "offline"),
                              ("offline", "offline"), ("online", "online")):
        assert render(av, payload) == expected, payload


def test_regions_get_a_state_sensor_and_rate_limited_label_and_score() -> None:
    from edgecv.agent.contract.topics import latest_payload, state_payload

    config = parse_config({"device_id": "pi-garage", "camera": [
        {"name": "cam0"},
        {"name": "yard.1", "region": [{"name": "door", "crop": [0, 0, 8, 8]},
                                      {"name": "bins", "crop": [8, 0, 8, 8]}]}]})
    topics = DeviceTopics("edgecv", "pi-garage")
    docs = check_ha_schema(discovery_messages(config, topics, MODEL))
    by_key = {d["unique_id"].rsplit("pi-garage_", 1)[1]: d for d in docs}
    assert {"top_label", "top_score"} <= set(by_key)  # cam0 classifies whole frames
    for region in ("door", "bins"):
        state, label, score = (by_key[f"yard_1_{region}_{k}"] for k in ("state", "label", "score"))
        assert state["state_topic"] == f"edgecv/pi-garage/state/yard.1/{region}"
        assert state["json_attributes_topic"] == state["state_topic"] and "state_class" not in state
        assert label["state_topic"] == score["state_topic"] == f"edgecv/pi-garage/latest/yard.1/{region}"
        assert score["unit_of_measurement"] == "%"
    state, label, score = (by_key[f"yard_1_door_{k}"] for k in ("state", "label", "score"))
    changed = state_payload("pi-garage", "b", "yard.1", "door", state="open", previous="closed", since=5.0,
                            reason="confirmed", score=0.97, count=3, frame=12, frame_ts=4.9,
                            model={"name": "m", "version": "1"})
    assert render(state["value_template"], changed) == "open"
    attributes = json.loads(render(state["json_attributes_template"], changed))
    assert attributes == {"previous": "closed", "since": 5.0, "score": 0.97, "count": 3, "reason": "confirmed"}
    unknown = state_payload("pi-garage", "b", "yard.1", "door", state=None, previous=None, since=1.0, reason="start")
    assert render(state["value_template"], unknown) == "None"  # Home Assistant's unknown
    latest = latest_payload("pi-garage", "yard.1", 5.0, [{"label": "open", "index": 1, "score": 0.9731}],
                            {"name": "m", "version": "1"}, region="door")
    assert render(label["value_template"], latest) == "open" and render(score["value_template"], latest) == "97.3"
    empty = latest_payload("pi-garage", "yard.1", 5.0, [], {"name": "m", "version": "1"}, region="door")
    assert render(label["value_template"], empty) == "none" and render(score["value_template"], empty) == "0"
    whole = {d["unique_id"].rsplit("pi-garage_", 1)[1]: d for d in docs}["top_label"]
    assert render(whole["value_template"], latest_payload("pi-garage", "cam0", 5.0, [
        {"label": "Bag", "index": 8, "score": 0.5}], {"name": "m", "version": "1"})) == "Bag"
    # a device whose every camera has regions has no whole-frame predictions, so no top label / score sensors
    only_regions = parse_config({"device_id": "pi-garage", "camera": [
        {"name": "yard", "region": [{"name": "door", "crop": [0, 0, 8, 8]}]}]})
    keys = {json.loads(p)["unique_id"].rsplit("pi-garage_", 1)[1] for _, p in
            discovery_messages(only_regions, topics, MODEL)}
    assert "top_label" not in keys and {"yard_door_state", "fps", "model_version"} <= keys


# ---- on a real broker, through the agent's real MqttLink -------------------------------------------------------

class FakeAgent(SimpleNamespace):
    """What the app hands HomeAssistantDiscovery (config, topics, a real MqttLink, the running model)."""

    def discovery(self) -> HomeAssistantDiscovery:
        return HomeAssistantDiscovery(self.config, self.topics, self.link, current_model=lambda: self.classifier)


@pytest.fixture
def agent_on_broker(broker: Broker) -> Iterator[FakeAgent]:
    config = parse_config({"device_id": "pi-ha", "broker": {"host": broker.host, "port": broker.port}})
    topics = DeviceTopics("edgecv", "pi-ha")
    bc = BrokerConfig(host=broker.host, port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.3)
    link = MqttLink(bc, topics, will=encode(status_payload("pi-ha", "offline", "t", None)), outbox=Outbox(100),
                    online=lambda: encode(status_payload("pi-ha", "online", "t", None)))
    agent = FakeAgent(config=config, topics=topics, link=link, classifier=MODEL)
    yield agent
    link.stop()



def test_retained_on_the_broker_and_republished_when_home_assistant_comes_online(
        broker: Broker, agent_on_broker: FakeAgent) -> None:
    agent = agent_on_broker
    disc = agent.discovery().start()
    agent.link.start()
    assert wait_until(lambda: disc.publications == 1 and len(agent.link.outbox) == 0)
    # A Home Assistant that connects later sees every config, retained.
    ha = Probe(broker.port)
    assert ha.subscribe("homeassistant/sensor/#")
    retained = ha.collect(5, n=len(SENSORS))
    assert len(retained) == len(SENSORS) and all(m.retain for m in retained)
    check_ha_schema([(m.topic, m.payload) for m in retained])
    # Home Assistant's birth message makes the device publish them again.
    assert ha.publish("homeassistant/status", "online")
    again = ha.collect(5, n=len(SENSORS))
    assert sorted(m.topic for m in again) == sorted(m.topic for m in retained)
    assert disc.publications == 2
    assert ha.publish("homeassistant/status", "offline")  # HA's will: nothing to do
    assert ha.collect(0.5) == [] and disc.publications == 2
    # After a reconnect (broker restart) they are published again.
    ha.close()
    broker.stop(kill=True)
    broker.start()
    assert wait_until(lambda: disc.publications == 3, timeout=15)
    ha.close()


def test_disabled_publishes_nothing(broker: Broker) -> None:
    config = parse_config({"device_id": "pi-off", "homeassistant": {"enabled": False}})
    topics = DeviceTopics("edgecv", "pi-off")
    bc = BrokerConfig(host=broker.host, port=broker.port)
    link = MqttLink(bc, topics, will=b"offline", outbox=Outbox(100))
    disc = FakeAgent(config=config, topics=topics, link=link, classifier=None).discovery().start()
    link.start()
    try:
        link.wait_connected(10)
        ha = Probe(broker.port)
        assert ha.subscribe("homeassistant/sensor/#")
        assert ha.publish("homeassistant/status", "online")
        assert ha.collect(1.0) == [] and disc.publications == 0 and disc.publish() == 0
        ha.close()
    finally:
        link.stop()
