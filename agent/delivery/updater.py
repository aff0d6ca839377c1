"""Receives pushed bundles and makes them the running model: verify, self-test, hot swap, probation, rollback.

Message handling (on the MQTT link's worker thread) only writes chunks to disk and answers acks; everything
slow — signature and hash checks, loading a fresh runtime, the self-test — runs on the updater's own thread,
never on the camera loop. Each step is published retained on `<p>/<dev>/model/state`:

    receiving (with progress) → verifying → active            the new model runs
                                          → rejected          refused; the old model keeps serving
    active → rolled_back                                      failed during probation; previous model restored

Probation: for `update.probation_s` after an activation the new classifier's classify() calls are watched. Run-
time errors (PROBATION_MAX_ERRORS of them), or a median latency above `LATENCY_FACTOR` × the self-test median
+ `LATENCY_SLACK_MS`, roll back to the previous model automatically.
"""

from __future__ import annotations

import logging
import queue
import re
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from edgecv.agent import __version__ as AGENT_VERSION
from edgecv.agent.config import AgentConfig
from edgecv.agent.contract import topics as T
from edgecv.agent.contract.bundle import Bundle
from edgecv.agent.contract.signing import Keyring
from edgecv.agent.contract.transfer import (
    COMPLETE,
    FAILED,
    Ack,
    Begin,
    Receiver,
    TransferError,
    parse_push_topic,
)
from edgecv.agent.delivery.store import ModelStore
from edgecv.agent.errors import BundleError, EdgecvError, IncompatibleBundleError, StoreError
from edgecv.agent.link.protocol import Link
from edgecv.agent.vision.classifier import Classifier, run_selftest
from edgecv.agent.vision.runtimes import candidates
from edgecv.agent.vision.selection import choose_classifier

log = logging.getLogger(__name__)

PROBATION_MAX_ERRORS = 3
PROBATION_MIN_FRAMES = 5  # latency is judged only once this many frames ran on the new model
LATENCY_FACTOR = 3.0
LATENCY_SLACK_MS = 5.0
MAX_INPUT_PIXELS = 4096 * 4096
TICK_S = 0.25
FINAL_STATES = ("active", "rejected", "rolled_back")
REMEMBER_TRANSFERS = 32


def parse_version(text: str) -> tuple[int, ...]:
    """'1.2.3rc1' → (1, 2, 3): the numeric release part, for min_agent_version checks."""
    nums = []
    for part in text.split("."):
        m = re.match(r"\d+", part)
        if not m:
            break
        nums.append(int(m.group()))
    return tuple(nums)


def check_compatible(bundle: Bundle, runtime: str = "auto") -> None:
    """Raise IncompatibleBundleError unless this agent can run the bundle."""
    m = bundle.manifest
    if parse_version(m.min_agent_version) > parse_version(AGENT_VERSION):
        raise IncompatibleBundleError(f"Bundle {m.name} {m.version} needs agent {m.min_agent_version} or newer; "
                                      f"this agent is {AGENT_VERSION}: upgrade edgecv on the device")
    if not candidates(bundle, runtime):
        arts = ", ".join(f"{a.format}/{a.precision}" for a in m.artifacts)
        raise IncompatibleBundleError(f"No runtime on this device can run bundle {m.name} {m.version} (artifacts: "
                                      f"{arts}; model.runtime = {runtime!r}); install onnxruntime or ai-edge-litert")
    spec = m.input
    if spec.width * spec.height > MAX_INPUT_PIXELS:
        raise IncompatibleBundleError(f"Bundle input {spec.width}x{spec.height} is larger than this agent "
                                      "supports; rebuild it with a smaller input size")


