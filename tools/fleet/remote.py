"""Remote commands (agent/commands.py on the device): publish one request per device, each with its own request id,
and collect every device's result on one connection, so a command to a group takes one timeout, not one per device.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgecv.agent.contract import topics as T
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient

COMMANDS = ("ping", "reload", "snapshot", "rollback", "samples")


@dataclass
class CommandResult:
    """One device's answer: `doc` is its result document (`ok`, `error`, and what the command returns), None when it
    did not answer in time."""

    device: str
    request_id: str
    doc: dict[str, Any] | None = None
    seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # added by the workstation (e.g. where a snapshot was saved)

    @property
    def ok(self) -> bool:
        return bool(self.doc and self.doc.get("ok"))

    @property
    def error(self) -> str | None:
        if self.doc is None:
            return "no answer (is it online? 'edgecv devices')"
        return None if self.ok else str(self.doc.get("error") or "failed without a reason")

    def to_dict(self) -> dict[str, Any]:
        """The JSON form `--json` prints: the device's result, or `ok: false` with why there is none."""
        base = dict(self.doc) if self.doc is not None else {"ok": False, "error": self.error, "answered": False}
        base.setdefault("device", self.device)
        base.setdefault("id", self.request_id)
        return {**base, **self.extra}


def send_commands(options: ClientOptions, prefix: str, devices: Sequence[str], name: str,
                  body: Mapping[str, Any] | None = None, *, timeout: float = 15.0) -> list[CommandResult]:
    """Send command `name` to every device and wait up to `timeout` seconds for all results; one result per device,
    in the given order (doc None for a device that did not answer)."""
    pending = {d: CommandResult(d, uuid.uuid4().hex[:12]) for d in dict.fromkeys(devices)}
    by_topic = {T.DeviceTopics(prefix, d).cmd_result(name): r for d, r in pending.items()}
    with MqttClient(options) as client:
        for topic in by_topic:
            client.subscribe(topic)
        started = time.monotonic()
        for device, result in pending.items():
            client.publish(T.DeviceTopics(prefix, device).cmd(name), {"id": result.request_id, **(body or {})})
        deadline = started + timeout
        waiting = set(pending)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            msg = client.get(min(left, 0.2))
            found = by_topic.get(msg.topic) if msg is not None else None
            if msg is None or found is None or found.device not in waiting:
                continue
            try:
                doc = msg.json()
            except ValueError:
                continue
            if doc.get("id") == found.request_id:
                found.doc, found.seconds = doc, round(time.monotonic() - started, 3)
                waiting.discard(found.device)
    return [pending[d] for d in dict.fromkeys(devices)]


def wait_until_answering(options: ClientOptions, prefix: str, devices: Sequence[str], timeout: float) -> set[str]:
    """Ping `devices` once a second until each answers or `timeout` passes; returns those that answered. A device
    that has just come online publishes its `online` status before its command subscription is in place, so a
    command sent at once may go unheard; pings are harmless to repeat, a rollback is not."""
    answered: set[str] = set()
    deadline = time.monotonic() + timeout
    while len(answered) < len(set(devices)):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        waiting = [d for d in devices if d not in answered]
        answered |= {r.device for r in send_commands(options, prefix, waiting, "ping", timeout=min(1.0, left))
                     if r.doc is not None}
    return answered
