"""docs/SCALING.md on real brokers: a device on a site broker bridged to a central broker (topics both ways,
no loops, no duplicates), and consumers sharing the prediction stream with an MQTT 5 shared subscription."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecv.agent.config import BrokerConfig
from edgecv.agent.contract.topics import DeviceTopics, encode, status_payload
from edgecv.agent.link.mqtt import MqttLink
from edgecv.agent.link.outbox import Outbox
from tests.broker import Broker
from tests.ops.probe import Msg, Probe

# The bridge section of docs/SCALING.md (the site broker connects out to the central one).
BRIDGE = """
connection central
address 127.0.0.1:{port}
topic edgecv/# both 1
bridge_protocol_version mqttv311
try_private true
cleansession true
notifications false
restart_timeout 1 2
"""


@pytest.fixture
def bridged(tmp_path: Path) -> Iterator[tuple[Broker, Broker]]:
    (tmp_path / "central").mkdir()
    (tmp_path / "site").mkdir()
    central = Broker(tmp_path / "central").start()
    site = Broker(tmp_path / "site")
    site.conf.write_text(site.conf.read_text() + BRIDGE.format(port=central.port))
    site.start()
    yield site, central
    site.stop()
    central.stop()


def device_link(broker: Broker, device: str) -> MqttLink:
    cfg = BrokerConfig(host=broker.host, port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.3)
    return MqttLink(cfg, DeviceTopics("edgecv", device), will=encode(status_payload(device, "offline", "t", None)),
                    outbox=Outbox(1000), online=lambda: encode(status_payload(device, "online", "t", None)))


def wait_for_bridge(site: Broker, central: Broker) -> None:
    """The bridge connects asynchronously: probe until a message crosses it."""
    watcher = Probe(central.port)
    watcher.subscribe("edgecv/bridge-probe/status")
    sender = Probe(site.port)
    deadline = time.monotonic() + 15
    try:
        while time.monotonic() < deadline:
            sender.publish("edgecv/bridge-probe/status", b"ping")
            if watcher.collect(0.3, n=1):
                watcher.collect(0.3)
                return
        raise AssertionError("the bridge did not connect within 15 s")
    finally:
        watcher.close()
        sender.close()


def seqs(msgs: list[Msg]) -> list[int]:
    return [json.loads(m.payload)["seq"] for m in msgs]


def test_device_and_workstation_on_bridged_brokers(bridged: tuple[Broker, Broker]) -> None:
    site, central = bridged
    wait_for_bridge(site, central)
    ws = Probe(central.port)
    assert ws.subscribe("edgecv/+/predictions") and ws.subscribe("edgecv/+/status")
    assert ws.subscribe("edgecv/+/cmd/+/result")
    link = device_link(site, "pi-remote")
    got_cmd: list[tuple[str, bytes]] = []
    link.subscribe("edgecv/pi-remote/cmd/+", lambda t, p: (got_cmd.append((t, p)),
                                                           link.publish(t + "/result", p, qos=1)))
    link.start()
    try:
        link.wait_connected(10)
        for i in range(50):
            link.publish("edgecv/pi-remote/predictions", encode({"seq": i}), qos=1)
        msgs = ws.collect(10, n=51)
        status = [m for m in msgs if m.topic.endswith("/status")]
        preds = [m for m in msgs if m.topic.endswith("/predictions")]
        assert json.loads(status[0].payload)["state"] == "online"
        assert seqs(preds) == list(range(50))  # in order, once each, across the bridge
        # A command from the workstation on the central broker reaches the device on the site broker, and the
        # result comes back, each exactly once.
        assert ws.publish("edgecv/pi-remote/cmd/ping", b'{"id":"c1"}')
        result = ws.collect(5, n=1)
        assert [(m.topic, m.payload) for m in result] == [("edgecv/pi-remote/cmd/ping/result", b'{"id":"c1"}')]
        assert got_cmd == [("edgecv/pi-remote/cmd/ping", b'{"id":"c1"}')]
        assert ws.collect(1.0) == []  # no echo, no loop
    finally:
        link.stop(encode(status_payload("pi-remote", "stopped", "t", None)))
        ws.close()


def test_shared_subscription_splits_predictions_between_consumers(bridged: tuple[Broker, Broker]) -> None:
    site, central = bridged
    wait_for_bridge(site, central)
    consumers = [Probe(central.port) for _ in range(2)]
    for c in consumers:
        assert c.subscribe("$share/g/edgecv/+/predictions")
    links = [device_link(site, f"pi-{i}") for i in range(2)]
    try:
        for link in links:
            link.start().wait_connected(10)
        n = 40
        for i in range(n):
            for link in links:
                link.publish(f"{link.topics.base}/predictions", encode({"seq": i}), qos=1)
        received: list[list[Msg]] = [[], []]
        deadline = time.monotonic() + 10
        while sum(map(len, received)) < 2 * n and time.monotonic() < deadline:
            for r, c in zip(received, consumers, strict=True):
                r.extend(c.collect(0.05))
        for r, c in zip(received, consumers, strict=True):
            r.extend(c.collect(0.3))  # a duplicate would show up here
        keys = [[(m.topic, json.loads(m.payload)["seq"]) for m in r] for r in received]
        assert all(len(k) > 0 for k in keys), [len(k) for k in keys]  # both consumers got a share
        together = keys[0] + keys[1]
        assert len(together) == len(set(together)) == 2 * n  # every message exactly once overall
        assert {t for t, _ in together} == {"edgecv/pi-0/predictions", "edgecv/pi-1/predictions"}
    finally:
        for link in links:
            link.stop()
        for c in consumers:
            c.close()
