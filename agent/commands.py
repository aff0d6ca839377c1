"""Fleet commands a workstation sends to one device: ping, reload, snapshot, rollback, and sample collection.

Requests arrive on `<p>/<dev>/cmd/<name>` as JSON `{"id": "<request id>", ...}`; each gets exactly one result on
`<p>/<dev>/cmd/<name>/result`: `{"id", "ok", "device", "ts", ...}` plus `error` when ok is false.

    ping      → agent_version, model {name, version, sha256}, uptime_s
    reload    → re-load the store's current model in a fresh runtime and swap it in → model
    snapshot  → the latest frame as a base64 JPEG (`jpeg`, `width`, `height`) and the current `top` predictions
    rollback  → {"to": version (optional)}: re-activate the previous (or named) installed model → model
    samples   → {"after": id|null, "limit": n}: a page of stored samples in id order → samples [...], more
    sample    → {"sample": id, "offset": n, "length": n}: one chunk of a sample's JPEG → data (base64), offset,
                bytes (total), sha256
    samples.delete → {"samples": [id, ...]}: remove them → deleted, missing [...]

The sample commands' fields are parsed by agent/contract/samples.py (ids validated before any path is formed,
lengths capped) and served by the SampleStore (agent/samples/store.py).
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from typing import Any, Protocol

from edgecv.agent import __version__ as AGENT_VERSION
from edgecv.agent.contract import samples as S
from edgecv.agent.contract import topics as T
from edgecv.agent.contract.bundle import Bundle
from edgecv.agent.contract.commands import RequestError, parse_request
from edgecv.agent.contract.documents import describe
from edgecv.agent.contract.names import MAX_NAME, is_name
from edgecv.agent.errors import EdgecvError, SampleStoreError
from edgecv.agent.link.protocol import REFUSED, Link
from edgecv.agent.samples.store import SampleStore
from edgecv.agent.vision.camera import Frame
from edgecv.agent.vision.classifier import Classifier

log = logging.getLogger(__name__)


class DeviceView(Protocol):
    """What the commands read from the running device: its model and the latest frame with its predictions."""

    @property
    def classifier(self) -> Classifier | None: ...

    last_frame: Frame | None
    last_top: list[dict[str, Any]] | None


class ModelControl(Protocol):
    """What `reload` and `rollback` ask of the model updater."""

    def reload(self) -> Bundle: ...

    def rollback(self, to: str | None = None, reason: str = "Rollback requested") -> Bundle: ...


class CommandHandler:
    """Subscribes to the device's command topics and answers them; slow commands run on its own thread."""

    def __init__(self, device_id: str, topics: T.DeviceTopics, link: Link, device: DeviceView,
                 control: ModelControl | None = None, samples: SampleStore | None = None) -> None:
        self.device_id = device_id
        self.samples = samples
        self.topics = topics
        self.link = link
        self.device = device
        self.control = control
        self.started = time.monotonic()
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(maxsize=100)
        self._thread: threading.Thread | None = None

    def start(self) -> CommandHandler:
        self.link.subscribe(self.topics.cmd_filter, self._on_command)
        self._thread = threading.Thread(target=self._run, name="commands", daemon=True)
        self._thread.start()
        return self

    @property
    def threads(self) -> list[threading.Thread]:
        return [self._thread] if self._thread is not None else []

    def stop(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _on_command(self, topic: str, payload: bytes) -> None:
        """Parse strictly (agent/contract/commands.py), then answer: every request gets exactly one result."""
        try:
            parsed = parse_request(topic.rsplit("/", 1)[-1], payload)
        except RequestError as exc:
            self._reply(exc.name, {"id": exc.request_id}, ok=False, error=str(exc))
            return
        name, request = parsed.name, parsed.body
        if name not in T.COMMANDS:
            self._reply(name, request, ok=False, error=f"Unknown command {name!r}; known: {', '.join(T.COMMANDS)}")
            return
        if name == "ping":
            self._execute(name, request)
            return
        try:
            self._queue.put_nowait((name, request))
        except queue.Full:
            self._reply(name, request, ok=False, error="Device is busy with other commands; try again")

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._execute(*item)

    def _execute(self, name: str, request: dict[str, Any]) -> None:
        try:
            result = getattr(self, f"_cmd_{name.replace('.', '_')}")(request)
        except EdgecvError as exc:
            self._reply(name, request, ok=False, error=str(exc))
        except Exception as exc:
            log.exception("Command %s failed", name)
            self._reply(name, request, ok=False, error=f"Command {name} failed unexpectedly: {exc}")
        else:
            self._reply(name, request, ok=True, **result)

    def _reply(self, name: str, request: dict[str, Any], *, ok: bool, **fields: Any) -> None:
        if "error" in fields:
            fields["error"] = T.bounded(fields["error"])
        payload = {"id": request.get("id"), "ok": ok, "device": self.device_id, "ts": T.now(), **fields}
        try:
            data = T.encode(payload)
        except (TypeError, ValueError) as exc:  # a result that is not JSON: still answer, without it
            log.error("Result of command %s is not JSON (%s); answering with an error", name, exc)
            data = T.encode({"id": request.get("id"), "ok": False, "device": self.device_id,
                             "ts": T.now(), "error": f"Command {name} produced a result that is not JSON"})
            ok = False
        if self.link.publish(self.topics.cmd_result(name), data, qos=1) == REFUSED and ok:
            # The result itself cannot be sent (e.g. a snapshot larger than a message may be): say so instead, so
            # the command still gets its one result.
            self._reply(name, request, ok=False, error=f"The result of {name} ({len(data)} bytes) is too large to "
                                                       "publish; use a smaller camera resolution for snapshots")

    # ------------------------------------------------------------------ commands
    def _model(self) -> dict[str, Any] | None:
        clf = self.device.classifier
        if clf is None:
            return None
        return {"name": clf.name, "version": clf.version, "sha256": clf.bundle.manifest_sha256}

    def _cmd_ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"agent_version": AGENT_VERSION, "model": self._model(),
                "uptime_s": round(time.monotonic() - self.started, 3)}

    def _cmd_reload(self, request: dict[str, Any]) -> dict[str, Any]:
        self._need_control().reload()
        return {"model": self._model()}

    def _cmd_rollback(self, request: dict[str, Any]) -> dict[str, Any]:
        to = request.get("to")
        if to is not None and not is_name(to, MAX_NAME + 16):
            raise EdgecvError(f"rollback: 'to' must be an installed version, directory name or sha256 prefix "
                              f"(letters, digits, '.', '_', '-'), got {describe(to)}")
        self._need_control().rollback(to=to, reason=f"Rollback requested (request {request.get('id')})")
        return {"model": self._model()}

    def _cmd_snapshot(self, request: dict[str, Any]) -> dict[str, Any]:
        import cv2

        frame = self.device.last_frame
        if frame is None:
            raise EdgecvError("No frame captured yet; check the camera status and try again")
        image = frame.image
        ok, jpeg = cv2.imencode(".jpg", image, [int(cv2.IMWRITE_JPEG_QUALITY), 85])
        if not ok:
            raise EdgecvError("Could not encode the latest frame as JPEG")
        return {"jpeg": base64.b64encode(jpeg.tobytes()).decode(), "width": int(image.shape[1]),
                "height": int(image.shape[0]), "frame_ts": frame.ts, "top": self.device.last_top,
                "model": self._model()}

    def _cmd_samples(self, request: dict[str, Any]) -> dict[str, Any]:
        page = S.parse_list(request)
        found, more = self._need_samples().page(page.after, page.limit, S.PAGE_BUDGET_BYTES)
        return {"samples": [s.listing() for s in found], "more": more}

    def _cmd_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        chunk = S.parse_chunk(request)
        sample, data = self._need_samples().read(chunk.sample, chunk.offset, chunk.length)
        return {"sample": sample.id, "offset": chunk.offset, "data": base64.b64encode(data).decode(),
                "bytes": sample.bytes, "sha256": sample.sha256}

    def _cmd_samples_delete(self, request: dict[str, Any]) -> dict[str, Any]:
        ids = S.parse_delete(request)
        deleted, missing = self._need_samples().delete(ids)
        return {"deleted": deleted, "missing": missing}

    def _need_samples(self) -> SampleStore:
        if self.samples is None:
            raise SampleStoreError("Sample collection is off on this device; set [samples] enabled = true in its "
                                   "config")
        return self.samples

    def _need_control(self) -> ModelControl:
        if self.control is None:
            raise EdgecvError("This agent runs without the model updater; restart it with updates enabled")
        return self.control
