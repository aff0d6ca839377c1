"""The device's bounded on-disk store of samples worth labelling: `<dir>/<id>.jpg` and its metadata `<id>.json`.

A sample exists when both files do: the image is written first and the metadata (which records the image's size and
sha256) second, each to a hidden temporary name and renamed into place, so a crash leaves either a hidden leftover or
an image without metadata, both removed by the start-up scan. The store never holds more than `max_bytes` (images
plus metadata): adding a sample evicts the oldest ones first. Ids are `<device>-<UTC yyyymmddThhmmss>-<seq>`, the
sequence continuing after a restart from the highest one found. Every id taken from a request is validated
(contract/samples.py) before a path is formed, and paths are only ever `<dir>/<id>.<ext>`. Thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgecv.agent.contract.samples import MAX_SAMPLE_BYTES, REASONS, check_sample_id, is_sample_id
from edgecv.agent.errors import SampleStoreError

log = logging.getLogger(__name__)

IMAGE_SUFFIX = ".jpg"
META_SUFFIX = ".json"
MAX_META_BYTES = 64 * 1024
MAX_SCAN_ENTRIES = 200_000  # the start-up scan stops here (a directory this large was not made by the store)
_SEQ = re.compile(r"-(\d{6,12})$")


@dataclass(frozen=True)
class StoredSample:
    """One complete sample: its id, image size and sha256, and the metadata document (the sidecar fields)."""

    id: str
    seq: int
    bytes: int
    sha256: str
    meta: dict[str, Any]
    meta_bytes: int

    @property
    def disk_bytes(self) -> int:
        return self.bytes + self.meta_bytes

    def listing(self) -> dict[str, Any]:
        """The entry of a `cmd/samples` page."""
        return {**self.meta, "id": self.id, "bytes": self.bytes, "sha256": self.sha256}


def _sample_time(sample: StoredSample) -> float | None:
    """When a sample's frame was taken (its `ts`), or None (then the age limit leaves it to the size cap)."""
    ts = sample.meta.get("ts")
    return float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None


def _id_prefix(device: str) -> str:
    """The device id made a valid sample-id start (a device id may legally hold '..' or start with '_')."""
    text = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9._-]", "-", device)).lstrip("._-")[:64]
    return text or "device"


