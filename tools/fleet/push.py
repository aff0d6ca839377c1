"""Workstation side of the push protocol (agent/contract/transfer.py): send one bundle archive to devices or a group,
resend what acks report missing, survive broker disconnects, and collect each device's final state.

One `Pusher.push()` call is one transfer: begin → chunks → end, then rounds of "resend missing, end again" until
every target reported `complete`, after which it waits for each device's final `model/state` for this transfer
(`active`, `rejected` or `rolled_back`). With `wait_probation` an `active` that is still on probation is not the end:
the pusher waits (the probation time the device announces, plus a margin) for `probation: passed` or a `rolled_back`,
so the person who pushed learns whether the model survived. If the connection drops, it reconnects, asks every
unfinished device where it is (by re-sending `begin`: same transfer id = resume) and resends only the missing chunks.
With `allow_downgrade` and a `grant_key`, each device's (or the group's) `begin` carries a downgrade grant signed
for that target (agent/contract/grants.py); devices that require signed bundles honour the request only then.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgecv.agent.contract import topics as T
from edgecv.agent.contract.grants import DEFAULT_GRANT_S, DowngradeGrant, grant_downgrade
from edgecv.agent.contract.names import check_name
from edgecv.agent.contract.transfer import (
    COMPLETE,
    DEFAULT_CHUNK_SIZE,
    FAILED,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    RECEIVING,
    STALLED,
    SUPERSEDED,
    UNKNOWN,
    Ack,
    Begin,
    begin_for,
    chunk_data,
    encode_chunk,
)
from edgecv.tools.errors import FleetError
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received

log = logging.getLogger(__name__)

FINAL_STATES = ("active", "rejected", "rolled_back")
RESEND_AFTER_S = 3.0  # no ack for this long after `end`: ask again
WINDOW = 64  # chunks published ahead of their PUBACKs
REASK_S = 5.0  # a device complete but without a final state for this long is asked again (it may have restarted)
PROBATION_MARGIN_S = 30.0  # beyond the probation time a device announces, before its silence is a timeout


@dataclass
class DeviceResult:
    """Outcome of a push for one device: state is active/rejected/rolled_back/failed/timeout."""

    device: str
    state: str = "pending"
    version: str | None = None
    error: str | None = None
    seconds: float = 0.0
    received: int = 0
    chunks: int = 0
    probation: str | None = None  # "running", "passed" or "failed" when the device put the model on probation

    @property
    def ok(self) -> bool:
        return self.state == "active"


@dataclass
class _Track:
    result: DeviceResult
    ack: Ack | None = None
    acked: bool = False       # answered the current begin/end round
    complete: bool = False
    final: bool = False
    missing: set[int] = field(default_factory=set)
    complete_at: float = 0.0
    probation_until: float = 0.0  # > 0: active, waiting out its probation until then (wait_probation)


def read_archive(path: Path, workdir: Path | None = None) -> tuple[bytes, str, str]:
    """(archive bytes, name, version) of a `.edgecv` file, or of a bundle directory packed on the fly."""
    import tempfile

    from edgecv.agent.contract.bundle import load_bundle, open_bundle, pack_bundle

    path = Path(path)
    if not path.exists():
        raise FleetError(f"Bundle {path} does not exist; build one with 'edgecv bundle' or 'edgecv optimize'")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        if path.is_dir():
            manifest = load_bundle(path).manifest
            data = pack_bundle(path, Path(tmp) / "bundle.edgecv").read_bytes()
        else:
            manifest = open_bundle(path, Path(tmp) / "x").manifest
            data = path.read_bytes()
    return data, manifest.name, manifest.version


class Pusher:
    """Push one archive. `progress(sent_bytes)` is called as chunks are acknowledged by the broker."""

    def __init__(self, options: ClientOptions, archive: bytes, name: str, version: str, *,
                 prefix: str = T.DEFAULT_PREFIX, chunk_size: int = DEFAULT_CHUNK_SIZE, timeout: float = 120.0,
                 transfer_id: str | None = None, progress: Callable[[int], None] | None = None,
                 allow_downgrade: bool = False, grant_key: Ed25519PrivateKey | None = None,
                 wait_probation: bool = False) -> None:
        self.options = options
        self.grant_key = grant_key if allow_downgrade else None
        self.wait_probation = wait_probation
        self.archive = archive
        self.prefix = prefix
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise FleetError(f"Chunk size {chunk_size} is outside the {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE} bytes "
                             "devices accept; pick --chunk-size in that range (below the broker's message_size_limit)")
        if transfer_id is not None:
            check_name(transfer_id, "Transfer id")
        tid = transfer_id or f"{begin_for(archive, name, version, chunk_size).sha256[:12]}-{uuid.uuid4().hex[:6]}"
        self.begin: Begin = begin_for(archive, name, version, chunk_size, transfer_id=tid,
                                      allow_downgrade=allow_downgrade)
        self.timeout = timeout
        self.progress = progress
        self.reconnects = 0
        self.chunks_sent = 0
        self._events: queue.Queue[Received] = queue.Queue()
        self._client: MqttClient | None = None
        self._tracks: dict[str, _Track] = {}
        self._grants: dict[str, DowngradeGrant] = {}  # per device or group, signed once per push
        self._t0 = time.monotonic()

    @property
    def transfer_id(self) -> str:
        return self.begin.transfer_id

    def push(self, devices: Sequence[str], group: str | None = None) -> list[DeviceResult]:
        """Send to `devices` (on their own topics), or to `group` (one copy on the group topic) expecting acks
        from `devices`. Returns one result per device, in the given order."""
        if not devices:
            raise FleetError("No target devices: name them with --device, or check the group has online members")
        self._t0 = time.monotonic()
        deadline = self._t0 + self.timeout
        self._tracks = {d: _Track(DeviceResult(d, chunks=self.begin.chunks)) for d in devices}
        try:
            self._connect(deadline)
            self._run(group, deadline)
        finally:
            if self._client is not None:
                self._client.close()
        for t in self._tracks.values():
            if not t.final and t.probation_until:
                t.result.state = "timeout"
                t.result.error = (f"Activated, but the device reported no probation result within "
                                  f"{self.timeout:g} s (or its announced probation + {PROBATION_MARGIN_S:g} s); "
                                  "check 'edgecv devices' and its model/state")
                t.result.seconds = round(time.monotonic() - self._t0, 2)
            elif not t.final:
                t.result.state = "timeout"
                t.result.error = t.result.error or (
                    f"No final model state within {self.timeout:g} s (device received {t.result.received}/"
                    f"{t.result.chunks} chunks{', transfer complete' if t.complete else ''}); is it online?")
                t.result.seconds = round(time.monotonic() - self._t0, 2)
        return [self._tracks[d].result for d in devices]

    # ------------------------------------------------------------------ connection
    def _connect(self, deadline: float) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            client = MqttClient(self.options)
            try:
                client.connect(timeout=min(10.0, max(0.5, deadline - time.monotonic())))
                for flt in (f"{self.prefix}/+/model/push/{self.transfer_id}/ack", T.fleet_filter(self.prefix,
                                                                                                  "model/state")):
                    client.subscribe(flt, callback=self._events.put)
                self._client = client
                return
            except FleetError as exc:
                client.close()
                last = exc
                time.sleep(0.5)
        raise FleetError(f"Could not (re)connect to the broker before the push timeout: {last}")

    def _connected(self) -> bool:
        return self._client is not None and self._client.connected

    def _reconnect(self, deadline: float) -> None:
        self.reconnects += 1
        log.warning("Lost the broker connection; reconnecting to resume transfer %s", self.transfer_id)
        if self._client is not None:
            self._client.close()
        self._client = None
        self._connect(deadline)

    def _topic(self, device: str | None, group: str | None, part: str) -> str:
        if group is not None:
            return T.group_push(self.prefix, group, self.transfer_id, part)
        assert device is not None
        return T.DeviceTopics(self.prefix, device).push(self.transfer_id, part)

    def _begin_payload(self, target: str) -> bytes:
        """The begin message for one device or group: with a downgrade grant signed for that target when asked."""
        if self.grant_key is None:
            return self.begin.to_payload()
        if target not in self._grants:
            self._grants[target] = grant_downgrade(self.grant_key, self.begin.sha256, target,
                                                   valid_s=max(DEFAULT_GRANT_S, self.timeout + 600))
        return replace(self.begin, downgrade_grant=self._grants[target]).to_payload()

    def _publish_begin(self, open_: list[_Track], group: str | None) -> None:
        if group is not None:
            self._publish([self._topic(None, group, "begin")], self._begin_payload(group))
            return
        for t in open_:
            self._publish([self._topic(t.result.device, None, "begin")], self._begin_payload(t.result.device))

    def _publish(self, topics: Sequence[str], payload: bytes) -> list[Any]:
        assert self._client is not None
        return [self._client.paho.publish(t, payload, qos=1) for t in topics]

    # ------------------------------------------------------------------ protocol
    def _run(self, group: str | None, deadline: float) -> None:
        need_begin = True
        send: set[int] = set()
        while time.monotonic() < max(deadline, *(t.probation_until for t in self._tracks.values())):
            if all(t.final for t in self._tracks.values()):
                return
            if not self._connected():
                self._reconnect(deadline)
                need_begin = True
            for t in self._tracks.values():
                if t.complete and not t.final and not t.probation_until and time.monotonic() - t.complete_at > REASK_S:
                    # still no final state: ask again; a device still verifying answers `complete`, one that
                    # restarted and lost the finished transfer answers with everything missing (sent again)
                    t.complete = False
                    need_begin = True
            open_ = [t for t in self._tracks.values() if not t.complete and not t.final]
            if not open_:
                self._drain(timeout=0.2)  # everything delivered: wait for the final model states
                continue
            try:
                if need_begin:
                    self._round(open_, group, "begin", deadline, wait=1.0)
                    if not any(t.acked for t in open_):
                        continue  # nobody answered yet: ask again
                    need_begin = False
                    send |= {i for t in open_ if t.acked and not t.complete for i in t.missing}
                    open_ = [t for t in open_ if not t.complete and not t.final]
                if send and open_:
                    self._send_chunks(sorted(send), open_, group, deadline)
                send = set()
                if not open_:
                    continue
                self._round(open_, group, "end", deadline, wait=RESEND_AFTER_S)
                for t in open_:
                    if t.complete or t.final:
                        continue
                    if not t.acked or (t.ack is not None and t.ack.state == UNKNOWN):
                        need_begin = True  # silent or lost device: ask where it is (resume) next round
                    else:
                        send |= t.missing
            except (RuntimeError, ValueError, FleetError) as exc:  # paho raises when the link dropped mid-way
                log.debug("Publish failed (%s); will reconnect", exc)
                time.sleep(0.2)

    def _targets(self, open_: list[_Track], group: str | None, part: str) -> list[str]:
        if group is not None:
            return [self._topic(None, group, part)]
        return [self._topic(t.result.device, None, part) for t in open_]

    def _round(self, open_: list[_Track], group: str | None, part: str, deadline: float, wait: float) -> None:
        """Publish begin or end and collect the acks it triggers."""
        for t in open_:
            t.acked = False
        if part == "begin":
            self._publish_begin(open_, group)
        else:
            self._publish(self._targets(open_, group, part), b"{}")
        until = min(deadline, time.monotonic() + wait)
        while time.monotonic() < until and not all(t.acked or t.final for t in open_):
            self._drain(timeout=min(0.1, max(0.0, until - time.monotonic())))
            if not self._connected():
                return

    def _send_chunks(self, indices: list[int], open_: list[_Track], group: str | None, deadline: float) -> None:
        pending: list[tuple[int, list[Any]]] = []
        for n, index in enumerate(indices):
            payload = encode_chunk(chunk_data(self.archive, self.begin, index))
            pending.append((index, self._publish(self._targets(open_, group, f"chunk/{index}"), payload)))
            while len(pending) > WINDOW or (n == len(indices) - 1 and pending):
                idx, infos = pending.pop(0)
                for info in infos:
                    while not info.is_published():
                        if not self._connected() or time.monotonic() > deadline:
                            raise FleetError("Connection lost while sending chunks")
                        info.wait_for_publish(0.2)
                self.chunks_sent += 1
                if self.progress is not None:
                    self.progress(len(chunk_data(self.archive, self.begin, idx)) * len(infos))
            self._drain(timeout=0)

    def _drain(self, timeout: float) -> None:
        """Apply queued acks and model states to the devices' tracks."""
        try:
            msg = self._events.get(timeout=timeout) if timeout > 0 else self._events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(msg)
            try:
                msg = self._events.get_nowait()
            except queue.Empty:
                return

    def _apply(self, msg: Received) -> None:
        parsed = T.parse_device_topic(self.prefix, msg.topic)
        if parsed is None or parsed[0] not in self._tracks:
            return
        t = self._tracks[parsed[0]]
        try:
            doc = msg.json()
        except ValueError:
            return
        if parsed[1] == "model/state":
            if doc.get("transfer") != self.transfer_id or doc.get("state") not in FINAL_STATES or t.final:
                return
            probation = doc.get("probation")
            if doc["state"] == "active" and probation == "running" and self.wait_probation:
                if not t.probation_until:  # active, on probation: the final word comes later
                    t.complete = t.acked = True
                    t.result.state, t.result.version, t.result.error = "active", doc.get("version"), None
                    t.result.received, t.result.probation = t.result.chunks, "running"
                    seconds = doc.get("probation_s")
                    wait = float(seconds) if isinstance(seconds, int | float) and seconds >= 0 else 0.0
                    t.probation_until = time.monotonic() + wait + PROBATION_MARGIN_S
                return
            t.final = t.complete = t.acked = True
            t.result.state, t.result.version, t.result.error = doc["state"], doc.get("version"), doc.get("error")
            if doc["state"] == "rolled_back" and t.probation_until:
                t.result.probation = "failed"
            elif isinstance(probation, str):
                t.result.probation = probation
            t.result.received = t.result.chunks
            t.result.seconds = round(time.monotonic() - self._t0, 2)
            return
        try:
            ack = Ack.from_payload(msg.payload)
        except ValueError:
            return
        t.ack, t.acked = ack, True
        if ack.state == COMPLETE:
            t.complete, t.missing, t.result.received = True, set(), ack.chunks
            t.complete_at = time.monotonic()
        elif ack.state in (RECEIVING, STALLED):
            t.missing, t.result.received = set(ack.missing_indices()), ack.received
        elif ack.state in (FAILED, SUPERSEDED):
            t.final = t.complete = True
            t.result.state, t.result.error = "failed", ack.error
            t.result.seconds = round(time.monotonic() - self._t0, 2)


def push_to(options: ClientOptions, archive: bytes, name: str, version: str, devices: Sequence[str], *,
            group: str | None = None, prefix: str = T.DEFAULT_PREFIX, chunk_size: int = DEFAULT_CHUNK_SIZE,
            timeout: float = 120.0, progress: Callable[[int], None] | None = None,
            allow_downgrade: bool = False, grant_key: Ed25519PrivateKey | None = None,
            wait_probation: bool = False) -> list[DeviceResult]:
    """Convenience wrapper: one transfer to `devices` (or `group`)."""
    pusher = Pusher(options, archive, name, version, prefix=prefix, chunk_size=chunk_size, timeout=timeout,
                    progress=progress, allow_downgrade=allow_downgrade, grant_key=grant_key,
                    wait_probation=wait_probation)
    return pusher.push(devices, group=group)
