"""The MQTT link as the rest of the agent sees it: queue a publish, subscribe, run something after each connect.

`MqttLink` implements it over paho-mqtt and a real broker; `MemoryLink` is its in-memory twin for unit tests of the
parts above the link (updater, commands, discovery). Neither side of the agent needs to know which one it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

Handler = Callable[[str, bytes], None]


class Link(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int = 0) -> int:
        """Queue a message for delivery without blocking; returns its id."""
        ...

    def subscribe(self, filter: str, handler: Handler, qos: int = 1) -> None:
        """`handler(topic, payload)` for every message matching `filter`, also after reconnects."""
        ...

    def add_on_connect(self, callback: Callable[[], None]) -> None:
        """`callback()` after every (re)connect, once the `online` status was published."""
        ...

    def is_connected(self) -> bool:
        ...
