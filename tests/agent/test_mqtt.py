"""MqttLink against a real Mosquitto: online/stopped status, order, refused CONNACK, broker restart, resubscribe."""

from __future__ import annotations

import getpass
import json
import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes

from edgecv.agent.config import BrokerConfig
from edgecv.agent.contract.topics import (
    DeviceTopics,
    PredictionEncoder,
    decode,
    decode_predictions,
    encode,
    status_payload,
)
from edgecv.agent.errors import MqttError
from edgecv.agent.link.mqtt import Backoff, MqttLink
from edgecv.agent.link.outbox import Outbox
from edgecv.agent.link.predictions import PredictionStream
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received
from tests.broker import Broker
from tests.e2e.conftest import durable_subscriber, persistent_broker, wait_for_autosave


def _link(broker: Broker, device: str, *, protocol: str = "5", outbox: Outbox | None = None,
          batches: dict[str, int] | None = None, feed: Callable[[], object] | None = None,
          **broker_kw: object) -> MqttLink:
    cfg = BrokerConfig(host=broker.host, port=broker.port, protocol=protocol, reconnect_min_s=0.05,
                       reconnect_max_s=0.3, **broker_kw)  # type: ignore[arg-type]
    topics = DeviceTopics("edgecv", device)
    will = encode(status_payload(device, "offline", "test", None))
    return MqttLink(cfg, topics, will=will, outbox=outbox if outbox is not None else Outbox(1000), batches=batches,
                    online=lambda: encode(status_payload(device, "online", "test", {"name": "m"})), feed=feed)


def _sub(broker: Broker, flt: str) -> MqttClient:
    client = MqttClient(ClientOptions(host=broker.host, port=broker.port)).connect()
    client.subscribe(flt)
    return client


def _collect(client: MqttClient, n: int, timeout: float) -> list[Received]:
    out: list[Received] = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        msg = client.get(deadline - time.monotonic())
        if msg is not None:
            out.append(msg)
    return out


def test_online_in_order_then_stopped_without_will(shared_broker: Broker) -> None:
    sub = _sub(shared_broker, "edgecv/dev-a/#")
    link = _link(shared_broker, "dev-a").start()
    try:
        link.wait_connected(10)
        for i in range(200):
            link.publish("edgecv/dev-a/predictions", json.dumps({"seq": i}).encode(), qos=1)
        msgs = _collect(sub, 201, 10)
        status = [decode(m.payload) for m in msgs if m.topic.endswith("/status")]
        preds = [decode(m.payload)["seq"] for m in msgs if m.topic.endswith("/predictions")]
        assert status and status[0]["state"] == "online"
        assert preds == list(range(200))
        assert link.outbox.wait_empty(5) and link.outbox.delivered == 200
    finally:
        link.stop(encode(status_payload("dev-a", "stopped", "test", None)))
    # The retained status is `stopped`; a Will (`offline`) would have replaced it after the disconnect.
    time.sleep(0.3)
    late = MqttClient(ClientOptions(host=shared_broker.host, port=shared_broker.port)).connect()
    late.subscribe("edgecv/dev-a/status")
    retained = late.wait_for(lambda m: m.retain, 5)
    assert decode(retained.payload)["state"] == "stopped"
    assert late.get(0.5) is None  # and nothing else (no Will) arrived
    late.close()
    sub.close()



def test_both_ends_of_a_request_send_small_packets_at_once(shared_broker: Broker) -> None:
    """Nagle's algorithm is off on the device's link and on the workstation's client (and `set_tcp_nodelay` in
    every broker config edgecv writes): with it on, a command's result waited ~40 ms for a delayed ACK, so every
    request/reply exchange (a ping, each chunk of `edgecv collect`) took 45-100 ms on loopback."""
    import socket

    link = _link(shared_broker, "dev-nodelay").start()
    client = MqttClient(ClientOptions(host=shared_broker.host, port=shared_broker.port)).connect()
    try:
        link.wait_connected(10)
        for sock in (link._client.socket(), client._client.socket()):
            assert isinstance(sock, socket.socket) and sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.close()
        link.stop(encode(status_payload("dev-nodelay", "stopped", "test", None)))
    conf = (Path(__file__).resolve().parents[2] / "systemd" / "mosquitto" / "edgecv.conf").read_text()
    assert "\nset_tcp_nodelay true\n" in conf

