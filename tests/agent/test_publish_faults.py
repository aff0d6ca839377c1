"""Publishing can't die: MqttLink against a real Mosquitto with messages no broker accepts, a message paho raises
on, a message the broker drops the connection over (quarantined after a few tries instead of blocking the queue
for ever), a PUBACK failure, and a sender round that raises. After each, later messages still arrive in order and
the loss is counted (`Outbox.undeliverable`)."""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path

from edgecv.agent.config import BrokerConfig
from edgecv.agent.contract.topics import DeviceTopics, encode, status_payload
from edgecv.agent.link.memory import MemoryLink
from edgecv.agent.link.mqtt import QUARANTINE_AFTER, MqttLink
from edgecv.agent.link.outbox import Outbox
from edgecv.agent.link.protocol import MAX_PAYLOAD_BYTES, REFUSED, message_problem
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received
from tests.broker import Broker
from tests.waiting import wait_until


def _link(broker: Broker, device: str, **kw: object) -> MqttLink:
    cfg = BrokerConfig(host=broker.host, port=broker.port, reconnect_min_s=0.05, reconnect_max_s=0.3)
    will = encode(status_payload(device, "offline", "test", None))
    return MqttLink(cfg, DeviceTopics("edgecv", device), will=will, outbox=Outbox(1000), **kw)  # type: ignore[arg-type]


def _sub(broker: Broker, flt: str) -> MqttClient:
    client = MqttClient(ClientOptions(host=broker.host, port=broker.port)).connect()
    client.subscribe(flt)
    return client


def _values(sub: MqttClient, n: int, timeout: float) -> list[int]:
    """The first `n` distinct values received, in the order they first arrived (delivery is at-least-once: a
    message whose PUBACK was lost with the connection is sent again)."""
    out: dict[int, None] = {}
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        msg: Received | None = sub.get(deadline - time.monotonic())
        if msg is not None:
            out[json.loads(msg.payload)["n"]] = None
    return list(out)



BAD = [("edgecv/dev/+/ack", b"{}"), ("edgecv/dev/#", b"{}"), ("edgecv/dev/a\x00b/ack", b"{}"), ("", b"{}"),
       ("edgecv/dev/\ud800", b"{}"), ("edgecv/dev/\x1b[2J", b"{}"), ("x" * 70000, b"{}"),
       ("edgecv/dev/err", b"e" * (MAX_PAYLOAD_BYTES + 1)), ("edgecv/dev/err", "not bytes")]


def test_message_problem_names_what_no_broker_would_accept() -> None:
    for topic, payload in BAD:
        assert message_problem(topic, payload) is not None, topic[:40]
    assert message_problem("edgecv/dev-1/model/push/abc.1_2-3/ack", b"{}") is None
    assert message_problem("edgecv/dev/ünïcode", b"x" * MAX_PAYLOAD_BYTES) is None


def test_publish_refuses_unsendable_messages_and_publishing_goes_on(shared_broker: Broker) -> None:
    sub = _sub(shared_broker, "edgecv/dev-refuse/ok")
    link = _link(shared_broker, "dev-refuse").start()
    try:
        link.wait_connected(10)
        ids = []
        for i in range(10):
            ids.append(link.publish("edgecv/dev-refuse/ok", json.dumps({"n": i}).encode()))
            topic, payload = BAD[i % len(BAD)]
            assert link.publish(topic, payload) == REFUSED  # type: ignore[arg-type]
        assert REFUSED not in ids
        assert _values(sub, 10, 10) == list(range(10))
        assert link.outbox.undeliverable == 10
        assert all(t.is_alive() for t in link._threads)
    finally:
        link.stop(None)
        sub.close()
    mem = MemoryLink()  # the in-memory twin refuses the same messages
    assert mem.publish("edgecv/dev/+/ack", b"{}") == REFUSED and mem.published == [] and len(mem.refused) == 1


def test_a_message_paho_raises_on_is_dropped_and_the_sender_lives(shared_broker: Broker) -> None:
    """A message that got into the outbox without publish()'s check (the predictions path puts directly): paho
    raises on it in the sender thread. Before: the thread died and nothing was ever published again."""
    sub = _sub(shared_broker, "edgecv/dev-raise/ok")
    link = _link(shared_broker, "dev-raise").start()
    try:
        link.wait_connected(10)
        for i in range(6):
            if i == 3:
                link.outbox.put("edgecv/dev-raise/+/bad", b"{}")  # paho: ValueError (wildcard)
                link.outbox.put("edgecv/dev-raise/\udcff", b"{}")  # paho: UnicodeEncodeError
            link.outbox.put("edgecv/dev-raise/ok", json.dumps({"n": i}).encode())
        assert _values(sub, 6, 10) == list(range(6))
        assert link.outbox.undeliverable == 2 and link.outbox.wait_empty(5)
        sender = next(t for t in link._threads if t.name == "mqtt-sender")
        assert sender.is_alive()
    finally:
        link.stop(None)
        sub.close()


