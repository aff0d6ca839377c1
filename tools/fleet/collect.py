"""Fetching a device's stored samples over MQTT into a collected dataset (docs/DATASETS.md): `edgecv collect`.

One connection per device. The samples are listed page by page (`cmd/samples`), and each one not already in the
dataset (in `_unlabelled`, a class folder or `_junk`: a labelled sample is never fetched again) is fetched in chunks
(`cmd/sample`) into `_unlabelled/.<id>.jpg.part`, which stays across runs: the next run resumes from its end. A
chunk that gets no answer is asked for again (RETRIES times). The finished image must have the size and sha256 the
device announced; a resumed file whose prefix was not the device's image fails that check and is fetched again from
the start, once. Then the sidecar is written, then the image renamed into place (the DATASETS.md writing rules).
Everything the device sends is bounded: result sizes, announced sizes (MAX_SAMPLE_BYTES), ids (checked before they
become file names), chunk lengths and offsets. `delete_after` removes from the device only samples whose local copy
was verified against the device's sha256.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgecv.agent.contract import samples as S
from edgecv.agent.contract import topics as T
from edgecv.tools.dataset_layout import (
    JUNK,
    UNLABELLED,
    Sidecar,
    SidecarError,
    check_sample_id,
    is_image_name,
    write_sidecar,
)
from edgecv.tools.errors import DatasetError, FleetError, NameNotAllowedError
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient

log = logging.getLogger(__name__)

RETRIES = 3  # attempts per request in all
MAX_RESULT_BYTES = 4 * 1024 * 1024  # a result larger than this is not parsed
_SHA256 = re.compile(r"[0-9a-f]{64}")
PART_SUFFIX = ".jpg.part"


@dataclass(frozen=True)
class Listed:
    """A sample as the device announced it, validated."""

    id: str
    bytes: int
    sha256: str
    sidecar: Sidecar


@dataclass
class DeviceCollection:
    """What one device's collection did."""

    device: str
    listed: int = 0
    fetched: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # sample id (or "-") -> why
    bytes: int = 0  # the size of the samples fetched
    transferred: int = 0  # image bytes received in this run (less than `bytes` when downloads resumed)
    deleted: int = 0
    verified: list[str] = field(default_factory=list)  # in the dataset with the device's sha256: safe to delete

    @property
    def ok(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "ok": self.ok, "listed": self.listed, "fetched": self.fetched,
                "already": self.already, "failed": self.failed, "bytes": self.bytes, "transferred": self.transferred,
                "deleted": self.deleted}