@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_batched_topic_arrives_as_json_arrays_in_order(shared_broker: Broker, protocol: str) -> None:
    """With batches={predictions: 25} every predictions publish is a JSON array of at most 25 payloads, in
    order, none lost or repeated; other topics keep one payload per message."""
    device = f"dev-batch-{protocol.replace('.', '')}"
    topic = f"edgecv/{device}/predictions"
    sub = _sub(shared_broker, f"edgecv/{device}/#")
    link = _link(shared_broker, device, protocol=protocol, batches={topic: 25}, outbox=Outbox(5000)).start()
    try:
        link.wait_connected(10)
        for i in range(1000):  # far faster than one publish per message could go: runs of up to 25 form
            link.publish(topic, json.dumps({"seq": i}).encode(), qos=1)
        link.publish(f"edgecv/{device}/health", b'{"h":1}', qos=0)
        assert link.outbox.wait_empty(10), (link.outbox.delivered, link.outbox.dropped, len(link.outbox))
        assert (link.outbox.delivered, link.outbox.dropped) == (1001, 0)
        msgs = _collect(sub, 1000, 10)
        arrays = [json.loads(m.payload) for m in msgs if m.topic == topic]
        health = [m.payload for m in msgs if m.topic.endswith("/health")]
        assert all(isinstance(a, list) and 1 <= len(a) <= 25 for a in arrays)
        assert [d["seq"] for a in arrays for d in a] == list(range(1000))
        assert len(arrays) < 1000 / 2  # they were really batched
        assert health == [b'{"h":1}']
    finally:
        link.stop(None)
        sub.close()


def test_the_sender_publishes_what_camera_loops_staged(shared_broker: Broker) -> None:
    """Predictions staged in a PredictionStream (never put into the outbox by the caller) are encoded and sent by
    the link's sender through its `feed` hook, in order, as JSON arrays on the batched topic."""
    device = "dev-feed"
    topic = f"edgecv/{device}/predictions"
    sub = _sub(shared_broker, topic)
    outbox = Outbox(5000)
    stream = PredictionStream(outbox, topic, qos=1)
    link = _link(shared_broker, device, batches={topic: 50}, outbox=outbox, feed=stream.drain).start()
    enc = PredictionEncoder(boot="b", device=device, camera="cam0", model_name="m", model_version="1",
                            labels=("a", "b"))
    try:
        link.wait_connected(10)
        for i in range(500):
            stream.stage(enc, 1000.0 + i, 999.0 + i, [{"label": "b", "index": 1, "score": 0.75}],
                         {"infer": 0.1, "total": 0.2}, None)
        msgs: list[Received] = []
        docs: list[dict[str, object]] = []
        deadline = time.monotonic() + 10
        while len(docs) < 500 and (msg := sub.get(max(0.0, deadline - time.monotonic()))) is not None:
            msgs.append(msg)
            docs += decode_predictions(msg.payload)
        assert [d["seq"] for d in docs] == list(range(500))
        assert all(d["top"] == [{"index": 1, "label": "b", "score": 0.75}] for d in docs)
        assert len(msgs) < 500  # batched
        assert outbox.wait_empty(5) and len(stream) == 0
    finally:
        link.stop(None)
        sub.close()


def test_refused_connack_is_a_clear_failure(tmp_path: Path) -> None:
    pwfile = tmp_path / "passwd"
    pwfile.write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "agent", "s3cret"], check=True)
    pwfile.chmod(0o600)
    # `user`: a root-started mosquitto would otherwise switch to user mosquitto, who cannot read tmp_path.
    broker = Broker(tmp_path, extra_conf=f"allow_anonymous false\npassword_file {pwfile}\n"
                                         f"user {getpass.getuser()}\n").start()
    try:
        anon = _link(broker, "dev-auth").start()
        try:
            with pytest.raises(MqttError, match="refused the connection: Not authorized"):
                anon.wait_connected(2)
            assert not anon.connected.is_set() and anon.refused >= 1 and anon.connects == 0
        finally:
            anon.stop(None, flush_timeout=0)
        bad = _link(broker, "dev-auth", username="agent", password_env="EDGECV_TEST_BAD_PW")
        os.environ["EDGECV_TEST_BAD_PW"] = "wrong"
        os.environ["EDGECV_TEST_GOOD_PW"] = "s3cret"
        bad.start()
        try:
            with pytest.raises(MqttError, match=r"(Bad user name or password|Not authorized)"):
                bad.wait_connected(2)
        finally:
            bad.stop(None, flush_timeout=0)
        good = _link(broker, "dev-auth", protocol="3.1.1", username="agent",
                     password_env="EDGECV_TEST_GOOD_PW").start()
        try:
            good.wait_connected(10)
            assert good.connects == 1
        finally:
            good.stop(None)
    finally:
        broker.stop()