@dataclass
class Probe:
    """Counts errors and latencies of one classifier's classify() calls while it is on probation."""

    baseline_ms: float
    started: float = field(default_factory=time.monotonic)
    errors: int = 0
    last_error: str = ""
    infer_ms: list[float] = field(default_factory=list)

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def classify(*args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                self.errors += 1
                self.last_error = str(exc)
                raise
            self.infer_ms.append(float(result.latency_ms.get("infer", 0.0)))
            return result
        return classify

    def verdict(self) -> str | None:
        """A reason to roll back, or None."""
        if self.errors >= PROBATION_MAX_ERRORS:
            return f"{self.errors} inference errors during probation (last: {self.last_error})"
        if len(self.infer_ms) >= PROBATION_MIN_FRAMES and self.baseline_ms == self.baseline_ms:
            p50 = statistics.median(self.infer_ms[-50:])
            limit = LATENCY_FACTOR * self.baseline_ms + LATENCY_SLACK_MS
            if p50 > limit:
                return (f"median inference {p50:.1f} ms during probation exceeds {limit:.1f} ms "
                        f"({LATENCY_FACTOR:g}x the self-test's {self.baseline_ms:.1f} ms + {LATENCY_SLACK_MS:g} ms)")
        return None


class ModelHost(Protocol):
    """What runs the model: the updater reads the current classifier and swaps in a new one between frames."""

    @property
    def classifier(self) -> Classifier | None: ...

    def swap_classifier(self, new: Classifier) -> Classifier | None:
        """Make `new` the model from the next frame on; returns the old one."""
        ...


class Updater:
    """Wires the push protocol to the model store and the model host. `start()` subscribes."""

    def __init__(self, config: AgentConfig, topics: T.DeviceTopics, link: Link, store: ModelStore,
                 keyring: Keyring | None, host: ModelHost) -> None:
        cfg = self.cfg = config
        self.topics = topics
        self.link = link
        self.store = store
        self.keyring = keyring
        self.host = host
        transfers = Path(cfg.update.staging) if cfg.update.staging else self.store.transfers_dir()
        self.receiver = Receiver(transfers, cfg.device_id, max_bytes=cfg.update.max_bundle_bytes)
        self._jobs: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._probation: tuple[Classifier, Probe, str | None] | None = None
        self._last_progress = 0.0
        self._swap_lock = threading.RLock()
        self._lock = threading.Lock()
        self._finished: OrderedDict[str, bytes] = OrderedDict()  # final model/state payload by transfer id

    # ------------------------------------------------------------------ lifecycle
    def load_active(self) -> Classifier:
        """At start: the store's active model (installing the configured seed bundle into an empty store), loaded
        in its runtime and handed to the host. Raises NoModelError on a fresh device with nothing to run."""
        cfg = self.cfg
        bundle = self.store.ensure_model(cfg.model.bundle or None, keyring=self.keyring,
                                         allow_unsigned=cfg.security.allow_unsigned)
        classifier = self._load(bundle)
        self.host.swap_classifier(classifier)
        return classifier

    def start(self) -> Updater:
        link = self.link
        link.subscribe(self.topics.push_filter, self._on_push)
        for group in self.cfg.groups:
            link.subscribe(T.group_push_filter(self.cfg.prefix, group), self._on_push)
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()
        current = self.host.classifier
        if current is not None:
            self._state("active", current.bundle)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.receiver.close()

    # ------------------------------------------------------------------ public operations (commands use them)
    def rollback(self, to: str | None = None, reason: str = "Rollback requested",
                 transfer: str | None = None) -> Bundle:
        """Re-activate the previous (or named) version and swap it in. Raises StoreError/BundleError."""
        with self._swap_lock:
            old = self.store.current()
            bundle = self.store.rollback(to)
            try:
                new = self._load(bundle)
            except EdgecvError:
                if old is not None:  # restore the pointer to what is running
                    self.store.activate(old)
                raise
            self._probation = None
            self._swap(new)
            self._state("rolled_back", bundle, error=reason, transfer=transfer)
            log.warning("Rolled back to %s %s: %s", bundle.manifest.name, bundle.manifest.version, reason)
            return bundle

    def reload(self) -> Bundle:
        """Load the store's current model into a fresh runtime and swap it in."""
        with self._swap_lock:
            bundle = self.store.current()
            if bundle is None:
                raise StoreError("The model store has no current model to reload")
            new = self._load(bundle)
            self._probation = None
            self._swap(new)
            self._state("active", bundle)
            return bundle

    # ------------------------------------------------------------------ MQTT side (link worker thread)
    def _on_push(self, topic: str, payload: bytes) -> None:
        parsed = parse_push_topic(topic)
        if parsed is None:
            return
        transfer_id, part, index = parsed
        if part == "ack":
            return  # our own acks come back on the device push filter
        if part == "begin":
            try:
                begin = Begin.from_payload(payload)
            except TransferError as exc:
                log.warning("Ignoring malformed push begin on %s: %s", topic, exc)
                return
            with self._lock:
                outcome = self._finished.get(begin.transfer_id)
            if outcome is not None and self.receiver.active is None and self.receiver.completed is None:
                # a pusher asking about a transfer that is already over: repeat the outcome (not retained, so the
                # retained state still shows the newest event) instead of receiving it all again
                self._ack(Ack(begin.transfer_id, self.cfg.device_id, COMPLETE, begin.chunks, begin.chunks))
                self.link.publish(self.topics.model_state, outcome, qos=1, retain=False)
                return
            acks = self.receiver.begin(begin)
            for ack in acks:
                self._ack(ack)
            last = acks[-1]
            if last.state == FAILED:
                self._state("rejected", None, begin=begin, error=last.error)
            elif last.state != COMPLETE:
                self._state("receiving", None, begin=begin, progress=last.received / max(1, last.chunks))
        elif part == "chunk" and index is not None:
            active = self.receiver.active
            progress = self.receiver.chunk(transfer_id, index, payload)
            if progress is not None:
                self._ack(progress)
                if progress.state == FAILED:
                    self._state("rejected", None, begin=active, error=progress.error)
                else:
                    self._state("receiving", None, begin=active,
                                progress=progress.received / max(1, progress.chunks))
        elif part == "end":
            active = self.receiver.active
            was_done = self.receiver.completed
            ack = self.receiver.end(transfer_id)
            self._ack(ack)
            if ack.state == FAILED:
                self._state("rejected", None, begin=active, error=ack.error)
            elif ack.state == COMPLETE and self.receiver.completed is not None and was_done is None:
                begin, archive = self.receiver.completed
                self._state("verifying", None, begin=begin)
                self._jobs.put(("install", (begin, archive)))

    def _ack(self, ack: Ack) -> None:
        self.link.publish(self.topics.push_ack(ack.transfer_id), ack.to_payload(), qos=1)

    def _state(self, state: str, bundle: Bundle | None, *, begin: Begin | None = None, error: str | None = None,
               progress: float | None = None, transfer: str | None = None) -> None:
        name: str | None
        version: str | None
        sha: str | None
        if bundle is not None:
            name, version, sha = bundle.manifest.name, bundle.manifest.version, bundle.manifest_sha256
        elif begin is not None:
            name, version, sha = begin.name, begin.version, begin.sha256
        else:
            name = version = sha = None
        payload = T.model_state_payload(self.cfg.device_id, state, name=name, version=version, sha256=sha,
                                        error=error, transfer=begin.transfer_id if begin else transfer)
        if progress is not None:
            payload["progress"] = round(progress, 3)
        data = T.encode(payload)
        if payload["transfer"] and state in FINAL_STATES:
            with self._lock:
                self._finished[payload["transfer"]] = data
                self._finished.move_to_end(payload["transfer"])
                while len(self._finished) > REMEMBER_TRANSFERS:
                    self._finished.popitem(last=False)
        self.link.publish(self.topics.model_state, data, qos=1, retain=True)

    # ------------------------------------------------------------------ updater thread
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._jobs.get(timeout=TICK_S)
            except queue.Empty:
                job = ("tick", None)
            if job is None:
                return
            kind, arg = job
            try:
                if kind == "install":
                    self._install(*arg)
                self._check_probation()
                stalled = self.receiver.stalled(self.cfg.update.chunk_timeout_s)
                if stalled is not None:
                    log.warning("Transfer %s stalled: %d of %d chunks", stalled.transfer_id, stalled.received,
                                stalled.chunks)
                    self._ack(stalled)
            except Exception:
                log.exception("Updater step %s failed", kind)

    def _install(self, begin: Begin, archive: Path) -> None:
        transfer = begin.transfer_id
        installed: Bundle | None = None
        try:
            with self._swap_lock:
                installed = self.store.install(archive, self.keyring, self.cfg.security.allow_unsigned,
                                               self.cfg.update.max_bundle_bytes)
                check_compatible(installed, self.cfg.model.runtime)
                new = self._load(installed)
                report = run_selftest(new)
                report.raise_for_failure()
                previous = self.store.current()
                if previous is not None and previous.root == installed.root:
                    log.info("Pushed bundle is the one already active; reloading it")
                self.store.activate(installed)
                probe = Probe(baseline_ms=report.median_infer_ms)
                new.classify = probe.wrap(new.classify)  # type: ignore[method-assign]
                self._swap(new)
                self._probation = (new, probe, transfer) if self.cfg.update.probation_s > 0 else None
                if self._probation is None:
                    del new.classify
            self._state("active", installed, begin=begin)
            log.info("Model %s %s active (%s)", begin.name, begin.version, report.detail)
        except (BundleError, StoreError, EdgecvError) as exc:
            log.warning("Rejected pushed bundle %s %s: %s", begin.name, begin.version, exc)
            if installed is not None:
                try:
                    self.store.remove(installed)
                except (StoreError, EdgecvError) as rm_exc:
                    log.warning("Could not remove refused bundle: %s", rm_exc)
            self._state("rejected", None, begin=begin, error=str(exc))
        finally:
            self.receiver.finish(transfer)

    def _check_probation(self) -> None:
        if self._probation is None:
            return
        clf, probe, transfer = self._probation
        reason = probe.verdict()
        if reason is None:
            if time.monotonic() - probe.started >= self.cfg.update.probation_s:
                log.info("Model %s %s passed probation", clf.name, clf.version)
                self._probation = None
                try:
                    del clf.classify  # back to the plain method
                except AttributeError:
                    pass
            return
        self._probation = None
        failed = f"{clf.name} {clf.version}"
        try:
            self.rollback(reason=f"Model {failed} rolled back: {reason}", transfer=transfer)
        except EdgecvError as exc:
            log.error("Model %s failed probation (%s) but rollback failed: %s", failed, reason, exc)

    def _load(self, bundle: Bundle) -> Classifier:
        """The bundle's fastest (artifact, runtime) pair on this device that passes its self-test (measured)."""
        m = self.cfg.model
        classifier, _ = choose_classifier(bundle, runtime=m.runtime, threads=m.threads,
                                          top_k=self.cfg.publish.top_k, min_score=self.cfg.publish.min_score)
        return classifier

    def _swap(self, new: Classifier) -> None:
        old = self.host.swap_classifier(new)
        if old is not None and "classify" in vars(old):
            del old.classify  # drop a probation wrapper: it references the classifier (a cycle)
        del old  # no cycle left: reference counting frees the old runtime at once (a gc pass would stall frames)
