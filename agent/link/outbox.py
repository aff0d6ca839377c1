"""A bounded, in-order buffer of outgoing MQTT messages between the camera loop and the network.

The camera loop `put`s and never blocks; the link's sender takes messages in order (`take_run`) and
`ack`s each one once the broker acknowledged it (PUBACK for QoS >= 1). After a lost connection `rewind` makes every
unacknowledged message due again, oldest first. When the buffer is full a message is dropped and counted (the
oldest one never sent, see below). With a `spool_dir`, spoolable messages (QoS >= 1, not retained: predictions) are
also appended to a log on disk, so what was buffered survives an agent restart; the log is compacted as messages are
acked.
The spool is written without fsync per message: it survives a process crash or restart, not a power cut.

A spool that fails (ENOSPC, EIO, a read-only or vanished file system) never costs a message or a thread: the
error is logged once, the spool is closed and the outbox goes on in memory only, with the same capacity and drop
counting, until the agent restarts (`spool_state` says which).

Exact loss accounting: a message handed to the broker may have arrived even if its acknowledgement never came back
(the connection was lost first). Dropping it and counting it as lost would count it twice if it did arrive. So when
the buffer overflows, the oldest message that was never sent is dropped (the one just put, if everything else is
out or may have arrived): `dropped` counts only messages this agent certainly did not deliver, and a consumer that
counts distinct (boot, seq) sees exactly `published - dropped` of them. Messages the sender gives up on (`discard`:
the broker refused them or they could not be sent at all) are counted in `undeliverable`, apart from `dropped`.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

_LOG_NAME = "outbox.log"
_MARK_NAME = "outbox.mark"
# Record: id (u64), qos (u8), retain (u8), expiry_s (u32), topic length (u16), payload length (u32).
_HEADER = struct.Struct("<QBBIHI")
_COMPACT_BYTES = 4 * 1024 * 1024
_TOMBSTONE = 0xFF  # a record with this qos names a message dropped from the middle of the buffer


class Message(NamedTuple):
    """One outgoing message; `id` increases by one per message and orders the outbox. A NamedTuple: one is
    made per published prediction, and a tuple is several times cheaper to build than a frozen dataclass."""

    id: int
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    expiry_s: int = 0
    spooled: bool = False


class Outbox:
    """Bounded FIFO of messages awaiting delivery; oldest dropped (and counted) when full."""

    def __init__(self, capacity: int, spool_dir: Path | str | None = None) -> None:
        if capacity < 1:
            raise ValueError("Outbox capacity must be at least 1")
        self.capacity = capacity
        self._items: deque[Message] = deque()
        self._cursor = 0  # index in _items of the next message to hand out
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._listeners: list[threading.Event] = []
        self._next_id = 1
        self.dropped = 0
        self._maybe_sent: set[int] = set()  # ids sent on a connection that was lost before their PUBACK
        self.delivered = 0
        self.restored = 0
        self.undeliverable = 0  # messages given up on by the sender (refused by the broker, or unsendable)
        self.spool_errors = 0
        self.spool_dir = Path(spool_dir) if spool_dir else None
        self._spool: _Spool | None = None
        if self.spool_dir is not None:
            restored: list[Message] = []
            try:
                self._spool = _Spool(self.spool_dir)
                restored = self._spool.load()
                if self._spool.load_error is not None:
                    self._spool_failed(self._spool.load_error)
            except OSError as exc:
                self._spool_failed(exc)
            for msg in restored:
                self._items.append(msg)
                self._next_id = msg.id + 1
            if self._spool is not None:
                self._next_id = max(self._next_id, self._spool.done + 1)
            self.restored = len(self._items)
            while len(self._items) > capacity:
                self._items.popleft()
                self.dropped += 1
            if self.restored:
                log.info("Restored %d buffered message(s) from the spool in %s", self.restored, spool_dir)

    @property
    def spool_state(self) -> str:
        """'off' (no spool_dir), 'on', or 'failed' (an I/O error turned it off until the agent restarts)."""
        if self.spool_dir is None:
            return "off"
        return "on" if self._spool is not None else "failed"

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def add_listener(self, event: threading.Event) -> None:
        """`event` is set whenever a message is put (lets a sender sleep on one event for several sources)."""
        with self._lock:
            self._listeners = [*self._listeners, event]  # copy-on-write: put() iterates it without the lock

    def put(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, expiry_s: int = 0,
            spool: bool | None = None) -> int:
        """Append a message (never blocks); returns its id. Drops the oldest message when full."""
        spool = (qos >= 1 and not retain) if spool is None else spool
        with self._lock:
            msg = Message(self._next_id, topic, payload, qos, retain, int(expiry_s), bool(spool and self._spool))
            self._admit([msg])
        self.wake()
        return msg.id

    def put_many(self, topic: str, payloads: list[bytes], qos: int = 1, expiry_s: int = 0) -> None:
        """`put` of several non-retained messages of one topic, in order, under one lock and with one spool write
        (batches of predictions). Drops the oldest messages when full, counted as for `put`."""
        if not payloads:
            return
        with self._lock:
            first, spooled, expiry = self._next_id, qos >= 1 and self._spool is not None, int(expiry_s)
            self._admit([Message(first + i, topic, payload, qos, False, expiry, spooled)
                         for i, payload in enumerate(payloads)])
        self.wake()

    def _admit(self, msgs: list[Message]) -> None:
        """With the lock held: append messages numbered from _next_id, spool the spoolable ones, drop the oldest
        beyond capacity (counted; the cursor follows)."""
        self._next_id = msgs[-1].id + 1
        spooled = [m for m in msgs if m.spooled]
        if spooled and self._spool is not None:
            try:
                self._spool.append_many(spooled)
            except OSError as exc:  # the messages are held in memory all the same
                self._spool_failed(exc)
        items, head_dropped = self._items, False
        for msg in msgs:
            items.append(msg)
            if len(items) > self.capacity:
                head_dropped = self._drop_one() or head_dropped
        if head_dropped and self._spool is not None:
            self._sync_mark()

    def _drop_one(self) -> bool:
        """With the lock held, one message over capacity: drop the oldest one that was never sent (the newest, just
        appended, qualifies if nothing older does); counted. True when it was the head (the spool mark moves)."""
        items, cursor, maybe = self._items, self._cursor, self._maybe_sent
        index = cursor  # messages before the cursor are out on the current connection
        if maybe:
            while index < len(items) - 1 and items[index].id in maybe:
                index += 1
        victim = items[index]
        del items[index]
        maybe.discard(victim.id)
        self.dropped += 1
        if index == 0:
            return victim.spooled
        if victim.spooled and self._spool is not None:
            try:
                self._spool.forget(victim.id)  # dropped from the middle: it must not come back after a restart
            except OSError as exc:
                self._spool_failed(exc)
        return False

    def wake(self) -> None:
        """Set the listeners' events: something is ready for them (a put, or work staged for them elsewhere)."""
        for event in self._listeners:
            if not event.is_set():  # Event.set takes a lock; a sender not yet awake needs no second call
                event.set()

    def take_run(self, batches: Mapping[str, int]) -> list[Message]:
        """The next message not yet handed out, plus the messages directly after it that can share one publish:
        same topic, qos, retain and expiry, up to `batches[topic]` in all (1 for topics not in `batches`)."""
        with self._lock:
            items, cursor = self._items, self._cursor
            if cursor >= len(items):
                return []
            first = items[cursor]
            limit = batches.get(first.topic, 1)
            if limit == 1:
                self._cursor = cursor + 1
                return [first]
            topic, qos, retain, expiry_s = first.topic, first.qos, first.retain, first.expiry_s
            run = [first]
            for i in range(cursor + 1, min(len(items), cursor + limit)):
                msg = items[i]  # indexing, not islice: a deque is walked from its start, and cursor can be large
                if msg.topic != topic or msg.qos != qos or msg.retain != retain or msg.expiry_s != expiry_s:
                    break
                run.append(msg)
            self._cursor = cursor + len(run)
            return run

    def ack_all(self, msg_ids: Iterable[int]) -> int:
        """`ack` several messages (one publish that carried a batch); returns how many were still held."""
        ids = list(msg_ids)
        with self._lock:
            # The usual case, in one pass: the oldest messages acknowledged in order.
            items, k, spooled = self._items, 0, False
            while k < len(ids) and items and items[0].id == ids[k]:
                spooled = items.popleft().spooled or spooled
                k += 1
            if k:
                self._cursor = max(0, self._cursor - k)
                self.delivered += k
                if self._maybe_sent:
                    self._maybe_sent.difference_update(ids[:k])
                if spooled and self._spool is not None:
                    self._sync_mark()
                if not items:
                    self._cond.notify_all()
            return k + sum(self._ack(msg_id) for msg_id in ids[k:])

    def ack(self, msg_id: int) -> bool:
        """The message was delivered: remove it. False when it is unknown (already dropped or acked)."""
        with self._lock:
            return self._ack(msg_id)

    def _ack(self, msg_id: int) -> bool:
        return self._remove(msg_id, delivered=True)

    def _remove(self, msg_id: int, *, delivered: bool) -> bool:
        self._maybe_sent.discard(msg_id)
        for i, msg in enumerate(self._items):
            if msg.id == msg_id:
                del self._items[i]
                if i < self._cursor:
                    self._cursor -= 1
                self.delivered += delivered
                if msg.spooled and i == 0 and self._spool is not None:
                    self._sync_mark()
                if not self._items:
                    self._cond.notify_all()
                return True
            if msg.id > msg_id:
                break
        return False

    def rewind(self) -> None:
        """Make every unacknowledged message due again (after a lost connection), oldest first. Those that were
        handed out may have reached the broker: an overflow drops them last."""
        with self._lock:
            items = self._items
            self._maybe_sent.update(items[i].id for i in range(self._cursor))
            self._cursor = 0

    def unget(self, run: list[Message]) -> None:
        """Give back the run `take_run` just returned, unsent: it is handed out again next time."""
        with self._lock:
            self._cursor = max(0, self._cursor - len(run))

    def pending(self) -> int:
        """Messages not yet handed out to the sender."""
        with self._lock:
            return len(self._items) - self._cursor

    def wait_empty(self, timeout: float) -> bool:
        with self._lock:
            return self._cond.wait_for(lambda: not self._items, timeout)

    def refuse(self) -> None:
        """Count a message that was refused before it got in (`Link.publish` found it unsendable)."""
        with self._lock:
            self.undeliverable += 1

    def peek(self, msg_id: int) -> tuple[str, int] | None:
        """(topic, payload size) of a held message, for log lines; None when it is not held."""
        with self._lock:
            for msg in self._items:
                if msg.id == msg_id:
                    return msg.topic, len(msg.payload)
            return None

    def discard(self, msg_ids: Iterable[int]) -> int:
        """The sender gave up on these messages (refused by the broker, or unsendable): remove them and count them
        as undeliverable; returns how many were still held."""
        with self._lock:
            n = 0
            for msg_id in msg_ids:
                n += self._remove(msg_id, delivered=False)
            self.undeliverable += n
            return n

    def close(self) -> None:
        with self._lock:
            if self._spool is not None:
                spool, self._spool = self._spool, None
                try:
                    oldest = self._items[0].id if self._items else self._next_id
                    spool.mark(oldest - 1, lambda: [m for m in self._items if m.spooled])
                    spool.close()
                except OSError as exc:
                    self._spool = spool
                    self._spool_failed(exc)

    def _sync_mark(self) -> None:
        """Everything with an id below the oldest message still held is done (delivered or dropped)."""
        assert self._spool is not None
        oldest = self._items[0].id if self._items else self._next_id
        try:
            self._spool.mark(oldest - 1, lambda: [m for m in self._items if m.spooled])
        except OSError as exc:
            self._spool_failed(exc)

    def _spool_failed(self, exc: OSError) -> None:
        """With the lock held (or in __init__): an I/O error on the spool turns it off; memory carries on."""
        self.spool_errors += 1
        spool, self._spool = self._spool, None
        log.error("The publish spool in %s failed (%s); buffering in memory only (up to %d messages, the oldest "
                  "dropped and counted beyond that) until the agent restarts. Free space or fix publish.spool_dir",
                  self.spool_dir, exc, self.capacity)
        if spool is not None:
            spool.abandon()