@pytest.mark.parametrize("batch", [1, 8])
def test_broker_restart_reconnects_republishes_online_and_delivers_buffered(tmp_path: Path, batch: int) -> None:
    broker = persistent_broker(tmp_path).start()
    sub = durable_subscriber(broker, ["edgecv/dev-r/predictions"], "sub-r")
    subscribed = time.time()
    link = _link(broker, "dev-r", batches={"edgecv/dev-r/predictions": batch})
    got: list[str] = []
    link.subscribe("edgecv/dev-r/cmd/+", lambda topic, payload: got.append(payload.decode()))
    reconnects = threading.Event()
    link.add_on_connect(lambda: reconnects.set() if link.connects >= 2 else None)
    link.start()
    try:
        link.wait_connected(10)
        wait_for_autosave(tmp_path, subscribed)  # the subscriber's session survives the kill
        broker.stop(kill=True)
        sub.close()
        deadline = time.monotonic() + 5
        while link.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not link.connected.is_set()
        for i in range(50):  # buffered while the broker is down
            link.publish("edgecv/dev-r/predictions", str(i).encode(), qos=1)
        assert len(link.outbox) == 50
        restarted = time.time()
        broker.start()
        assert reconnects.wait(15), "on-connect callbacks did not run after the reconnect"
        assert link.outbox.wait_empty(10), "buffered messages were not acknowledged after the reconnect"
        sub = durable_subscriber(broker, ["edgecv/dev-r/predictions"], "sub-r")
        values = []
        while len(values) < 50 and (msg := sub.get(10)) is not None:
            doc = json.loads(msg.payload)
            assert isinstance(doc, list) == (batch > 1) and (batch == 1 or len(doc) <= batch)
            values += doc if isinstance(doc, list) else [doc]
        assert values == list(range(50))
        # online is re-published after the reconnect (retained: the restarted broker had lost it)
        late = _sub(broker, "edgecv/dev-r/status")
        status = decode(late.wait_for(lambda m: m.retain, 5).payload)
        assert status["state"] == "online" and status["ts"] >= restarted - 0.01
        # and subscriptions are renewed
        late.publish("edgecv/dev-r/cmd/ping", b"hello")
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got == ["hello"]
        late.close()
        sub.close()
    finally:
        link.stop(None)
        broker.stop()


def test_will_is_sent_when_connection_dies(broker: Broker) -> None:
    link = _link(broker, "dev-w")
    link.cfg = BrokerConfig(host=broker.host, port=broker.port, keepalive=5, reconnect_min_s=0.05)
    link.start()
    sub = _sub(broker, "edgecv/dev-w/status")
    try:
        link.wait_connected(10)
        assert decode(sub.wait_for(lambda m: True, 5).payload)["state"] == "online"
        # Sever the TCP connection under the link without a DISCONNECT packet: the broker sends the Will.
        client = link._client
        assert client is not None
        sock = client.socket()
        assert sock is not None
        link._stop.set()  # keep the link from reconnecting and overwriting the Will with `online`
        sock.close()
        will = sub.wait_for(lambda m: decode(m.payload)["state"] == "offline", 10)
        assert will.topic == "edgecv/dev-w/status"
    finally:
        sub.close()


