"""Answers the fleet-wide announce request (`<prefix>/announce`) by re-publishing the device's retained documents.

`edgecv devices` (and `push --group`, `watch --group`) read the fleet from retained `status` and `model/state`
through wildcard subscriptions. Some brokers never deliver retained messages to a wildcard subscription
(RabbitMQ 3.x's MQTT plugin); they do deliver live ones. So the workstation publishes an announce request after
subscribing and every online device re-publishes those documents (still retained), which then arrive live on
any broker. Answers are at most `min_interval_s` apart, and requests that arrive meanwhile share the next one: a
chatty or looping publisher cannot make the fleet flood the broker, and no request goes unanswered.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)


class Subscriber(Protocol):
    """The part of the MQTT link this needs: a subscription renewed after every reconnect."""

    def subscribe(self, filter: str, handler: Callable[[str, bytes], None], qos: int = 1) -> None: ...


class AnnounceResponder:
    """Subscribes to the announce topic; each request runs `republish`, at most once per `min_interval_s`: a request
    within that interval of the last answer is answered once the interval has passed (several such requests by one
    answer), so every request is answered within `min_interval_s`."""

    def __init__(self, link: Subscriber, topic: str, republish: Sequence[Callable[[], None]], *,
                 min_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.topic = topic
        self.republish = tuple(republish)
        self.min_interval_s = min_interval_s
        self.answered = 0  # answers given so far
        self._clock = clock
        self._last: float | None = None
        self._deferred = False  # an answer is scheduled for the end of the current interval
        self._lock = threading.Lock()

    def start(self) -> AnnounceResponder:
        self.link.subscribe(self.topic, self._on_request)
        return self

    def _on_request(self, topic: str, payload: bytes) -> None:
        now = self._clock()
        with self._lock:
            if self._deferred:
                return  # the scheduled answer covers this request too
            wait = 0.0 if self._last is None else self._last + self.min_interval_s - now
            if wait > 0:
                self._deferred = True
        if wait > 0:
            log.debug("Announce request on %s: answering in %.2f s", topic, wait)
            timer = threading.Timer(wait, self._answer)
            timer.daemon = True
            timer.start()
        else:
            self._answer()

    def _answer(self) -> None:
        with self._lock:
            self._last = self._clock()
            self._deferred = False
            self.answered += 1
        log.debug("Announce request: re-publishing status and model state")
        for publish in self.republish:
            try:
                publish()
            except Exception:
                log.exception("Answering the announce request failed")