class SampleFetcher:
    """Request/result exchanges with one device's sample commands on an open client."""

    def __init__(self, client: MqttClient, prefix: str, device: str, *, timeout: float = 15.0) -> None:
        self.client = client
        self.topics = T.DeviceTopics(prefix, device)
        self.device = device
        self.timeout = timeout
        for name in ("samples", "sample", "samples.delete"):
            client.subscribe(self.topics.cmd_result(name))

    def request(self, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Send `name` with `body` and return its ok result; FleetError when it failed or never came."""
        for attempt in range(RETRIES):
            request_id = uuid.uuid4().hex[:16]
            self.client.publish(self.topics.cmd(name), {"id": request_id, **body})
            doc = self._wait(name, request_id)
            if doc is None:
                log.info("%s: no answer to %s (attempt %d of %d)", self.device, name, attempt + 1, RETRIES)
                continue
            if not doc.get("ok"):
                raise FleetError(f"{self.device} refused {name}: {str(doc.get('error'))[:300]}")
            return doc
        raise FleetError(f"{self.device} did not answer {name} within {self.timeout:g} s, {RETRIES} times; is it "
                         "online ('edgecv devices')?")

    def _wait(self, name: str, request_id: str) -> dict[str, Any] | None:
        topic = self.topics.cmd_result(name)
        try:
            msg = self.client.wait_for(lambda m: m.topic == topic and len(m.payload) <= MAX_RESULT_BYTES
                                       and _id_of(m.payload) == request_id, self.timeout)
        except FleetError:
            return None
        try:
            return msg.json()
        except ValueError:
            return None

    # ------------------------------------------------------------------------------------------ listing
    def list_all(self, limit: int | None = None) -> list[Listed]:
        out: list[Listed] = []
        after: str | None = None
        while True:
            doc = self.request("samples", {"after": after, "limit": S.MAX_PAGE})
            entries = doc.get("samples")
            if not isinstance(entries, list) or len(entries) > S.MAX_PAGE:
                raise FleetError(f"{self.device} sent a sample list that is not a list of at most {S.MAX_PAGE}")
            for entry in entries:
                item = parse_listed(entry)
                if after is not None and item.id <= after:
                    raise FleetError(f"{self.device} listed sample {item.id} out of order")
                after = item.id
                out.append(item)
                if limit is not None and len(out) >= limit:
                    return out
            if doc.get("more") is not True or not entries:
                return out

    def chunk(self, sample: Listed, offset: int, length: int) -> bytes:
        doc = self.request("sample", {"sample": sample.id, "offset": offset, "length": length})
        if doc.get("sample") != sample.id or doc.get("offset") != offset:
            raise FleetError(f"{self.device} answered with another chunk than sample {sample.id} at {offset}")
        if doc.get("bytes") != sample.bytes or doc.get("sha256") != sample.sha256:
            raise FleetError(f"Sample {sample.id} changed on {self.device} while it was fetched")
        raw = doc.get("data")
        if not isinstance(raw, str) or len(raw) > (length + 2) // 3 * 4:
            raise FleetError(f"{self.device} sent a chunk of sample {sample.id} larger than asked for")
        try:
            data = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise FleetError(f"{self.device} sent a chunk of sample {sample.id} that is not base64") from None
        if not data and offset < sample.bytes:
            raise FleetError(f"{self.device} sent an empty chunk of sample {sample.id} at {offset}")
        return data

    def delete(self, ids: Sequence[str]) -> int:
        deleted = 0
        for start in range(0, len(ids), S.MAX_PAGE):
            doc = self.request("samples.delete", {"samples": list(ids[start:start + S.MAX_PAGE])})
            n = doc.get("deleted")
            deleted += n if isinstance(n, int) and not isinstance(n, bool) else 0
        return deleted


def _id_of(payload: bytes) -> object:
    try:
        doc = json.loads(payload)
    except ValueError:
        return None
    return doc.get("id") if isinstance(doc, dict) else None


def parse_listed(entry: object) -> Listed:
    """A listing entry checked: safe id, bounded size, a sha256, a valid sidecar; FleetError otherwise."""
    if not isinstance(entry, dict):
        raise FleetError("A sample list entry is not an object")
    try:
        sample_id = check_sample_id(entry.get("id"))  # type: ignore[arg-type]
    except NameNotAllowedError as exc:
        raise FleetError(f"The device listed an unusable sample id: {exc}") from None
    size, sha = entry.get("bytes"), entry.get("sha256")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= S.MAX_SAMPLE_BYTES:
        raise FleetError(f"Sample {sample_id}: size {size!r} is not 1 to {S.MAX_SAMPLE_BYTES} bytes")
    if not isinstance(sha, str) or not _SHA256.fullmatch(sha):
        raise FleetError(f"Sample {sample_id}: sha256 {str(sha)[:80]!r} is not 64 hex digits")
    try:
        sidecar = Sidecar.from_json(entry)
    except SidecarError as exc:
        raise FleetError(f"Sample {sample_id}: {exc}") from None
    return Listed(sample_id, size, sha, sidecar)


# -------------------------------------------------------------------------------------------- the dataset
def present_samples(root: Path) -> dict[str, Path]:
    """Every sample id with an image in the dataset (`_unlabelled`, `_junk`, class folders), and where it is."""
    found: dict[str, Path] = {}
    if not root.is_dir():
        return found
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        if folder.name.startswith("_") and folder.name not in (UNLABELLED, JUNK):
            continue
        for entry in os.scandir(folder):
            if is_image_name(entry.name):
                found.setdefault(os.path.splitext(entry.name)[0], Path(entry.path))
    return found


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def collect_device(options: ClientOptions, prefix: str, device: str, root: Path, *,
                   reasons: Sequence[str] = (), limit: int | None = None, chunk_size: int = S.MAX_CHUNK,
                   timeout: float = 15.0, delete_after: bool = False,
                   progress: Callable[[int], None] | None = None) -> DeviceCollection:
    """Fetch `device`'s samples into dataset `root` (see the module docstring). Failures of single samples are
    recorded and the others go on; a failure to reach or list the device raises FleetError."""
    out = DeviceCollection(device)
    unlabelled = root / UNLABELLED
    try:
        unlabelled.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"Cannot create {unlabelled}: {exc.strerror or exc}") from exc
    have = present_samples(root)

    def received(n: int) -> None:
        out.transferred += n
        if progress is not None:
            progress(n)

    with MqttClient(options) as client:
        fetcher = SampleFetcher(client, prefix, device, timeout=timeout)
        listed = [s for s in fetcher.list_all() if not reasons or s.sidecar.reason in reasons]
        if limit is not None:
            listed = listed[:limit]
        out.listed = len(listed)
        for sample in listed:
            where = have.get(sample.id)
            if where is not None:
                out.already.append(sample.id)
                if delete_after and file_sha256(where) == sample.sha256:
                    out.verified.append(sample.id)
                continue
            try:
                fetch_sample(fetcher, sample, unlabelled, chunk_size=chunk_size, progress=received)
            except (FleetError, DatasetError, OSError) as exc:
                out.failed[sample.id] = str(exc)
                continue
            out.fetched.append(sample.id)
            out.verified.append(sample.id)
            out.bytes += sample.bytes
        if delete_after and out.verified:
            try:
                out.deleted = fetcher.delete(out.verified)
            except FleetError as exc:
                out.failed["-"] = f"Deleting the collected samples on the device failed: {exc}"
    return out


def fetch_sample(fetcher: SampleFetcher, sample: Listed, unlabelled: Path, *, chunk_size: int = S.MAX_CHUNK,
                 progress: Callable[[int], None] | None = None) -> Path:
    """One sample into `unlabelled`: resume or start `.<id>.jpg.part`, verify, sidecar, then the image."""
    part = unlabelled / f".{sample.id}{PART_SUFFIX}"
    image = unlabelled / f"{sample.id}.jpg"
    for attempt in range(2):
        if part.is_symlink() or (part.exists() and not part.is_file()):
            raise DatasetError(f"{part} is not a regular file; remove it")
        done = part.stat().st_size if part.exists() else 0
        if done > sample.bytes:
            part.unlink()
            done = 0
        with open(part, "ab") as fh:
            while done < sample.bytes:
                data = fetcher.chunk(sample, done, min(chunk_size, sample.bytes - done))
                if done + len(data) > sample.bytes:
                    raise FleetError(f"{fetcher.device} sent more of sample {sample.id} than its {sample.bytes} bytes")
                fh.write(data)
                fh.flush()
                done += len(data)
                if progress is not None:
                    progress(len(data))
        if file_sha256(part) == sample.sha256:
            write_sidecar(unlabelled / f"{sample.id}.json", sample.sidecar)
            os.replace(part, image)
            return image
        part.unlink()  # a resumed prefix that was not this image (or a corrupted transfer): once more from 0
        if attempt == 0:
            log.info("Sample %s did not match its sha256; fetching it again from the start", sample.id)
    raise FleetError(f"Sample {sample.id} from {fetcher.device} does not match its sha256 after two downloads")
