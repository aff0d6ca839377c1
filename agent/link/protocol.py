"""The MQTT link as the rest of the agent sees it: queue a publish, subscribe, run something after each connect.

`MqttLink` implements it over paho-mqtt and a real broker; `MemoryLink` is its in-memory twin for unit tests of the
parts above the link (updater, commands, discovery). Neither side of the agent needs to know which one it has.

Both refuse, at `publish()` time, a message no broker would take (`message_problem`): it is dropped, counted as
undeliverable and logged, and `publish()` returns 0 instead of a message id. A topic built from a hostile part
must never get that far (names are validated where messages are parsed), but one bad message must never reach
the sender, where a broker would drop the connection over it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

Handler = Callable[[str, bytes], None]

REFUSED = 0  # what publish() returns for a message it refused
MAX_TOPIC_BYTES = 65535  # MQTT: a UTF-8 string with a 16-bit length
# Larger payloads are refused at publish(): they cannot be a prediction, a status or an ack, and a broker with the
# example's `max_packet_size 2097152` (systemd/mosquitto/edgecv.conf) would drop the connection over them.
MAX_PAYLOAD_BYTES = 2_000_000
# MQTT forbids U+0000 in topic names; Mosquitto also refuses other control characters (and so should we).
_BAD_TOPIC_CHARS = re.compile("[\x00-\x1f\x7f-\x9f+#]")


def message_problem(topic: object, payload: object) -> str | None:
    """Why no broker would accept this PUBLISH (a sentence), or None when it is fine."""
    if not isinstance(topic, str) or not topic:
        return f"topic {topic!r} is not a non-empty string"
    bad = _BAD_TOPIC_CHARS.search(topic)
    if bad is not None:
        return f"topic {_short(topic)} contains {bad.group()!r} (wildcards and control characters are not allowed)"
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        return f"topic {_short(topic)} is not valid UTF-8 (lone surrogate)"
    if size > MAX_TOPIC_BYTES:
        return f"topic of {size} bytes is longer than MQTT allows ({MAX_TOPIC_BYTES})"
    if not isinstance(payload, bytes | bytearray):
        return f"payload is {type(payload).__name__}, not bytes"
    if len(payload) > MAX_PAYLOAD_BYTES:
        return f"payload of {len(payload)} bytes is larger than the agent sends ({MAX_PAYLOAD_BYTES})"
    return None


def _short(topic: str) -> str:
    return repr(topic if len(topic) <= 80 else topic[:80] + "...")


class Link(Protocol):
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int = 0) -> int:
        """Queue a message for delivery without blocking; returns its id, or REFUSED (0) when `message_problem`
        finds it unsendable (then it is dropped, counted and logged; the caller may react, nothing raises)."""
        ...

    def subscribe(self, filter: str, handler: Handler, qos: int = 1) -> None:
        """`handler(topic, payload)` for every message matching `filter`, also after reconnects."""
        ...

    def add_on_connect(self, callback: Callable[[], None]) -> None:
        """`callback()` after every (re)connect, once the `online` status was published."""
        ...

    def is_connected(self) -> bool:
        ...
