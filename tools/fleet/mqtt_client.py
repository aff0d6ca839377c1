"""A small blocking MQTT client for the workstation tools (watch, push, devices, cmd) and tests.

It wraps paho-mqtt 2.x: connect with options (MQTT 5 or 3.1.1, TLS, username/password), subscribe to filters
whose messages land in a queue (or go to a callback), publish and wait for the acknowledgement, and wait for
a message matching a predicate. A refused CONNACK or an unreachable broker raises FleetError with the reason, and
so do a subscription the broker refuses three times and a publish it refuses (MQTT 5 PUBACK reason codes).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.client import MQTTMessage
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgecv.agent.link.mqtt import send_without_delay
from edgecv.tools.errors import FleetError

log = logging.getLogger(__name__)

DEFAULT_BROKER = "127.0.0.1:1883"
SUBSCRIBE_ATTEMPTS = 3  # a refused subscription is asked for again this many times in all
CONNECT_ATTEMPTS = 3  # connections refused for a reason that may pass are tried this many times in all
# CONNACK reason codes worth another try: unspecified error, server unavailable, server busy (3.1.1's "server
# unavailable" arrives as 136 too), and a connection closed before any CONNACK
DROPPED_BEFORE_CONNACK = -1  # the broker closed the connection without answering the CONNECT
TRANSIENT_REFUSALS = frozenset({128, 136, 137, DROPPED_BEFORE_CONNACK})
UNSUPPORTED_PROTOCOL_VERSION = 132  # CONNACK of a broker that does not speak the requested version (3.1.1's code 1)


def parse_address(address: str, default_port: int = 1883) -> tuple[str, int]:
    """'host', 'host:port' or '[v6]:port' → (host, port)."""
    address = address.strip()
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.lstrip(":") or str(default_port)
    elif address.count(":") == 1:
        host, _, port = address.partition(":")
    else:
        host, port = address, str(default_port)
    try:
        port_num = int(port)
    except ValueError:
        raise FleetError(f"Broker address {address!r} has a bad port; use host:port, e.g. 127.0.0.1:1883") from None
    if not host or not 1 <= port_num <= 65535:
        raise FleetError(f"Broker address {address!r} is not host:port; use e.g. 127.0.0.1:1883")
    return host, port_num


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool = False
    qos: int = 0
    ts: float = field(default_factory=time.time)

    def json(self) -> dict[str, Any]:
        doc = json.loads(self.payload)
        if not isinstance(doc, dict):
            raise ValueError(f"payload on {self.topic} is not a JSON object")
        return doc


@dataclass(frozen=True)
class ClientOptions:
    """Everything needed to reach a broker; `edgecv` commands fill it from --broker/--username/… flags."""

    host: str = "127.0.0.1"
    port: int = 1883
    protocol: str = "5"
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    keepalive: int = 30
    client_id: str | None = None
    clean_start: bool = True  # False + a fixed client_id: the broker keeps the session (and queues QoS>=1)
    session_expiry_s: int = 0  # MQTT 5: how long the broker keeps a non-clean session after a disconnect

    @classmethod
    def from_address(cls, address: str | None, **kwargs: Any) -> ClientOptions:
        host, port = parse_address(address or DEFAULT_BROKER)
        return cls(host=host, port=port, **kwargs)


class MqttClient:
    """Blocking convenience client; use as a context manager (`with MqttClient(opts) as c: ...`)."""

    def __init__(self, options: ClientOptions | None = None, **kwargs: Any) -> None:
        self.options = options or ClientOptions(**kwargs)
        self.messages: queue.Queue[Received] = queue.Queue()
        self._connected = threading.Event()
        self._done = threading.Event()
        self._error: str | None = None
        self._refusal: int | None = None  # the reason code of a refused CONNACK
        self._callbacks: list[tuple[str, Callable[[Received], None]]] = []
        self._lock = threading.Lock()
        self._suback = threading.Condition()
        self._subacked: set[int] = set()
        self._refused: dict[int, str] = {}  # SUBACK failure reason by message id
        self._pub_refused: dict[int, str] = {}  # PUBACK failure reason by message id (MQTT 5)
        opts = self.options
        client_id = opts.client_id or f"edgecv-tool-{uuid.uuid4().hex[:8]}"
        v5 = opts.protocol != "3.1.1"
        self._v5 = v5
        if v5:
            self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                       protocol=MQTTProtocolVersion.MQTTv5, reconnect_on_failure=False)
        else:
            self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                       clean_session=opts.clean_start, protocol=MQTTProtocolVersion.MQTTv311,
                                       reconnect_on_failure=False)
        if opts.username:
            self._client.username_pw_set(opts.username, opts.password)
        if opts.tls or opts.ca_file or opts.cert_file:
            self._client.tls_set(ca_certs=opts.ca_file or None, certfile=opts.cert_file or None,
                                 keyfile=opts.key_file or None)
            if opts.insecure:
                self._client.tls_insecure_set(True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_publish = self._on_publish

    @property
    def paho(self) -> paho.Client:
        """The underlying paho client, for what this wrapper does not cover."""
        return self._client

    def connect(self, timeout: float = 10.0) -> MqttClient:
        """Connect and wait for the CONNACK. A refusal that may pass (server unavailable or busy, unspecified error)
        is tried again while `timeout` lasts, up to CONNECT_ATTEMPTS in all: NATS's MQTT gateway refuses
        connections for a few seconds when its JetStream lookups time out on a busy cluster."""
        deadline = time.monotonic() + timeout
        for attempt in range(1, CONNECT_ATTEMPTS + 1):
            try:
                return self._connect_once(max(0.5, deadline - time.monotonic()))
            except FleetError:
                transient = self._refusal in TRANSIENT_REFUSALS
                if not transient or attempt == CONNECT_ATTEMPTS or time.monotonic() + attempt > deadline:
                    raise
                log.debug("MQTT broker refused the connection (%s); trying again", self._error)
                time.sleep(0.5 * attempt)
        raise AssertionError("unreachable")

    def _connect_once(self, timeout: float) -> MqttClient:
        opts = self.options
        self._error, self._refusal = None, None
        self._done.clear()
        try:
            if self._v5:
                props = None
                if opts.session_expiry_s:
                    props = Properties(PacketTypes.CONNECT)
                    props.SessionExpiryInterval = opts.session_expiry_s
                self._client.connect(opts.host, opts.port, keepalive=opts.keepalive, clean_start=opts.clean_start,
                                     properties=props)
            else:
                self._client.connect(opts.host, opts.port, keepalive=opts.keepalive)
        except (OSError, ValueError) as exc:
            raise FleetError(f"Cannot reach the MQTT broker at {opts.host}:{opts.port} ({exc}); check --broker "
                             "and that the broker is running") from exc
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.wait(0.05):
            if self._done.is_set() or time.monotonic() > deadline:
                self._client.loop_stop()
                reason = self._error or f"no answer within {timeout:g} s"
                if self._refusal == UNSUPPORTED_PROTOCOL_VERSION and self._v5:
                    advice = "this broker does not speak MQTT 5 (NATS speaks 3.1.1): add --protocol 3.1.1"
                else:
                    advice = "check the address, --username/--password and TLS options"
                raise FleetError(f"MQTT broker {opts.host}:{opts.port} refused or dropped the connection: {reason}; "
                                 f"{advice}")
        return self

    def __enter__(self) -> MqttClient:
        return self.connect() if not self._connected.is_set() else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def subscribe(self, filter: str, qos: int = 1, callback: Callable[[Received], None] | None = None,
                  timeout: float = 10.0) -> None:
        """Subscribe and wait for the SUBACK; messages go to `callback` or to `self.messages`."""
        if callback is not None:
            with self._lock:
                self._callbacks.append((filter, callback))
        for attempt in range(SUBSCRIBE_ATTEMPTS):
            rc, mid = self._client.subscribe(filter, qos=qos)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise FleetError(f"Subscribing to {filter} failed: {paho.error_string(rc)}")
            refused = self._wait_mid(int(mid or 0), timeout)
            if refused is None:
                return
            # A refusal may be transient (NATS's MQTT gateway refuses a QoS 1 subscription when creating its
            # JetStream consumer times out on a busy cluster): ask again before giving up.
            log.debug("Subscription to %s refused (%s), attempt %d", filter, refused, attempt + 1)
            time.sleep(0.5 * (attempt + 1))
        raise FleetError(f"The MQTT broker refused the subscription to {filter} ({refused}) {SUBSCRIBE_ATTEMPTS} "
                         "times; check the broker's log and its access rules for this user")

    def _wait_mid(self, mid: int, timeout: float) -> str | None:
        """Wait for the SUBACK of `mid`; returns the failure reason it carried, or None when granted."""
        with self._suback:
            if not self._suback.wait_for(lambda: mid in self._subacked, timeout):
                raise FleetError(f"The broker did not acknowledge a subscription within {timeout:g} s")
            self._subacked.discard(mid)
            return self._refused.pop(mid, None)

    def publish(self, topic: str, payload: bytes | str | dict[str, Any], qos: int = 1, retain: bool = False,
                timeout: float = 10.0, wait: bool = True) -> None:
        if isinstance(payload, dict):
            payload = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise FleetError(f"Publishing to {topic} failed: {paho.error_string(info.rc)}")
        if wait and qos > 0:
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError) as exc:
                raise FleetError(f"Publishing to {topic} failed: {exc}") from exc
            if not info.is_published():
                raise FleetError(f"The broker did not acknowledge a publish to {topic} within {timeout:g} s")
            with self._suback:
                refused = self._pub_refused.pop(info.mid, None)
            if refused is not None:  # MQTT 5 only: a 3.1.1 PUBACK carries no reason
                raise FleetError(f"The MQTT broker refused the publish to {topic} ({refused}); check its access "
                                 "rules for this user")

    def get(self, timeout: float) -> Received | None:
        try:
            return self.messages.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def iter_messages(self, timeout: float | None = None, idle_timeout: float | None = None) -> Iterator[Received]:
        """Yield queued messages until `timeout` (total) or `idle_timeout` (since the last one) passes."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = 0.2
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return
            if idle_timeout is not None:
                wait = min(wait, idle_timeout)
            msg = self.get(wait)
            if msg is not None:
                yield msg
            elif idle_timeout is not None and wait == idle_timeout:
                return

    def wait_for(self, predicate: Callable[[Received], bool], timeout: float) -> Received:
        """Return the first queued message satisfying `predicate` (others are discarded)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise FleetError(f"No matching MQTT message within {timeout:g} s")
            msg = self.get(min(left, 0.2))
            if msg is not None and predicate(msg):
                return msg

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def close(self) -> None:
        if self._connected.is_set():
            self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    # paho callbacks (network thread)
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._error = f"{reason.getName()} (reason code {reason.value})"
            self._refusal = int(reason.value)
            self._done.set()
            return
        send_without_delay(client)  # a request's reply must not wait ~40 ms behind our own PUBACK
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if getattr(reason, "is_failure", False) and self._error is None:
            self._error = str(reason)
        if not self._connected.is_set() and self._refusal is None:
            self._refusal = DROPPED_BEFORE_CONNACK
        self._connected.clear()
        self._done.set()

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        failed = [r for r in reasons or () if getattr(r, "is_failure", False)]
        with self._suback:
            if failed:
                self._refused[mid] = f"{failed[0].getName()}, reason code {failed[0].value}"
            self._subacked.add(mid)
            self._suback.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        # Called before the publish counts as acknowledged: `publish` reads the outcome of its own mid after that
        # (an entry left by an earlier use of the same mid is replaced or cleared here first).
        with self._suback:
            if getattr(reason, "is_failure", False):
                self._pub_refused[mid] = f"{reason.getName()}, reason code {reason.value}"
            else:
                self._pub_refused.pop(mid, None)

    def _on_message(self, client: Any, userdata: Any, message: MQTTMessage) -> None:
        msg = Received(message.topic, bytes(message.payload), bool(message.retain), int(message.qos))
        with self._lock:
            callbacks = [cb for flt, cb in self._callbacks if paho.topic_matches_sub(flt, message.topic)]
        if callbacks:
            for cb in callbacks:
                try:
                    cb(msg)
                except Exception:
                    log.exception("MQTT message callback failed")
        else:
            self.messages.put(msg)