class _Spool:
    """Append-only record log plus a high-water mark file; compacted when the acked head grows large."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.log_path = root / _LOG_NAME
        self.mark_path = root / _MARK_NAME
        self._fh = open(self.log_path, "ab")
        self._mark_fd = os.open(self.mark_path, os.O_RDWR | os.O_CREAT, 0o600)
        self.done = 0
        self._compact_at = _COMPACT_BYTES
        self.load_error: OSError | None = None

    def load(self) -> list[Message]:
        try:
            raw = os.pread(self._mark_fd, 8, 0)
            self.done = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
        except OSError:
            self.done = 0
        data = self.log_path.read_bytes()
        out: list[Message] = []
        forgotten: set[int] = set()
        pos = 0
        while pos + _HEADER.size <= len(data):
            mid, qos, retain, expiry, tlen, plen = _HEADER.unpack_from(data, pos)
            end = pos + _HEADER.size + tlen + plen
            if end > len(data):
                break  # torn final record from a crash mid-write
            body = data[pos + _HEADER.size:end]
            if qos == _TOMBSTONE:
                forgotten.add(mid)
            elif mid > self.done:
                try:
                    topic = body[:tlen].decode()
                except UnicodeDecodeError:
                    log.warning("Spool %s is corrupt at offset %d; ignoring the rest", self.log_path, pos)
                    break
                out.append(Message(mid, topic, bytes(body[tlen:]), qos, bool(retain), expiry, spooled=True))
            pos = end
        if forgotten:
            out = [m for m in out if m.id not in forgotten]
        if pos != len(data) or (out and len(data) > _COMPACT_BYTES // 4) or (not out and data):
            try:
                self._rewrite(out)
            except OSError as exc:  # what was read is still good: the caller keeps it and turns the spool off
                self.load_error = exc
        return out

    def forget(self, msg_id: int) -> None:
        """A tombstone: the message `msg_id` (still in the log) was dropped and must not be restored."""
        self._fh.write(_HEADER.pack(msg_id, _TOMBSTONE, 0, 0, 0, 0))
        self._fh.flush()

    def append_many(self, msgs: list[Message]) -> None:
        """Write records and hand them to the OS (one write for a batch); fsync is left to close()."""
        self._fh.write(b"".join(_record(msg) for msg in msgs))
        self._fh.flush()

    def mark(self, done: int, live: Callable[[], list[Message]]) -> None:
        if done <= self.done:
            return
        self.done = done
        os.pwrite(self._mark_fd, struct.pack("<Q", done), 0)
        if self._fh.tell() > self._compact_at:
            self._rewrite(live())

    def _rewrite(self, live: list[Message]) -> None:
        self._fh.close()
        tmp = self.log_path.with_suffix(".tmp")
        with open(tmp, "wb") as fh:
            for msg in live:
                fh.write(_record(msg))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.log_path)
        self._fh = open(self.log_path, "ab")
        # Compact again only once the dead part outweighs what is live, so a big backlog does not thrash.
        self._compact_at = max(_COMPACT_BYTES, 2 * self._fh.tell())

    def close(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.fsync(self._mark_fd)
        os.close(self._mark_fd)

    def abandon(self) -> None:
        """Release the files after an I/O error, raising nothing (buffered bytes that cannot be written are lost;
        the messages themselves are still in memory)."""
        for release in (self._fh.close, lambda: os.close(self._mark_fd)):
            try:
                release()
            except (OSError, ValueError):
                pass


def _record(msg: Message) -> bytes:
    """One spool record: header, topic, payload."""
    topic = msg.topic.encode()
    header = _HEADER.pack(msg.id, msg.qos, int(msg.retain), msg.expiry_s, len(topic), len(msg.payload))
    return header + topic + msg.payload
