"""The broker matrix: edgecv's representative end-to-end paths against every broker kind it is tested on.

    mosquitto-mqtt5     Mosquitto; the agent and the tools speak MQTT 5 (the default)
    mosquitto-mqtt311   Mosquitto; everything speaks MQTT 3.1.1
    nats-mqtt311        nats-server's MQTT gateway (JetStream); MQTT 3.1.1, the only version it speaks

For each kind one broker and one agent (signed bundles only, group `matrix`, `publish.expiry_s` set) serve every
check in this module, to keep CI cost down: predictions arrive in order; the retained status and model state
reach a late wildcard subscriber, and the announce request brings them live; a command gets its result;
`edgecv devices` and `edgecv watch` see the device; a signed group push activates; kill -9 fires the Last Will
and the restarted agent is online again. The one MQTT 5 feature the agent uses (message expiry) degrades to a
warning on 3.1.1, and a broker that speaks only 3.1.1 refuses MQTT 5 clients with a reason both sides report.
The three-node NATS cluster is in test_broker_cluster.py, RabbitMQ's retained-wildcard gap in test_rabbitmq.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from edgecv.agent.contract import topics as T
from edgecv.agent.contract.topics import PREDICTION_KEYS, decode
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient
from tests.broker import Broker, BrokerProcess, NatsBroker
from tests.bundle_factory import make_archive
from tests.e2e.conftest import (
    AgentHandle,
    AgentLauncher,
    Target,
    agent_command,
    collect,
    docs_of,
    edgecv_command,
    require_nats,
    wait_until,
)

pytestmark = pytest.mark.e2e

TARGETS: dict[str, tuple[type[BrokerProcess], str]] = {
    "mosquitto-mqtt5": (Broker, "5"),
    "mosquitto-mqtt311": (Broker, "3.1.1"),
    "nats-mqtt311": (NatsBroker, "3.1.1"),
}
GROUP = "matrix"
EXPIRY_S = 600


@pytest.fixture(scope="module", params=list(TARGETS))
def target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    kind, protocol = TARGETS[request.param]
    if kind is NatsBroker:
        require_nats()
    broker = kind(tmp_path_factory.mktemp(request.param)).start()
    yield Target(request.param, broker, protocol)
    broker.stop()


@dataclass
class Fleet:
    target: Target
    agent: AgentHandle
    bundles: dict[str, Path]


@pytest.fixture(scope="module")
def fleet(target: Target, tmp_path_factory: pytest.TempPathFactory, signing: tuple[Any, Path]) -> Iterator[Fleet]:
    """One agent on the target's broker for every check: signed bundles only, seeded with tiny 1.0."""
    key, ring = signing
    work = tmp_path_factory.mktemp(f"{target.name}-fleet")
    bundles = {v: make_archive(work / "bundles", v, top1=int(float(v)), key=key) for v in ("1.0", "2.0")}
    launcher = AgentLauncher(work, bundles["1.0"])
    agent = launcher.start({"broker": {"protocol": target.protocol}, "groups": [GROUP],
                            "security": {"keyring": str(ring), "allow_unsigned": False},
                            "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 10.0}],
                            "publish": {"expiry_s": EXPIRY_S}, "update": {"probation_s": 2.0}},
                           broker=target.broker)
    yield Fleet(target, agent, bundles)
    launcher.close()


def wait_online(fleet: Fleet, timeout: float = 30) -> None:
    sub = fleet.target.client(fleet.agent.topics.status)
    try:
        collect(sub, lambda m: any(d["state"] == "online" for d in docs_of(m, fleet.agent.topics.status)), timeout,
                fleet.agent)
    finally:
        sub.close()


# ------------------------------------------------------------------------------------------------ checks
def test_predictions_arrive_in_order(fleet: Fleet) -> None:
    topic = fleet.agent.topics.predictions
    sub = fleet.target.client(topic)
    try:
        msgs = collect(sub, lambda m: len(m) >= 15, 30, fleet.agent)
    finally:
        sub.close()
    preds = docs_of(msgs, topic)
    assert all(set(p) >= PREDICTION_KEYS and p["device"] == fleet.agent.device for p in preds)
    assert len({p["boot"] for p in preds}) == 1
    seqs = [p["seq"] for p in preds]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # none lost, none reordered (QoS 1)
    assert all(p["model"]["name"] == "tiny" for p in preds)