def test_expiry_property_is_set_on_mqtt5(shared_broker: Broker) -> None:
    sub = _sub(shared_broker, "edgecv/dev-x/predictions")
    got: list[object] = []
    sub.paho.on_message = lambda c, u, m: got.append(getattr(m.properties, "MessageExpiryInterval", None))
    link = _link(shared_broker, "dev-x").start()
    try:
        link.wait_connected(10)
        link.publish("edgecv/dev-x/predictions", b"{}", qos=1, expiry_s=30)
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.02)
        assert got and isinstance(got[0], int) and 0 < got[0] <= 30
    finally:
        link.stop(None)
        sub.close()
    assert PacketTypes.PUBLISH  # the property belongs to PUBLISH packets


def test_backoff_is_exponential_with_full_jitter() -> None:
    import random

    b = Backoff(0.5, 30, rng=random.Random(1))
    delays = [b.next_delay() for _ in range(12)]
    assert all(0.5 <= d <= 30 for d in delays)
    assert max(delays[:2]) <= 1.0  # attempt 0 and 1: ceilings 0.5 and 1.0
    assert len({round(d, 6) for d in delays[4:]}) == len(delays[4:])  # jitter: no two equal
    b.reset()
    assert b.next_delay() == 0.5


def _make_pki(tmp: Path, server_name: str) -> dict[str, Path]:
    """A CA, a server certificate for `server_name` (SAN) and a client certificate, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
             signer: ec.EllipticCurvePrivateKey, ca: bool, san: x509.GeneralName | None = None) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    import ipaddress

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = cert("edgecv test CA", ca_key, None, ca_key, True)
    files: dict[str, Path] = {}
    san: x509.GeneralName
    try:
        san = x509.IPAddress(ipaddress.ip_address(server_name))
    except ValueError:
        san = x509.DNSName(server_name)
    for role, subject, extra in (("server", server_name, san), ("client", "edgecv-agent", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        crt = cert(subject, key, ca.subject, ca_key, False, extra)
        files[f"{role}_key"] = tmp / f"{role}.key"
        files[f"{role}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
        files[f"{role}_crt"] = tmp / f"{role}.crt"
        files[f"{role}_crt"].write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    files["ca"] = tmp / "ca.crt"
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return files


def _tls_broker(tmp: Path, server_name: str) -> tuple[Broker, dict[str, Path]]:
    pki = _make_pki(tmp, server_name)
    broker = Broker(tmp)
    # Replace the plain listener with a TLS one that requires a client certificate signed by our CA.
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                           f"cafile {pki['ca']}\ncertfile {pki['server_crt']}\nkeyfile {pki['server_key']}\n"
                           f"require_certificate true\nuser {getpass.getuser()}\n")
    return broker.start(), pki


def _tls_link(broker: Broker, pki: dict[str, Path], *, insecure: bool = False, client_cert: bool = True) -> MqttLink:
    from edgecv.agent.config import TlsConfig

    tls = TlsConfig(enabled=True, ca_file=str(pki["ca"]), insecure=insecure,
                    cert_file=str(pki["client_crt"]) if client_cert else "",
                    key_file=str(pki["client_key"]) if client_cert else "")
    return _link(broker, "dev-tls", tls=tls)


def test_tls_with_ca_and_client_certificate(tmp_path: Path) -> None:
    broker, pki = _tls_broker(tmp_path, "127.0.0.1")
    try:
        link = _tls_link(broker, pki).start()
        try:
            link.wait_connected(10)
            link.publish("edgecv/dev-tls/predictions", b"{}", qos=1)
            assert link.outbox.wait_empty(5)
        finally:
            link.stop(None)
        no_cert = _tls_link(broker, pki, client_cert=False).start()
        try:  # the broker requires a client certificate: never connected
            with pytest.raises(MqttError):
                no_cert.wait_connected(2)
        finally:
            no_cert.stop(None, flush_timeout=0)
    finally:
        broker.stop()


def test_tls_hostname_check_and_insecure_switch(tmp_path: Path) -> None:
    broker, pki = _tls_broker(tmp_path, "broker.example")  # certificate name does not match 127.0.0.1
    try:
        strict = _tls_link(broker, pki).start()
        try:
            with pytest.raises(MqttError, match=r"(?i)certificate|hostname|mismatch"):
                strict.wait_connected(3)
        finally:
            strict.stop(None, flush_timeout=0)
        relaxed = _tls_link(broker, pki, insecure=True).start()
        try:
            relaxed.wait_connected(10)
        finally:
            relaxed.stop(None)
    finally:
        broker.stop()