def test_a_message_the_broker_drops_the_connection_over_is_quarantined(tmp_path: Path) -> None:
    """A message the broker refuses by closing the connection (here: larger than its max_packet_size) used to be
    re-sent first after every reconnect, for ever, so nothing behind it was ever delivered. Now it is sent alone
    after the first loss, and given up on once the connection died with it alone in flight QUARANTINE_AFTER
    times; the messages before and after it all arrive, in order."""
    broker = Broker(tmp_path, extra_conf="max_packet_size 4096\n").start()
    sub = _sub(broker, "edgecv/dev-q/ok")
    link = _link(broker, "dev-q").start()
    try:
        link.wait_connected(10)
        for i in range(20):
            if i == 10:
                assert link.publish("edgecv/dev-q/big", b'{"n": -1, "pad": "' + b"x" * 20000 + b'"}') != REFUSED
            link.publish("edgecv/dev-q/ok", json.dumps({"n": i}).encode())
        got = _values(sub, 20, 60)
        assert got == list(range(20)), got
        assert link.outbox.undeliverable == 1 and link.outbox.wait_empty(5)
        # the first loss (everything in flight), then one per strike (a loaded machine may add a loss that finds
        # nothing in flight yet, which strikes nothing); none after the quarantine: it stopped the loop
        assert QUARANTINE_AFTER + 1 <= link.connects <= QUARANTINE_AFTER + 6, link.connects
        connects = link.connects
        link.publish("edgecv/dev-q/ok", b'{"n": 20}')
        assert _values(sub, 1, 10) == [20] and link.connects == connects
    finally:
        link.stop(None)
        sub.close()
        broker.stop()


def test_a_puback_failure_is_counted_and_publishing_goes_on(tmp_path: Path) -> None:
    """The broker answers a publish with a failure reason code (MQTT 5, here: not authorized by the ACL)."""
    acl = tmp_path / "acl"
    acl.write_text("topic write edgecv/dev-p/ok\ntopic read edgecv/#\n")
    broker = Broker(tmp_path, extra_conf=f"acl_file {acl}\nuser {getpass.getuser()}\n").start()
    sub = _sub(broker, "edgecv/dev-p/+")
    link = _link(broker, "dev-p").start()
    try:
        link.wait_connected(10)
        for i in range(5):
            link.publish("edgecv/dev-p/denied", b"{}")
            link.publish("edgecv/dev-p/ok", json.dumps({"n": i}).encode())
        assert _values(sub, 5, 10) == list(range(5))
        assert wait_until(lambda: link.outbox.undeliverable == 5, 5), link.outbox.undeliverable
        assert link.outbox.wait_empty(5) and link.outbox.delivered == 5
    finally:
        link.stop(None)
        sub.close()
        broker.stop()


def test_a_sender_round_that_raises_does_not_end_publishing(shared_broker: Broker) -> None:
    """A fault injected at the sender's outbox boundary (take_run raises once): logged, and the next round goes
    on; the message it was about to take is still delivered."""
    sub = _sub(shared_broker, "edgecv/dev-round/ok")
    link = _link(shared_broker, "dev-round")
    real = link.outbox.take_run
    calls = {"n": 0}

    def flaky(batches: dict[str, int]) -> list[object]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected fault in take_run")
        return real(batches)  # type: ignore[return-value]

    link.outbox.take_run = flaky  # type: ignore[method-assign, assignment]
    link.start()
    try:
        link.wait_connected(10)
        for i in range(3):
            link.publish("edgecv/dev-round/ok", json.dumps({"n": i}).encode())
        assert _values(sub, 3, 10) == [0, 1, 2]
        assert calls["n"] >= 2
    finally:
        link.stop(None)
        sub.close()


def test_a_command_result_too_large_to_publish_becomes_an_error_result() -> None:
    """A snapshot of a huge noisy frame: its JPEG in base64 is over the publish limit. The command still gets
    exactly one result, an error that says why, instead of none."""
    import numpy as np

    from edgecv.agent.commands import CommandHandler
    from edgecv.agent.vision.camera import Frame

    class Device:
        classifier = None
        last_top = None
        last_frame = Frame(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8), time.time(), 0)

    link = MemoryLink()
    handler = CommandHandler("dev", DeviceTopics("edgecv", "dev"), link, device=Device())  # type: ignore[arg-type]
    handler._execute("snapshot", {"id": "big"})
    results = [json.loads(m.payload) for m in link.messages("edgecv/dev/cmd/snapshot/result")]
    assert len(results) == 1 and results[0]["id"] == "big" and not results[0]["ok"]
    assert "too large to publish" in results[0]["error"] and len(link.refused) == 1
