"""A tiny MQTT 5 test client that exposes what ACL tests need: PUBACK and SUBACK reason codes, retain flags."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion


@dataclass
class Msg:
    topic: str
    payload: bytes
    retain: bool


class Probe:
    """Connects (optionally with username/password and TLS), records messages and acknowledgement codes."""

    def __init__(self, port: int, *, username: str | None = None, password: str | None = None,
                 host: str = "127.0.0.1", ca_file: str | None = None, client_id: str | None = None) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        if username:
            self.client.username_pw_set(username, password)
        if ca_file:
            self.client.tls_set(ca_certs=ca_file)
        self.messages: queue.Queue[Msg] = queue.Queue()
        self._connack: Any = None
        self._connected = threading.Event()
        self._acks: dict[int, Any] = {}
        self._cond = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.put(Msg(m.topic, bytes(m.payload), bool(m.retain)))
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_suback
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("no CONNACK")
        if self._connack.is_failure:
            self.close()
            raise PermissionError(f"connection refused: {self._connack}")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        self._connack = reason
        self._connected.set()

    def _on_ack(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._cond:
            self._acks[mid] = reason
            self._cond.notify_all()

    def _on_suback(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        with self._cond:
            self._acks[mid] = list(reasons)
            self._cond.notify_all()

    def _wait(self, mid: int) -> Any:
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._acks, 10):
                raise TimeoutError(f"no acknowledgement for mid {mid}")
            return self._acks.pop(mid)

    def publish(self, topic: str, payload: bytes | str = b"x", retain: bool = False) -> bool:
        """QoS 1 publish; True when the broker accepted it (MQTT 5 PUBACK reason code < 0x80)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return not self._wait(info.mid).is_failure

    def subscribe(self, filter: str) -> bool:
        """True when the broker granted the subscription (SUBACK reason code < 0x80)."""
        _, mid = self.client.subscribe(filter, qos=1)
        return not self._wait(int(mid or 0))[0].is_failure

    def collect(self, timeout: float, n: int | None = None) -> list[Msg]:
        """Messages arriving within `timeout` (returns early once `n` arrived)."""
        out: list[Msg] = []
        deadline = time.monotonic() + timeout
        while (n is None or len(out) < n) and (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.messages.get(timeout=left))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
