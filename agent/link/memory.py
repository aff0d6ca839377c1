"""`MemoryLink`: the in-memory twin of the MQTT link, for unit tests of what sits above it.

It records every publish, hands messages to matching subscriptions like a broker would (including the agent's
own publishes, as a broker echoes them to its own subscriptions), refuses what MqttLink refuses (`refused`), and
runs the on-connect callbacks on `connect()`. Handlers run synchronously on the caller's thread, one message at a
time and in order: a handler that publishes does not recurse, its message is delivered after the current one.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from paho.mqtt.client import topic_matches_sub

from edgecv.agent.link.protocol import REFUSED, Handler, message_problem


class Published(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MemoryLink:
    def __init__(self, *, connected: bool = True, loopback: bool = True) -> None:
        self.published: list[Published] = []
        self.refused: list[tuple[str, str]] = []  # (topic, why) of messages publish() refused
        self.retained: dict[str, bytes] = {}
        self._subs: list[tuple[str, Handler]] = []
        self._on_connect: list[Callable[[], None]] = []
        self._connected = connected
        self._loopback = loopback
        self._lock = threading.RLock()
        self._pending: deque[tuple[str, bytes]] = deque()
        self._delivering = False

    # ---------------------------------------------------------------------------------------- the Link protocol
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int = 0) -> int:
        problem = message_problem(topic, payload)
        if problem is not None:  # refused like MqttLink refuses it: counted, never raised
            with self._lock:
                self.refused.append((topic, problem))
            return REFUSED
        with self._lock:
            self.published.append(Published(topic, bytes(payload), qos, retain))
            if retain:
                self.retained[topic] = bytes(payload)
            number = len(self.published)
        if self._loopback:
            self.deliver(topic, payload)
        return number

    def subscribe(self, filter: str, handler: Handler, qos: int = 1) -> None:
        with self._lock:
            self._subs.append((filter, handler))

    def add_on_connect(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._on_connect.append(callback)

    def is_connected(self) -> bool:
        return self._connected

    # ------------------------------------------------------------------------------------------- test controls
    def connect(self) -> None:
        """Become connected and run the on-connect callbacks, as after a (re)connect."""
        self._connected = True
        for callback in list(self._on_connect):
            callback()

    def disconnect(self) -> None:
        self._connected = False

    def deliver(self, topic: str, payload: bytes) -> None:
        """A message from the broker: every matching subscription's handler runs, in subscription order."""
        with self._lock:
            self._pending.append((topic, bytes(payload)))
            if self._delivering:
                return  # the outer call delivers it after the current message
            self._delivering = True
        try:
            while True:
                with self._lock:
                    if not self._pending:
                        self._delivering = False
                        return
                    topic, payload = self._pending.popleft()
                    handlers = [h for f, h in self._subs if topic_matches_sub(f, topic)]
                for handler in handlers:
                    handler(topic, payload)
        except BaseException:
            with self._lock:
                self._delivering = False
            raise

    def messages(self, topic_filter: str) -> list[Published]:
        """What was published on topics matching `topic_filter`, oldest first."""
        with self._lock:
            return [m for m in self.published if topic_matches_sub(topic_filter, m.topic)]