def test_retained_status_and_model_state_reach_a_late_wildcard_subscriber(fleet: Fleet) -> None:
    """What `edgecv devices` and `push --group` rely on first: retained messages delivered on `<p>/+/...`
    subscriptions (RabbitMQ 3.x does not do this; test_rabbitmq.py)."""
    wait_online(fleet)
    topics = fleet.agent.topics
    sub = fleet.target.client(T.fleet_filter("edgecv", "status"), T.fleet_filter("edgecv", "model/state"))
    try:
        msgs = collect(sub, lambda m: bool(docs_of(m, topics.status, True) and docs_of(m, topics.model_state, True)),
                       15, fleet.agent)
    finally:
        sub.close()
    status = docs_of(msgs, topics.status, True)[-1]
    assert status["state"] == "online" and status["model"]["name"] == "tiny" and status["groups"] == [GROUP]
    assert docs_of(msgs, topics.model_state, True)[-1]["state"] in ("active", "rolled_back")


def test_announce_request_brings_status_and_model_state_live(fleet: Fleet) -> None:
    """After the announce request the device re-publishes both documents: they arrive as live messages
    (retain flag clear), which every broker delivers to wildcard subscriptions. Earlier checks sent requests too
    (`edgecv devices`): one within a second of the last answer is answered when that second has passed."""
    wait_online(fleet)
    topics = fleet.agent.topics
    sub = fleet.target.client(T.fleet_filter("edgecv", "status"), T.fleet_filter("edgecv", "model/state"))
    try:
        sub.publish(T.announce_topic("edgecv"), {"id": "matrix"})
        msgs = collect(sub, lambda m: bool(docs_of(m, topics.status, False) and docs_of(m, topics.model_state, False)),
                       15, fleet.agent)
    finally:
        sub.close()
    assert docs_of(msgs, topics.status, False)[-1]["state"] == "online"
    assert docs_of(msgs, topics.model_state, False)[-1]["version"]


def test_command_gets_its_result(fleet: Fleet) -> None:
    topics = fleet.agent.topics
    client = fleet.target.client(topics.cmd_result("ping"), topics.cmd_result("bogus"))
    try:
        wait_online(fleet)
        client.publish(topics.cmd("ping"), {"id": "req-1"})
        result = client.wait_for(lambda m: m.topic == topics.cmd_result("ping") and m.json().get("id") == "req-1", 15)
        doc = result.json()
        assert doc["ok"] is True and doc["device"] == fleet.agent.device and doc["model"]["name"] == "tiny"
        client.publish(topics.cmd("bogus"), {"id": "req-2"})
        bad = client.wait_for(lambda m: m.topic == topics.cmd_result("bogus"), 15).json()
        assert bad["id"] == "req-2" and bad["ok"] is False and "Unknown command" in bad["error"]
    finally:
        client.close()


def test_devices_and_watch_see_the_device(fleet: Fleet) -> None:
    wait_online(fleet)
    listed = fleet.target.cli("devices", "--json", "--wait", "1.5")
    assert listed.returncode == 0, listed.stderr
    mine = [d for d in json.loads(listed.stdout) if d["device"] == fleet.agent.device]
    assert len(mine) == 1 and mine[0]["state"] == "online" and mine[0]["model_version"] in ("1.0", "2.0"), mine
    assert mine[0]["groups"] == [GROUP]
    watched = fleet.target.cli("watch", "--json", "--device", fleet.agent.device, "--count", "5", "--timeout", "30")
    assert watched.returncode == 0, watched.stderr
    docs = [json.loads(line) for line in watched.stdout.splitlines()]
    assert len(docs) == 5 and {d["device"] for d in docs} == {fleet.agent.device}
    by_group = fleet.target.cli("watch", "--json", "--group", GROUP, "--count", "3", "--timeout", "30")
    assert by_group.returncode == 0, by_group.stderr
    assert {json.loads(line)["device"] for line in by_group.stdout.splitlines()} == {fleet.agent.device}


