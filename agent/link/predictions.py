"""Predictions on their way from the camera loops to the Outbox: staged per frame, encoded in batches.

A camera loop only appends a small record per published frame (no JSON, no lock). The MQTT sender thread, at
the start of each of its rounds, encodes everything staged and puts it into the Outbox in one go (`drain`).
Why: right after an inference has swept the CPU caches, encoding and queueing each prediction on the loop cost
~9.5 µs on one Xeon core; staged, then encoded and queued 50 at a time with the code and data hot, ~3 µs of the
sender's time plus ~1 µs to stage (docs/BENCHMARKS.md). With an ~80 µs frame that is several points of the
throughput a bare inference loop reaches on the same core.

`seq` is given here, on the draining thread, so it follows the Outbox order exactly even with several cameras.
The stage is bounded: past STAGE_MAX records (a stalled sender), the camera loop that staged the last one drains
it itself, so the Outbox's capacity, spool and drop counting apply as before and memory stays flat.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from edgecv.agent.contract.topics import PredictionEncoder
from edgecv.agent.link.outbox import Outbox

log = logging.getLogger(__name__)

STAGE_MAX = 512  # the sender drains every 5-20 ms: this is reached only above ~25,000 predictions per second


class PredictionStream:
    """Thread-safe: any number of camera loops `stage`, the sender (or anyone) `drain`s."""

    def __init__(self, outbox: Outbox, topic: str, qos: int, expiry_s: int = 0) -> None:
        self.outbox = outbox
        self.topic = topic
        self.qos = qos
        self.expiry_s = int(expiry_s)
        self._staged: deque[tuple[Any, ...]] = deque()
        self._next_seq = 0
        self._drain_lock = threading.Lock()
        self._drained = True  # nothing staged since the last drain (the next stage() wakes the sender)
        self.failed = 0  # predictions that could not be encoded (a bug, logged with its traceback)

    def __len__(self) -> int:
        return len(self._staged)

    def stage(self, encoder: PredictionEncoder, ts: float, frame_ts: float, top: list[dict[str, Any]],
              latency_ms: dict[str, float], truth: int | None) -> None:
        """Queue one prediction for publishing (never blocks on the network; deque.append is atomic)."""
        staged = self._staged
        staged.append((encoder, ts, frame_ts, top, latency_ms, truth))
        if self._drained:  # the first record since the last drain: wake the sender if it sleeps
            self._drained = False
            self.outbox.wake()
        elif len(staged) >= STAGE_MAX:
            self.drain()

    def drain(self) -> int:
        """Encode everything staged, in order, and put it into the Outbox; returns how many."""
        with self._drain_lock:
            # Set before taking the records: a record staged after this line wakes the sender again, one staged
            # before it is taken now. No wake-up is lost and the camera loops do not call wake() per frame.
            self._drained = True
            staged = self._staged
            n = len(staged)
            if not n:
                return 0
            pop, seq = staged.popleft, self._next_seq
            records = [pop() for _ in range(n)]
            try:
                payloads = [enc(seq + i, ts, frame_ts, top, latency, truth)
                            for i, (enc, ts, frame_ts, top, latency, truth) in enumerate(records)]
            except Exception:  # a malformed record must not cost the others: encode one at a time
                payloads = self._encode_each(records, seq)
            self._next_seq = seq + len(payloads)
            self.outbox.put_many(self.topic, payloads, self.qos, self.expiry_s)
            return n

    def _encode_each(self, records: list[tuple[Any, ...]], seq: int) -> list[bytes]:
        payloads: list[bytes] = []
        for enc, ts, frame_ts, top, latency, truth in records:
            try:
                payloads.append(enc(seq + len(payloads), ts, frame_ts, top, latency, truth))
            except Exception:
                self.failed += 1
                self.outbox.refuse()  # counted with the undeliverable messages, so the loss accounting stays exact
                log.exception("Encoding a prediction failed; it is dropped (%d so far)", self.failed)
        return payloads
