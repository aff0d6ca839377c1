"""AnnounceResponder: every announce request is answered (status and model state re-published), at most one answer
per interval, requests within an interval sharing the next answer."""

from __future__ import annotations

import threading
from collections.abc import Callable

from edgecv.agent.contract.topics import announce_topic
from edgecv.agent.link.announce import AnnounceResponder


class FakeLink:
    """The subscribe side of the MQTT link, in memory: `deliver` plays a message from the broker."""

    def __init__(self) -> None:
        self.handlers: dict[str, Callable[[str, bytes], None]] = {}

    def subscribe(self, filter: str, handler: Callable[[str, bytes], None], qos: int = 1) -> None:
        self.handlers[filter] = handler

    def deliver(self, topic: str, payload: bytes = b"{}") -> None:
        self.handlers[topic](topic, payload)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_requests_are_answered_at_most_once_per_interval_and_never_dropped() -> None:
    link, clock = FakeLink(), Clock()
    calls: list[str] = []
    answered = threading.Event()

    def status() -> None:
        calls.append("status")

    def model_state() -> None:
        calls.append("model/state")
        answered.set()

    topic = announce_topic("edgecv")
    assert topic == "edgecv/announce"
    responder = AnnounceResponder(link, topic, [status, model_state], min_interval_s=0.3, clock=clock).start()
    assert set(link.handlers) == {"edgecv/announce"}

    link.deliver(topic)  # the first request: answered at once, on the caller's thread
    assert calls == ["status", "model/state"] and responder.answered == 1

    answered.clear()
    clock.now += 0.1
    link.deliver(topic)  # within the interval: deferred to its end...
    link.deliver(topic)  # ... and this one shares that answer
    assert calls == ["status", "model/state"]
    assert answered.wait(5), "the deferred answer never came"
    assert calls == ["status", "model/state"] * 2 and responder.answered == 2

    clock.now += 10.0
    link.deliver(topic)  # long after the last answer: at once again
    assert calls == ["status", "model/state"] * 3 and responder.answered == 3


def test_a_failing_republish_does_not_stop_the_others() -> None:
    link = FakeLink()
    calls: list[str] = []

    def broken() -> None:
        raise RuntimeError("no model state yet")

    AnnounceResponder(link, "p/announce", [broken, lambda: calls.append("status")]).start()
    link.deliver("p/announce")
    assert calls == ["status"]