def test_signed_group_push_activates(fleet: Fleet) -> None:
    """`edgecv push --group`: members from the retained status (plus announce), one copy on the group topic,
    chunks with payload-header checksums (no MQTT 5 user properties), verified signature, hot swap."""
    wait_online(fleet)
    res = fleet.target.cli("push", str(fleet.bundles["2.0"]), "--group", GROUP, "--timeout", "60", "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr + fleet.agent.log()[-2000:]
    line = next(line for line in res.stdout.splitlines() if line.startswith(fleet.agent.device))
    assert " active " in f" {line} " and "2.0" in line
    topics = fleet.agent.topics
    sub = fleet.target.client(topics.predictions, topics.model_state)
    try:
        msgs = collect(sub, lambda m: sum(p["model"]["version"] == "2.0" for p in docs_of(m, topics.predictions)) >= 3,
                       30, fleet.agent)
    finally:
        sub.close()
    assert all(p["top"][0]["index"] == 2 for p in docs_of(msgs, topics.predictions)
               if p["model"]["version"] == "2.0")  # the pushed model classifies
    state = docs_of(msgs, topics.model_state, True)[-1]  # retained: delivered at subscription
    assert state["state"] == "active" and state["version"] == "2.0"


def test_kill_9_fires_the_last_will_and_a_restart_comes_back_online(fleet: Fleet) -> None:
    wait_online(fleet)
    topics = fleet.agent.topics
    sub = fleet.target.client(topics.status)
    try:
        collect(sub, lambda m: bool(docs_of(m, topics.status)), 15, fleet.agent)  # the retained online
        fleet.agent.kill()
        msgs = collect(sub, lambda m: any(d["state"] == "offline" for d in docs_of(m, topics.status)), 20,
                       fleet.agent)
        will = next(d for d in docs_of(msgs, topics.status) if d["state"] == "offline")
        assert will["device"] == fleet.agent.device and will["model"]["name"] == "tiny"
        late = fleet.target.client(topics.status)  # and `offline` is what a late subscriber gets
        try:
            assert decode(late.wait_for(lambda m: m.retain, 10).payload)["state"] == "offline"
        finally:
            late.close()
        fleet.agent.restart()
        collect(sub, lambda m: any(d["state"] == "online" for d in docs_of(m, topics.status)), 30, fleet.agent)
    finally:
        sub.close()
    assert wait_until(fleet.agent.alive, 1)


def test_message_expiry_is_set_on_mqtt5_and_degrades_to_a_warning_on_311(fleet: Fleet) -> None:
    """publish.expiry_s is MQTT 5's Message Expiry Interval. On MQTT 5 predictions carry it; on 3.1.1 the agent
    still publishes (the checks above) and says once per process that the setting has no effect, and
    `check-config` says so too."""
    wait_online(fleet)
    warning = f"publish.expiry_s = {EXPIRY_S} has no effect"
    on_311 = fleet.target.protocol == "3.1.1"
    assert (warning in fleet.agent.log()) == on_311, fleet.agent.log()[-2000:]
    assert fleet.agent.log().count(warning) <= 2  # once per process (the Last Will check restarts it once)
    check = subprocess.run([*agent_command(), "check-config", str(fleet.agent.config_path)], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert ("ignored: MQTT 3.1.1 has no message expiry" in check.stdout) == on_311
    if not on_311:
        assert 0 < prediction_expiry(fleet) <= EXPIRY_S


def prediction_expiry(fleet: Fleet) -> int:
    """The Message Expiry Interval of the next prediction, as an MQTT 5 subscriber receives it."""
    import queue

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

    got: queue.Queue[int] = queue.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(fleet.agent.topics.predictions, qos=1)
    client.on_message = lambda c, u, m: got.put(int(getattr(m.properties, "MessageExpiryInterval", 0)))
    client.connect(fleet.target.broker.host, fleet.target.broker.port)
    client.loop_start()
    try:
        return got.get(timeout=15)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.fixture(scope="module")
def nats_only(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsBroker]:
    require_nats()
    broker = NatsBroker(tmp_path_factory.mktemp("nats-only")).start()
    yield broker
    broker.stop()


def test_mqtt5_clients_of_a_311_only_broker_fail_with_the_reason(nats_only: NatsBroker, tmp_path: Path,
                                                                 fashion_bundle: Path) -> None:
    """NATS speaks MQTT 3.1.1 only: the tools (default MQTT 5) exit with one line naming the protocol version,
    and an agent left at MQTT 5 logs the refusal with its reason instead of claiming to be connected."""
    res = subprocess.run([*edgecv_command(), "devices", "--broker", nats_only.address, "--wait", "0.5"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("edgecv: error:")]
    assert len(errors) == 1 and "protocol" in errors[0].lower(), res.stderr
    assert errors[0].endswith("add --protocol 3.1.1") and "password" not in errors[0], errors[0]  # the way out
    launcher = AgentLauncher(tmp_path, fashion_bundle)
    try:
        agent = launcher.start(broker=nats_only)
        assert wait_until(lambda: "broker refused the connection" in agent.log(), 30), agent.log()
        assert "protocol version" in agent.log().lower() and agent.alive()
        assert 'set broker.protocol = "3.1.1"' in agent.log()
        assert "Connected to MQTT broker" not in agent.log()
    finally:
        launcher.close()


def test_refused_subscriptions_are_asked_for_again_and_reported(nats_only: NatsBroker, tmp_path: Path) -> None:
    """A SUBACK failure code is never taken for a subscription. NATS refuses QoS 1 subscriptions when creating their
    JetStream consumer times out (seen on a busy three-node cluster), and always refuses its internal `$MQTT/sub/`
    topics, which make the refusal reproducible: the tools' client asks three times, then fails naming the filter;
    the agent's link logs it, asks again with backoff, and its other subscriptions keep working."""
    from edgecv.agent.config import parse_config
    from edgecv.agent.contract.topics import DeviceTopics
    from edgecv.agent.link.mqtt import MqttLink
    from edgecv.agent.link.outbox import Outbox
    from edgecv.tools.errors import FleetError

    tool = MqttClient(ClientOptions(host=nats_only.host, port=nats_only.port, protocol="3.1.1")).connect()
    try:
        with pytest.raises(FleetError, match=r"refused the subscription to \$MQTT/sub/x .* 3 times"):
            tool.subscribe("$MQTT/sub/x")
        tool.subscribe("edgecv/ok/cmd/+")  # the connection is still usable
    finally:
        tool.close()

    cfg = parse_config({"device_id": "suback", "broker": {"port": nats_only.port, "protocol": "3.1.1",
                                                         "reconnect_min_s": 0.1, "reconnect_max_s": 1.0}})
    link = MqttLink(cfg.broker, DeviceTopics("edgecv", "suback"), will=b"offline", outbox=Outbox(100))
    got: list[str] = []
    link.subscribe("$MQTT/sub/x", lambda topic, payload: None)
    link.subscribe("edgecv/suback/cmd/+", lambda topic, payload: got.append(topic))
    link.start()
    try:
        link.wait_connected(30)
        assert wait_until(lambda: link.suback_refusals >= 2, 15)  # refused, asked again after 1 s, refused again
        assert link.connects == 1  # without dropping the connection
        with MqttClient(ClientOptions(host=nats_only.host, port=nats_only.port, protocol="3.1.1")) as ws:
            assert wait_until(lambda: ws.publish("edgecv/suback/cmd/ping", b"{}") is None and bool(got), 10)
    finally:
        link.stop()
    assert got[0] == "edgecv/suback/cmd/ping"


def test_nats_dropping_a_device_id_with_a_dot_is_explained(nats_only: NatsBroker, tmp_path: Path,
                                                           fashion_bundle: Path) -> None:
    """NATS's MQTT gateway closes the connection of a client whose topics contain '.' (its own subject separator),
    before any CONNACK: the agent keeps retrying and says why, instead of only logging reconnects."""
    launcher = AgentLauncher(tmp_path, fashion_bundle)
    try:
        agent = launcher.start({"device_id": "pi.kitchen", "broker": {"protocol": "3.1.1"}}, broker=nats_only)
        assert wait_until(lambda: "closed the connection without accepting it" in agent.log(), 30), agent.log()
        assert "NATS refuses topics containing '.'" in agent.log() and agent.alive()
    finally:
        launcher.close()
