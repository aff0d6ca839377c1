"""The chunked, resumable model push protocol: message shapes (both sides) and the device-side receiver.

Topics (`<t>` is the transfer id; a group push uses `<p>/groups/<g>/model/push/<t>/...` for begin/chunk/end):

    <p>/<dev>/model/push/<t>/begin        JSON Begin      workstation → device, QoS 1, never retained
    <p>/<dev>/model/push/<t>/chunk/<i>    binary chunk    workstation → device, QoS 1, never retained
    <p>/<dev>/model/push/<t>/end          JSON End        workstation → device, QoS 1, never retained
    <p>/<dev>/model/push/<t>/ack          JSON Ack        device → workstation, QoS 1 (always the device topic)

A chunk payload is a 32-byte header, the raw sha256 digest of the data, followed by the data (works with MQTT
3.1.1, which has no user properties). Chunk `i` covers archive bytes [i*chunk_size, min(size, (i+1)*chunk_size)).

The device writes chunks at their offset into `<transfers>/<t>/archive.part` and records each one in a bitmap
file after the data is on disk, so a partial transfer survives disconnects and agent restarts. It answers
`begin` and `end` (and every `ACK_EVERY` chunks) with an Ack listing the missing chunk ranges; the pusher resends
only those, then sends `end` again. Re-sending `begin` with the same transfer id is how a pusher asks "where are
we?" after a reconnect. When all chunks are in, the whole-archive sha256 is checked and the archive handed over
for verification.

Limits, checked before anything is allocated: the transfer id is a safe name (names.py) and equals the topic's,
`begin` is at most MAX_BEGIN_BYTES of typed JSON, MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE, chunks =
ceil(size / chunk_size) <= MAX_CHUNKS, size <= the device limit and the free disk, a chunk's length is checked before
it is hashed, and an Ack lists at most MAX_ACK_RANGES missing ranges (docs/SECURITY.md).

Rule for concurrent pushes: the device receives one transfer at a time. A `begin` with the same transfer id
resumes; a `begin` with a different id supersedes the transfer in progress, whose partial data is deleted (its
pusher gets an Ack with state `superseded`). The transfer id defaults to the first 16 hex digits of the archive
sha256, so re-running the same push after a crash resumes instead of restarting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgecv.agent.contract import documents as D
from edgecv.agent.contract.bundle import DEFAULT_MAX_BUNDLE_BYTES
from edgecv.agent.contract.grants import DowngradeGrant
from edgecv.agent.contract.names import check_name, inside, is_name, shown
from edgecv.agent.contract.topics import bounded
from edgecv.agent.errors import BundleError, DocumentError, UnsafeNameError

log = logging.getLogger(__name__)

PROTOCOL = 1
DEFAULT_CHUNK_SIZE = 64 * 1024  # fits brokers with small message_size_limit and slow links
MIN_CHUNK_SIZE = 4 * 1024  # smaller chunks only multiply per-chunk work and bookkeeping
MAX_CHUNK_SIZE = 1024 * 1024  # one chunk is held in memory at a time: this bounds it
MAX_CHUNKS = 1 << 18  # per transfer (a 1-byte-per-chunk bitmap of at most 256 KiB)
HEADER_BYTES = 32  # raw sha256 of the chunk data
ACK_EVERY = 32  # the device sends a progress Ack every this many chunks
MAX_ACK_RANGES = 256  # an Ack lists at most this many missing ranges (the pusher asks again for the rest)
MAX_BEGIN_BYTES = 4096
MAX_ACK_BYTES = 64 * 1024
MAX_SIZE = 1 << 53  # integers above this are not exact in every JSON reader
_INDEX = re.compile(r"[0-9]{1,9}")

# Ack.state values
RECEIVING = "receiving"   # begin accepted / progress; `missing` says what is still needed
COMPLETE = "complete"     # all chunks in and the archive sha256 matches: the device verifies it now
FAILED = "failed"         # refused (too big, bad sha256, bad begin): `error` says why; push again
SUPERSEDED = "superseded"  # another transfer replaced this one
UNKNOWN = "unknown"       # the device knows no such transfer: send begin again
STALLED = "stalled"       # no chunk for update.chunk_timeout_s; the partial data is kept for resuming


class TransferError(BundleError):
    """A push message is malformed or the pushed archive breaks a limit or its checksum.

    `transfer_id` is the message's transfer id when that id itself is valid (so a FAILED ack can be sent on its
    topic), else None.
    """

    def __init__(self, message: str, transfer_id: str | None = None) -> None:
        super().__init__(message)
        self.transfer_id = transfer_id


@dataclass(frozen=True)
class Begin:
    transfer_id: str
    name: str
    version: str
    sha256: str
    size: int
    chunk_size: int
    chunks: int
    sent_at: float = 0.0
    protocol: int = PROTOCOL
    # Asked by the pusher (`edgecv push --allow-downgrade`): install even if the version is lower than the active
    # one. The device honours it only when update.allow_downgrade = "when-asked" and, when it requires signed
    # bundles, only with `downgrade_grant` signed by a key of its keyring (grants.py).
    allow_downgrade: bool = False
    downgrade_grant: DowngradeGrant | None = None

    def validate(self, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> None:
        """Check the announced transfer against this device's limits, before anything is allocated."""
        tid = self.transfer_id
        try:
            check_name(tid, "Transfer id")
            check_name(self.version, "Push begin: version")
        except UnsafeNameError as exc:
            raise TransferError(str(exc), tid if is_name(tid) else None) from None
        if self.protocol != PROTOCOL:
            raise TransferError(f"Push protocol {self.protocol} is not supported (this agent speaks {PROTOCOL}); "
                                "upgrade the agent or the workstation", tid)
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise TransferError("Push begin: sha256 must be 64 lowercase hex digits", tid)
        if self.size <= 0:
            raise TransferError("Push begin: size must be positive", tid)
        if self.size > max_bytes:
            raise TransferError(f"Bundle of {self.size} bytes exceeds this device's limit of {max_bytes} bytes "
                                "(update.max_bundle_bytes)", tid)
        if not MIN_CHUNK_SIZE <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise TransferError(f"Push begin: chunk_size {self.chunk_size} is outside {MIN_CHUNK_SIZE}.."
                                f"{MAX_CHUNK_SIZE} bytes; push with --chunk-size in that range", tid)
        expected = -(-self.size // self.chunk_size)
        if self.chunks != expected:
            raise TransferError(f"Push begin: chunks is {self.chunks} but size / chunk_size gives {expected}", tid)
        if self.chunks > MAX_CHUNKS:
            raise TransferError(f"Push begin: {self.chunks} chunks exceed the limit of {MAX_CHUNKS}; push with a "
                                "larger --chunk-size", tid)

    def chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def to_payload(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_payload(cls, data: bytes) -> Begin:
        """Parse a begin message strictly (bounded, typed; unknown keys are ignored for forward compatibility).
        Raises TransferError naming the field; its `transfer_id` is set when the id was valid."""
        tid: str | None = None
        try:
            doc = D.need_object(D.parse(data, "Push begin", max_bytes=MAX_BEGIN_BYTES, max_depth=4), "Push begin")
            raw_id = D.field(doc, "transfer_id")
            tid = check_name(raw_id, "Transfer id")
            name = D.need_str(D.field(doc, "name"), "name", 128)
            if any(ord(c) < 32 or c == "\x7f" for c in name):
                raise DocumentError("name must not contain control characters")
            return cls(transfer_id=tid, name=name,
                       version=check_name(D.field(doc, "version"), "version"),
                       sha256=D.need_str(D.field(doc, "sha256"), "sha256", 64),
                       size=D.need_int(D.field(doc, "size"), "size", 1, MAX_SIZE),
                       chunk_size=D.need_int(D.field(doc, "chunk_size"), "chunk_size", 1, MAX_SIZE),
                       chunks=D.need_int(D.field(doc, "chunks"), "chunks", 1, MAX_SIZE),
                       sent_at=D.need_number(D.field(doc, "sent_at", 0.0), "sent_at", 0.0, 1e11),
                       protocol=D.need_int(D.field(doc, "protocol", PROTOCOL), "protocol", 0, 1 << 16),
                       allow_downgrade=D.need_bool(D.field(doc, "allow_downgrade", False), "allow_downgrade"),
                       downgrade_grant=_grant(D.field(doc, "downgrade_grant", None)))
        except (DocumentError, UnsafeNameError) as exc:
            raise TransferError(f"Push begin message is malformed: {exc}", tid) from None


def _grant(doc: object) -> DowngradeGrant | None:
    return None if doc is None else DowngradeGrant.from_doc(doc)


@dataclass(frozen=True)
class Ack:
    transfer_id: str
    device: str
    state: str
    received: int
    chunks: int
    missing: list[list[int]] = field(default_factory=list)  # inclusive [first, last] index ranges
    error: str | None = None
    ts: float = 0.0

    def to_payload(self) -> bytes:
        return json.dumps({**asdict(self), "error": bounded(self.error), "ts": self.ts or round(time.time(), 3)},
                          sort_keys=True).encode()

    @classmethod
    def from_payload(cls, data: bytes) -> Ack:
        try:
            doc = D.need_object(D.parse(data, "Push ack", max_bytes=MAX_ACK_BYTES, max_depth=4), "Push ack")
            missing = []
            for i, pair in enumerate(D.field(doc, "missing", [])[:MAX_ACK_RANGES * 4]):
                if not isinstance(pair, list) or len(pair) != 2:
                    raise DocumentError(f"missing[{i}] must be a [first, last] pair")
                missing.append([D.need_int(x, f"missing[{i}]", 0, MAX_CHUNKS) for x in pair])
            error = D.field(doc, "error", None)
            return cls(transfer_id=D.need_str(D.field(doc, "transfer_id"), "transfer_id", 64),
                       device=D.need_str(D.field(doc, "device"), "device", 256),
                       state=D.need_str(D.field(doc, "state"), "state", 32),
                       received=D.need_int(D.field(doc, "received"), "received", 0, MAX_SIZE),
                       chunks=D.need_int(D.field(doc, "chunks"), "chunks", 0, MAX_SIZE), missing=missing,
                       error=None if error is None else D.need_str(error, "error", 4096),
                       ts=D.need_number(D.field(doc, "ts", 0.0), "ts", 0.0, 1e11))
        except DocumentError as exc:
            raise TransferError(f"Push ack message is malformed: {exc}") from exc

    def missing_indices(self) -> list[int]:
        return expand_ranges(self.missing)


def encode_chunk(data: bytes) -> bytes:
    return hashlib.sha256(data).digest() + data


def decode_chunk(payload: bytes) -> bytes:
    if len(payload) < HEADER_BYTES:
        raise TransferError("Push chunk is shorter than its header")
    digest, data = payload[:HEADER_BYTES], payload[HEADER_BYTES:]
    if hashlib.sha256(data).digest() != digest:
        raise TransferError("Push chunk does not match its sha256 header (corrupted in transit)")
    return data


def begin_for(archive: bytes, name: str, version: str, chunk_size: int = DEFAULT_CHUNK_SIZE,
              transfer_id: str | None = None, allow_downgrade: bool = False,
              downgrade_grant: DowngradeGrant | None = None) -> Begin:
    """The Begin message for pushing `archive` (transfer id: first 16 hex digits of its sha256)."""
    digest = hashlib.sha256(archive).hexdigest()
    return Begin(transfer_id=transfer_id or digest[:16], name=name, version=version, sha256=digest,
                 size=len(archive), chunk_size=chunk_size, chunks=math.ceil(len(archive) / chunk_size),
                 sent_at=round(time.time(), 3), allow_downgrade=allow_downgrade, downgrade_grant=downgrade_grant)


def chunk_data(archive: bytes, begin: Begin, index: int) -> bytes:
    start = index * begin.chunk_size
    return archive[start:start + begin.chunk_size]


def to_ranges(indices: Iterable[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for i in sorted(set(indices)):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def expand_ranges(ranges: Sequence[Sequence[int]]) -> list[int]:
    return [i for a, b in ranges for i in range(int(a), int(b) + 1)]


def parse_push_topic(topic: str) -> tuple[str, str, int | None] | None:
    """'.../model/push/<t>/<part>[/<index>]' → (transfer_id, part, index); None for other topics.

    The transfer id is returned as found: check it with `names.is_name` before using it. The index is 1 to 9
    ASCII digits (so never negative, never a unicode digit, never a number that is costly to convert)."""
    _head, sep, rest = topic.partition("/model/push/")
    if not sep:
        return None
    parts = rest.split("/")
    if len(parts) == 2 and parts[1] in ("begin", "end", "ack"):
        return parts[0], parts[1], None
    if len(parts) == 3 and parts[1] == "chunk" and _INDEX.fullmatch(parts[2]):
        return parts[0], "chunk", int(parts[2])
    return None


class _Partial:
    """One transfer's files on disk: begin.json, archive.part and the received bitmap."""

    def __init__(self, root: Path, begin: Begin) -> None:
        self.root, self.begin = root, begin
        self.data_path, self.map_path = root / "archive.part", root / "received.map"
        inside(root.parent, root)  # built from a validated id; checked before it is created (a planted symlink fails)
        root.mkdir(parents=True, exist_ok=True)
        fresh = not (root / "begin.json").is_file()
        if fresh:
            (root / "begin.json").write_bytes(begin.to_payload())
        self.data = open(self.data_path, "r+b" if self.data_path.exists() else "w+b")
        self.map = open(self.map_path, "r+b" if self.map_path.exists() else "w+b")
        bitmap = bytearray(self.map.read(begin.chunks + 1))
        if len(bitmap) != begin.chunks or bitmap.translate(None, b"\x00\x01"):
            bitmap = bytearray(begin.chunks)
            self.map.seek(0)
            self.map.truncate()
            self.map.write(bitmap)
            self.map.flush()
        self.bitmap = bitmap
        self.received = bitmap.count(1)
        self.last_activity = time.monotonic()

    def missing_ranges(self, limit: int = MAX_ACK_RANGES) -> list[list[int]]:
        """The first `limit` inclusive [first, last] ranges of chunks not yet received (no per-chunk list)."""
        out: list[list[int]] = []
        bitmap, n = self.bitmap, len(self.bitmap)
        start = bitmap.find(0)
        while start != -1 and len(out) < limit:
            end = bitmap.find(1, start)
            last = (n if end == -1 else end) - 1
            out.append([start, last])
            start = -1 if end == -1 else bitmap.find(0, end)
        return out

    def write(self, index: int, data: bytes) -> bool:
        """Store one chunk; False when it was already there."""
        self.last_activity = time.monotonic()
        if self.bitmap[index]:
            return False
        self.data.seek(index * self.begin.chunk_size)
        self.data.write(data)
        self.data.flush()
        os.fdatasync(self.data.fileno())  # data before its bitmap entry: a crash may lose a chunk, not fake one
        self.map.seek(index)
        self.map.write(b"\x01")
        self.map.flush()
        self.bitmap[index] = 1
        self.received += 1
        return True

    def digest(self) -> str:
        self.data.flush()
        self.data.seek(0)
        h = hashlib.sha256()
        for block in iter(lambda: self.data.read(1 << 20), b""):
            h.update(block)
        return h.hexdigest()

    def close(self) -> None:
        self.data.close()
        self.map.close()


class Receiver:
    """Device side of the protocol: one transfer at a time, persisted under `root` for resuming.

    Methods return the Ack to publish (or None) and raise nothing for peer mistakes: errors become a FAILED Ack.
    When `end()` answers COMPLETE, `completed` holds (Begin, archive path) until `finish()`; meanwhile a repeated
    begin/end of that transfer is answered COMPLETE again instead of starting over.
    """

    def __init__(self, root: Path, device: str, max_bytes: int = DEFAULT_MAX_BUNDLE_BYTES) -> None:
        self.root, self.device, self.max_bytes = Path(root), device, max_bytes
        self._lock = threading.Lock()
        self._active: _Partial | None = None
        self.completed: tuple[Begin, Path] | None = None
        self.root.mkdir(parents=True, exist_ok=True)
        self._restore()

    @property
    def active(self) -> Begin | None:
        return self._active.begin if self._active else None

    def begin(self, begin: Begin) -> list[Ack]:
        """Accept (or resume) a transfer. Returns the acks to publish (one for a superseded transfer too).

        The transfer id must be a valid name (Begin.from_payload guarantees it; UnsafeNameError otherwise)."""
        acks: list[Ack] = []
        check_name(begin.transfer_id, "Transfer id")
        with self._lock:
            try:
                begin.validate(self.max_bytes)
                self._check_space(begin)
            except TransferError as exc:
                return [self._ack(begin.transfer_id, FAILED, received=0, chunks=begin.chunks, error=str(exc))]
            done = self.completed
            if done is not None and done[0].transfer_id == begin.transfer_id and done[0].sha256 == begin.sha256:
                return [self._ack(begin.transfer_id, COMPLETE, received=begin.chunks, chunks=begin.chunks)]
            cur = self._active
            if cur is not None and cur.begin.transfer_id == begin.transfer_id and cur.begin.sha256 == begin.sha256:
                cur.last_activity = time.monotonic()
                return [self._progress(cur)]
            if cur is not None:
                acks.append(self._ack(cur.begin.transfer_id, SUPERSEDED, received=cur.received,
                                      chunks=cur.begin.chunks,
                                      error=f"Superseded by transfer {begin.transfer_id}"))
                log.info("Transfer %s superseded by %s", cur.begin.transfer_id, begin.transfer_id)
                self._discard(cur)
            self._discard_dir(begin.transfer_id)  # stale files of a finished/failed transfer with this id
            try:
                self._active = _Partial(self.root / begin.transfer_id, begin)
            except (OSError, UnsafeNameError) as exc:
                self._discard_dir(begin.transfer_id)
                reason = exc.strerror if isinstance(exc, OSError) else str(exc)
                return [*acks, self._ack(begin.transfer_id, FAILED, received=0, chunks=begin.chunks,
                                         error=f"Cannot store the transfer: {reason}")]
            log.info("Receiving %s %s (%d bytes in %d chunks) as transfer %s", begin.name, begin.version,
                     begin.size, begin.chunks, begin.transfer_id)
            return [*acks, self._progress(self._active)]

    def chunk(self, transfer_id: str, index: int, payload: bytes) -> Ack | None:
        """Store a chunk; returns a progress Ack every ACK_EVERY new chunks, a FAILED Ack on a broken limit."""
        with self._lock:
            cur = self._active
            if cur is None or cur.begin.transfer_id != transfer_id:
                return None  # unknown transfer: `end` will tell the pusher to begin again
            b = cur.begin
            if not 0 <= index < b.chunks:
                log.warning("Ignoring chunk %d of transfer %s: out of range", index, transfer_id)
                return None
            if len(payload) != HEADER_BYTES + b.chunk_length(index):  # checked before any hashing or copying
                fail = (f"Chunk {index} has {max(0, len(payload) - HEADER_BYTES)} bytes, expected "
                        f"{b.chunk_length(index)}")
                return self._fail(cur, fail)
            try:
                data = decode_chunk(payload)
            except TransferError as exc:
                log.warning("Ignoring chunk %d of transfer %s: %s", index, transfer_id, exc)
                return None  # stays missing; the pusher resends it
            try:
                new = cur.write(index, data)
            except OSError as exc:
                return self._fail(cur, f"Cannot store chunk {index}: {exc.strerror} (disk full?)")
            if new and cur.received % ACK_EVERY == 0:
                return self._progress(cur)
            return None

    def end(self, transfer_id: str) -> Ack:
        """All sent: report what is missing, or check the archive sha256 and complete the transfer."""
        with self._lock:
            done = self.completed
            if done is not None and done[0].transfer_id == transfer_id:  # a repeated end: answer again
                return self._ack(transfer_id, COMPLETE, received=done[0].chunks, chunks=done[0].chunks)
            cur = self._active
            if cur is None or cur.begin.transfer_id != transfer_id:
                return self._ack(transfer_id, UNKNOWN, received=0, chunks=0,
                                 error="No such transfer in progress; send begin again")
            cur.last_activity = time.monotonic()
            if cur.received < cur.begin.chunks:
                return self._progress(cur)
            digest = cur.digest()
            if digest != cur.begin.sha256:
                return self._fail(cur, f"Archive sha256 {digest[:12]}… does not match the pushed "
                                       f"{cur.begin.sha256[:12]}…; push again")
            cur.close()
            archive = cur.root / "archive.edgecv"
            os.replace(cur.data_path, archive)
            self.completed = (cur.begin, archive)
            self._active = None
            return self._ack(transfer_id, COMPLETE, received=cur.begin.chunks, chunks=cur.begin.chunks)

    def stalled(self, timeout_s: float) -> Ack | None:
        """A STALLED Ack when the transfer in progress got nothing for `timeout_s` (then the clock restarts)."""
        with self._lock:
            cur = self._active
            if cur is None or time.monotonic() - cur.last_activity < timeout_s:
                return None
            cur.last_activity = time.monotonic()
            ack = self._progress(cur)
            return Ack(**{**asdict(ack), "state": STALLED,
                          "error": f"No chunk received for {timeout_s:g} s; partial data kept for resuming"})

    def abort(self, transfer_id: str, error: str) -> Ack | None:
        """Give up a transfer after an unexpected failure: delete its files and return the FAILED Ack to publish
        (None when the id is not a safe name, so no ack topic can be built from it)."""
        if not is_name(transfer_id):
            return None
        with self._lock:
            chunks = 0
            if self._active is not None and self._active.begin.transfer_id == transfer_id:
                chunks = self._active.begin.chunks
                try:
                    self._active.close()
                except OSError:
                    pass
                self._active = None
            if self.completed is not None and self.completed[0].transfer_id == transfer_id:
                chunks = self.completed[0].chunks
                self.completed = None
            self._discard_dir(transfer_id)
            return self._ack(transfer_id, FAILED, received=0, chunks=chunks, error=error)

    def progress(self) -> float | None:
        with self._lock:
            cur = self._active
            return None if cur is None else cur.received / cur.begin.chunks

    def finish(self, transfer_id: str) -> None:
        """Delete a completed transfer's files once the updater is done with them."""
        with self._lock:
            if self.completed and self.completed[0].transfer_id == transfer_id:
                self.completed = None
            if self._active is None or self._active.begin.transfer_id != transfer_id:
                self._discard_dir(transfer_id)

    def close(self) -> None:
        with self._lock:
            if self._active is not None:
                self._active.close()
                self._active = None

    # ------------------------------------------------------------------ internals
    def _fail(self, cur: _Partial, error: str) -> Ack:
        log.warning("Transfer %s failed: %s", cur.begin.transfer_id, error)
        self._discard(cur)
        return self._ack(cur.begin.transfer_id, FAILED, received=0, chunks=cur.begin.chunks, error=error)

    def _progress(self, cur: _Partial) -> Ack:
        return self._ack(cur.begin.transfer_id, RECEIVING, received=cur.received, chunks=cur.begin.chunks,
                         missing=cur.missing_ranges())

    def _check_space(self, begin: Begin) -> None:
        """Refuse at begin a transfer the disk cannot hold (a partial one of the same id counts as room)."""
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            return
        if begin.size > free:
            raise TransferError(f"Bundle of {begin.size} bytes does not fit: {free} bytes free under {self.root}; "
                                "free space on the device", begin.transfer_id)

    def _ack(self, transfer_id: str, state: str, *, received: int, chunks: int,
             missing: list[list[int]] | None = None, error: str | None = None) -> Ack:
        return Ack(transfer_id=transfer_id, device=self.device, state=state, received=received, chunks=chunks,
                   missing=missing or [], error=error, ts=round(time.time(), 3))

    def _discard(self, cur: _Partial) -> None:
        cur.close()
        if self._active is cur:
            self._active = None
        self._discard_dir(cur.begin.transfer_id)

    def _discard_dir(self, transfer_id: str) -> None:
        """Delete one transfer's directory: only a valid name, only strictly inside the transfers root."""
        if not is_name(transfer_id):
            log.error("Not deleting transfer directory %s: not a valid transfer id", shown(transfer_id))
            return
        path = self.root / transfer_id
        if path.is_symlink():
            path.unlink(missing_ok=True)
            return
        if not path.exists():
            return
        try:
            shutil.rmtree(inside(self.root, path), ignore_errors=True)
        except UnsafeNameError as exc:
            log.error("%s", exc)

    def _restore(self) -> None:
        """After a restart: resume the newest partial transfer, drop everything else."""
        partials = []
        for entry in self.root.iterdir():
            begin_file = entry / "begin.json"
            if is_name(entry.name) and not entry.is_symlink() and entry.is_dir() and begin_file.is_file() \
                    and (entry / "archive.part").is_file():
                try:
                    partials.append((begin_file.stat().st_mtime, Begin.from_payload(begin_file.read_bytes()), entry))
                    continue
                except (TransferError, OSError):
                    pass
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)  # a direct child of the root (iterdir): safe to delete
            else:
                entry.unlink(missing_ok=True)
        partials.sort(key=lambda p: p[0], reverse=True)
        for i, (_mtime, begin, entry) in enumerate(partials):
            if i == 0 and begin.transfer_id == entry.name:
                try:
                    begin.validate(self.max_bytes)
                    self._active = _Partial(entry, begin)
                    log.info("Resuming transfer %s (%d of %d chunks on disk)", begin.transfer_id,
                             self._active.received, begin.chunks)
                    continue
                except (TransferError, OSError) as exc:
                    log.warning("Dropping partial transfer %s: %s", entry.name, exc)
            shutil.rmtree(entry, ignore_errors=True)