class SampleStore:
    def __init__(self, directory: Path | str, *, max_bytes: int, device_id: str, max_age_s: float = 0.0) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s  # 0 = no age limit
        self.prefix = _id_prefix(device_id)
        self._lock = threading.Lock()
        self._index: dict[str, StoredSample] = {}  # insertion order = seq order = age
        self._bytes = 0
        self._seq = 0
        self.added = 0
        self.evicted = 0
        self.expired = 0
        self.removed_at_start = 0

    # ------------------------------------------------------------------------------------- start-up scan
    def open(self) -> SampleStore:
        """Create the directory, drop leftovers (hidden temporaries, images without metadata, metadata without its
        image or not matching it) and rebuild the index; then evict down to the cap."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SampleStoreError(f"Cannot create the sample directory {self.dir}: {exc.strerror or exc}; check "
                                   "samples.dir and its permissions") from exc
        found: list[StoredSample] = []
        images: set[str] = set()
        metas: set[str] = set()
        with os.scandir(self.dir) as entries:
            for n, entry in enumerate(entries):
                if n >= MAX_SCAN_ENTRIES:
                    log.warning("Sample directory %s holds more than %d entries; the rest were not scanned",
                                self.dir, MAX_SCAN_ENTRIES)
                    break
                name = entry.name
                if name.startswith("."):
                    if entry.is_file(follow_symlinks=False) or entry.is_symlink():
                        self.removed_at_start += self._remove(self.dir / name)
                    continue
                stem, suffix = os.path.splitext(name)
                if not is_sample_id(stem) or not entry.is_file(follow_symlinks=False):
                    continue  # not ours: left alone
                if suffix == IMAGE_SUFFIX:
                    images.add(stem)
                elif suffix == META_SUFFIX:
                    metas.add(stem)
        for stem in sorted(images | metas):
            match = _SEQ.search(stem)
            if match is not None:  # ids never repeat, not even those of dropped files (a workstation may hold them)
                self._seq = max(self._seq, int(match.group(1)))
            sample = self._load(stem) if stem in images and stem in metas else None
            if sample is None:
                self.removed_at_start += self._remove(self.dir / f"{stem}{IMAGE_SUFFIX}")
                self.removed_at_start += self._remove(self.dir / f"{stem}{META_SUFFIX}")
                continue
            found.append(sample)
        found.sort(key=lambda s: (s.seq, s.id))
        with self._lock:
            for sample in found:
                self._index[sample.id] = sample
                self._bytes += sample.disk_bytes
                self._seq = max(self._seq, sample.seq)
            self._expire(time.time())
            self._evict(0)
        if self.removed_at_start:
            log.info("Sample store %s: removed %d incomplete file(s) left by an interrupted write",
                     self.dir, self.removed_at_start)
        log.info("Sample store %s: %d sample(s), %d bytes (cap %d)", self.dir, len(self._index), self._bytes,
                 self.max_bytes)
        return self

    def _load(self, stem: str) -> StoredSample | None:
        meta_path = self.dir / f"{stem}{META_SUFFIX}"
        try:
            with open(meta_path, "rb") as fh:
                raw = fh.read(MAX_META_BYTES + 1)
            size = (self.dir / f"{stem}{IMAGE_SUFFIX}").stat().st_size
            meta = json.loads(raw) if len(raw) <= MAX_META_BYTES else None
        except (OSError, ValueError):
            return None
        match = _SEQ.search(stem)
        if (not isinstance(meta, dict) or meta.get("bytes") != size or not isinstance(meta.get("sha256"), str)
                or match is None):
            return None
        body = {k: v for k, v in meta.items() if k not in ("bytes", "sha256", "id")}
        return StoredSample(stem, int(match.group(1)), size, meta["sha256"], body, len(raw))

    # -------------------------------------------------------------------------------------------- write
    def add(self, image: bytes, meta: dict[str, Any], ts: float | None = None) -> StoredSample:
        """Store one encoded image with its metadata (sidecar fields); evicts the oldest samples to stay under the
        cap. Called by the collector's writer thread only."""
        if len(image) > min(MAX_SAMPLE_BYTES, self.max_bytes):
            raise SampleStoreError(f"Sample of {len(image)} bytes is larger than the store takes")
        with self._lock:
            self._seq += 1
            seq = self._seq
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(ts if ts is not None else time.time()))
        sample_id = f"{self.prefix}-{stamp}-{seq:06d}"
        sha = hashlib.sha256(image).hexdigest()
        doc = {**meta, "id": sample_id, "bytes": len(image), "sha256": sha}
        meta_raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if len(meta_raw) > MAX_META_BYTES:
            raise SampleStoreError(f"Sample metadata of {len(meta_raw)} bytes is larger than {MAX_META_BYTES}")
        sample = StoredSample(sample_id, seq, len(image), sha, dict(meta), len(meta_raw))
        with self._lock:
            self._expire(time.time())
            self._evict(sample.disk_bytes)
        image_path = self.dir / f"{sample_id}{IMAGE_SUFFIX}"
        try:
            self._write(image_path, image)
            self._write(self.dir / f"{sample_id}{META_SUFFIX}", meta_raw)
        except OSError as exc:
            self._remove(image_path)
            raise SampleStoreError(f"Cannot write sample {sample_id} in {self.dir}: {exc.strerror or exc}") from exc
        with self._lock:
            self._index[sample_id] = sample
            self._bytes += sample.disk_bytes
            self.added += 1
        return sample

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def _evict(self, incoming: int) -> None:
        """Drop the oldest samples until `incoming` more bytes fit under the cap (lock held)."""
        while self._index and self._bytes + incoming > self.max_bytes:
            oldest = next(iter(self._index.values()))
            self._drop(oldest)
            self.evicted += 1

    def expire(self, now: float | None = None) -> int:
        """Delete the samples whose frame is older than the age limit; returns how many. The writer calls it at least
        every minute, so an idle device still forgets old frames."""
        with self._lock:
            return self._expire(time.time() if now is None else now)

    def _expire(self, now: float) -> int:
        """Age limit (lock held). Samples are in storage order, which is frame order for one device, so the scan
        stops at the first one young enough."""
        if self.max_age_s <= 0:
            return 0
        n = 0
        while self._index:
            oldest = next(iter(self._index.values()))
            taken = _sample_time(oldest)
            if taken is None or now - taken <= self.max_age_s:
                break
            self._drop(oldest)
            n += 1
        self.expired += n
        return n

    def _drop(self, sample: StoredSample) -> None:
        del self._index[sample.id]
        self._bytes -= sample.disk_bytes
        self._remove(self.dir / f"{sample.id}{META_SUFFIX}")  # metadata first: an image alone is an orphan
        self._remove(self.dir / f"{sample.id}{IMAGE_SUFFIX}")

    @staticmethod
    def _remove(path: Path) -> bool:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("Cannot remove %s: %s", path, exc.strerror or exc)
            return False

    # --------------------------------------------------------------------------------------------- read
    def page(self, after: str | None, limit: int, budget: int) -> tuple[list[StoredSample], bool]:
        """Up to `limit` samples with ids greater than `after`, in id order, stopping early once their listings
        take `budget` bytes of JSON; and whether more follow."""
        with self._lock:
            ids = sorted(i for i in self._index if after is None or i > after)
            samples = [self._index[i] for i in ids]
        out: list[StoredSample] = []
        used = 0
        for sample in samples:
            if len(out) >= limit:
                return out, True
            used += len(json.dumps(sample.listing())) + 2
            if out and used > budget:
                return out, True
            out.append(sample)
        return out, False

    def get(self, sample_id: str) -> StoredSample:
        check_sample_id(sample_id)
        with self._lock:
            sample = self._index.get(sample_id)
        if sample is None:
            raise SampleStoreError(f"No sample {sample_id!r} on this device (deleted, evicted, or never stored)")
        return sample

    def read(self, sample_id: str, offset: int, length: int) -> tuple[StoredSample, bytes]:
        """`length` bytes of the sample's image from `offset` (fewer at its end)."""
        sample = self.get(sample_id)
        if offset > sample.bytes:
            raise SampleStoreError(f"Offset {offset} is beyond the end of sample {sample_id} ({sample.bytes} bytes)")
        try:
            with open(self.dir / f"{sample.id}{IMAGE_SUFFIX}", "rb") as fh:
                fh.seek(offset)
                data = fh.read(min(length, sample.bytes - offset))
        except FileNotFoundError:
            raise SampleStoreError(f"Sample {sample_id} was removed while it was being read") from None
        return sample, data

    def delete(self, ids: list[str]) -> tuple[int, list[str]]:
        """Remove these samples; returns how many were removed and the ids that were not there."""
        deleted, missing = 0, []
        with self._lock:
            for sample_id in ids:
                sample = self._index.get(check_sample_id(sample_id))
                if sample is None:
                    missing.append(sample_id)
                    continue
                self._drop(sample)
                deleted += 1
        return deleted, missing

    # ------------------------------------------------------------------------------------------- health
    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_reason = Counter(str(s.meta.get("reason")) for s in self._index.values())
            return {"stored": len(self._index), "bytes": self._bytes, "added": self.added, "evicted": self.evicted,
                    "expired": self.expired,
                    "by_reason": {r: by_reason.get(r, 0) for r in REASONS}}
