"""Receives pushed bundles and makes them the running model: verify, self-test, hot swap, probation, rollback.

Message handling (on the MQTT link's worker thread) only writes chunks to disk and answers acks; everything
slow — signature and hash checks, loading a fresh runtime, the self-test — runs on the updater's own thread,
never on the camera loop. Each step is published retained on `<p>/<dev>/model/state`:

    receiving (with progress) → verifying → active            the new model runs
                                          → rejected          refused; the old model keeps serving
    active → rolled_back                                      failed during probation; previous model restored
    active (probation "running") → active (probation "passed")   survived its probation

Budgets: every self-test runs with a time limit (`update.selftest_timeout_s`) and against the device's latency
budget (`update.max_latency_ms`, by default one frame period of the fastest camera: `AgentConfig.latency_budget_ms`).
The self-test runs without the swap lock, so a `rollback` or `reload` command never waits for it.

Probation: for `update.probation_s` after an activation the new classifier's classify() calls are watched. Run-
time errors (PROBATION_MAX_ERRORS of them), a median latency above `LATENCY_FACTOR` × the self-test median
+ `LATENCY_SLACK_MS`, or a median latency per frame above the device budget, roll back to the previous model
automatically; a model that survives is announced with `probation: "passed"`.

At start (`load_active`) the active bundle's self-test runs in the runtime chosen for it; on failure the other
installed runtime is tried, then the previous version and the other installed ones. The outcome is published on
`model/state` (and the status's `model_error`); a device with no passing model serves none and waits for a push.
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
from edgecv.agent.contract.bundle import Bundle, load_bundle, verify_bundle
from edgecv.agent.contract.grants import GrantError, check_grant
from edgecv.agent.contract.names import is_name, shown
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
from edgecv.agent.contract.versions import compare as compare_versions
from edgecv.agent.delivery.store import ModelStore
from edgecv.agent.errors import (
    BundleError,
    DowngradeError,
    EdgecvError,
    IncompatibleBundleError,
    NoModelError,
    StoreError,
)
from edgecv.agent.link.protocol import Link
from edgecv.agent.vision.classifier import Classifier, SelfTestReport, run_selftest
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
PROBATION_RUNNING, PROBATION_PASSED = "running", "passed"


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
    budget_ms: float | None = None  # the device's absolute budget per frame (median total latency)
    started: float = field(default_factory=time.monotonic)
    errors: int = 0
    last_error: str = ""
    infer_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def classify(*args: Any, **kwargs: Any) -> Any:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                self.errors += 1
                self.last_error = str(exc)
                raise
            latency = result.latency_ms
            self.infer_ms.append(float(latency.get("infer", 0.0)))
            self.total_ms.append(float(latency.get("total", 0.0)))
            return result
        return classify

    def verdict(self) -> str | None:
        """A reason to roll back, or None."""
        if self.errors >= PROBATION_MAX_ERRORS:
            return f"{self.errors} inference errors during probation (last: {self.last_error})"
        # The device's absolute budget first: when both rules fire, it is the reason that matters to an operator.
        if self.budget_ms is not None and len(self.total_ms) >= PROBATION_MIN_FRAMES:
            total = statistics.median(self.total_ms[-50:])
            if total > self.budget_ms:
                return (f"median latency {total:.1f} ms per frame during probation exceeds the device's budget of "
                        f"{self.budget_ms:.1f} ms (update.max_latency_ms)")
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
                 keyring: Keyring | None, host: ModelHost,
                 on_model_problem: Callable[[str | None], None] | None = None) -> None:
        cfg = self.cfg = config
        self.budget_ms = cfg.latency_budget_ms()
        self._on_model_problem = on_model_problem  # tells the status why no (or another) model runs
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
        self._retained_state: bytes | None = None  # the newest retained model/state payload
        self._startup: tuple[str, Bundle | None, str | None] | None = None  # the start-up self-test's outcome
        self._problem_shown = False

    # ------------------------------------------------------------------ lifecycle
    def load_active(self) -> Classifier:
        """At start: the store's active model (installing the configured seed bundle into an empty store), loaded
        in its runtime, self-tested there and handed to the host. Raises NoModelError on a fresh device with
        nothing to run, or when no installed model passes its self-test (see `_startup_selftest`)."""
        cfg = self.cfg
        bundle = self.store.ensure_model(cfg.model.bundle or None, keyring=self.keyring,
                                         allow_unsigned=cfg.security.allow_unsigned)
        classifier = self._startup_selftest(bundle)
        self.host.swap_classifier(classifier)
        return classifier

    def _startup_selftest(self, active: Bundle) -> Classifier:
        """A model is served only if it passes its own self-test here: the active bundle in each runtime that can
        run it (the preferred one first), then the previous version, then the other installed versions, newest
        first. What happened is remembered for `start()` to publish."""
        failures: list[str] = []
        clf = self._first_passing(active, failures)
        if clf is not None:
            if failures:
                # The outcome first: a published reason is cut to a bounded length, the details come last.
                why = (f"Model {_label(active)} failed its self-test; running it on {clf.engine.name} instead "
                       f"({'; '.join(failures)})")
                log.warning("%s", why)
                self._startup = ("active", active, why)
                self._model_problem(why)
            return clf
        for bundle in self._fallbacks(active):
            clf = self._first_passing(bundle, failures)
            if clf is None:
                continue
            try:
                self.store.activate(bundle)
            except StoreError as exc:
                log.warning("Could not make %s the active model: %s", _label(bundle), exc)
            why = (f"Model {_label(active)} failed its self-test at start; fell back to {_label(bundle)} "
                   f"({'; '.join(failures)})")
            log.error("%s", why)
            self._startup = ("rolled_back", bundle, why)
            self._model_problem(why)
            return clf
        why = (f"No installed model passes its self-test on this device ({'; '.join(failures)}); serving no model "
               "and waiting for a push")
        log.error("%s", why)
        self._startup = ("idle", active, why)
        self._model_problem(why)
        raise NoModelError(why)

    def _first_passing(self, bundle: Bundle, failures: list[str]) -> Classifier | None:
        """The bundle in the fastest runtime where it passes its self-test here, within the budgets; failures are
        appended. The measured choice (`_load`) self-tests every candidate already (in a child process when several
        runtime libraries are involved); the chosen one is self-tested again here, in this process and within the
        device's budgets, and should that fail, the other runtimes are tried one at a time."""
        try:
            clf = self._load(bundle)
        except EdgecvError as exc:
            failures.append(f"{_label(bundle)}: {exc}")
            return None
        choice = clf.runtime_choice or {}
        failures.extend(f"{_label(bundle)} on {c['runtime']}: {c['detail']}" for c in choice.get("candidates", ())
                        if c.get("status") == "failed")
        report = self._selftest(clf)
        if report.passed:
            return clf
        failures.append(f"{_label(bundle)} on {clf.engine.name}: {report.detail}")
        pinned = self.cfg.model.runtime
        others = [rt for rt in dict.fromkeys(rt for _, rt in candidates(bundle, pinned)) if rt != clf.engine.name]
        for runtime in others:
            try:
                other = self._load(bundle, runtime=runtime)
            except EdgecvError as exc:
                failures.append(f"{_label(bundle)} on {runtime}: {exc}")
                continue
            report = self._selftest(other)
            if report.passed:
                return other
            failures.append(f"{_label(bundle)} on {runtime}: {report.detail}")
        return None

    def _fallbacks(self, failed: Bundle) -> list[Bundle]:
        """Installed bundles to fall back to, each verified again: previous first, then newest install first."""
        previous = self.store.previous()
        paths = ([previous.root] if previous is not None else []) + [v.path for v in self.store.history()]
        out: list[Bundle] = []
        for path in dict.fromkeys(p.resolve() for p in paths):
            if path == failed.root.resolve():
                continue
            try:
                bundle = load_bundle(path)
                verify_bundle(bundle, self.keyring, allow_unsigned=self.cfg.security.allow_unsigned)
            except (BundleError, OSError) as exc:
                log.warning("Installed model %s cannot be a fallback: %s", path.name, exc)
                continue
            out.append(bundle)
        return out

    def _model_problem(self, why: str | None) -> None:
        """Tell the host's status why no (or a fallback) model runs; None clears it (once)."""
        if why is None and not self._problem_shown:
            return
        self._problem_shown = why is not None
        if self._on_model_problem is not None:
            self._on_model_problem(why)

    def start(self) -> Updater:
        link = self.link
        link.subscribe(self.topics.push_filter, self._on_push)
        for group in self.cfg.groups:
            link.subscribe(T.group_push_filter(self.cfg.prefix, group), self._on_push)
        self._thread = threading.Thread(target=self._run, name="updater", daemon=True)
        self._thread.start()
        current = self.host.classifier
        if self._startup is not None:
            state, bundle, why = self._startup
            self._state(state, bundle, error=why)
        elif current is not None:
            self._state("active", current.bundle)
        return self

    @property
    def threads(self) -> list[threading.Thread]:
        return [self._thread] if self._thread is not None else []

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
                self._selftest(new).raise_for_failure()
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
            self._selftest(new).raise_for_failure()
            self._probation = None
            self._swap(new)
            self._state("active", bundle)
            return bundle

    # ------------------------------------------------------------------ MQTT side (link worker thread)
    def _on_push(self, topic: str, payload: bytes) -> None:
        """Handle one push message; whatever goes wrong, a begin or end is answered with a final state."""
        parsed = parse_push_topic(topic)
        if parsed is None:
            return
        transfer_id, part, index = parsed
        if part == "ack":
            return  # our own acks come back on the device push filter
        if not is_name(transfer_id):
            # Nothing may be built from this id (no ack topic, no directory): answer begin/end with a state only.
            if part in ("begin", "end"):
                self._state("rejected", None, retain=False,
                            error=f"Push {part} refused: transfer id {shown(transfer_id)} is not a safe name (1 to "
                                  "64 letters, digits, '.', '_' or '-')")
            return
        try:
            self._handle_push(transfer_id, part, index, payload)
        except Exception as exc:  # a bug or an I/O error: never leave the transfer without a final state
            log.exception("Push %s of transfer %s failed", part, transfer_id)
            error = f"The device failed while handling push {part}: {_reason(exc)}"
            try:
                ack = self.receiver.abort(transfer_id, error)
                if ack is not None:
                    self._ack(ack)
            finally:
                self._state("rejected", None, error=error, transfer=transfer_id)

    def _handle_push(self, transfer_id: str, part: str, index: int | None, payload: bytes) -> None:
        if part == "begin":
            try:
                begin = Begin.from_payload(payload)
                if begin.transfer_id != transfer_id:
                    raise TransferError(f"Push begin: transfer_id {shown(begin.transfer_id)} differs from the "
                                        f"topic's {transfer_id!r}", transfer_id)
            except TransferError as exc:
                log.warning("Refusing malformed push begin of transfer %s: %s", transfer_id, exc)
                self._ack(Ack(transfer_id, self.cfg.device_id, FAILED, 0, 0, error=str(exc), ts=T.now()))
                self._state("rejected", None, error=str(exc), transfer=transfer_id)
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
               progress: float | None = None, transfer: str | None = None, retain: bool = True,
               probation: str | None = None) -> None:
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
        if probation is not None:  # "running" (for probation_s seconds) or "passed": `edgecv push --wait-probation`
            payload["probation"] = probation
            if probation == PROBATION_RUNNING:
                payload["probation_s"] = self.cfg.update.probation_s
        data = T.encode(payload)
        if payload["transfer"] and state in FINAL_STATES:
            with self._lock:
                self._finished[payload["transfer"]] = data
                self._finished.move_to_end(payload["transfer"])
                while len(self._finished) > REMEMBER_TRANSFERS:
                    self._finished.popitem(last=False)
        if retain:
            with self._lock:
                self._retained_state = data
        self.link.publish(self.topics.model_state, data, qos=1, retain=retain)

    def republish_state(self) -> None:
        """Publish the newest retained model/state again, unchanged (an answer to the announce request)."""
        with self._lock:
            data = self._retained_state
        if data is not None:
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
        """Verify, check, self-test and activate a received archive. Every outcome publishes a final state: any
        failure (a refused bundle, a full disk, or a bug) publishes `rejected` and leaves the old model serving."""
        transfer = begin.transfer_id
        installed_new: Bundle | None = None  # installed by this push (so removed again if refused)
        try:
            known = set(self.store.version_names())
            installed = self.store.install(archive, self.keyring, self.cfg.security.allow_unsigned,
                                           self.cfg.update.max_bundle_bytes)
            if installed.root.name not in known:  # one installed before this push is never removed on refusal
                installed_new = installed
            self._check_downgrade(installed, self.store.current(), begin)
            check_compatible(installed, self.cfg.model.runtime)
            # Loading and self-testing take the time (seconds for a slow model): without the swap lock, so
            # `rollback` and `reload` never wait for them.
            new = self._load(installed)
            report = self._selftest(new)
            report.raise_for_failure()
            probation = self._activate_pushed(installed, new, report, transfer)
            self._state("active", installed, begin=begin, probation=probation)
            log.info("Model %s %s active (%s)", begin.name, begin.version, report.detail)
        except Exception as exc:
            expected = isinstance(exc, BundleError | StoreError | EdgecvError)
            if expected:
                log.warning("Rejected pushed bundle %s %s: %s", begin.name, begin.version, exc)
            else:
                log.exception("Installing pushed bundle %s %s failed unexpectedly", begin.name, begin.version)
            reason = str(exc) if expected else f"The device failed while installing the bundle: {_reason(exc)}"
            self._undo_install(installed_new)
            self._state("rejected", None, begin=begin, error=reason)
        finally:
            self.receiver.finish(transfer)

    def _undo_install(self, installed: Bundle | None) -> None:
        """After a refusal: delete a version this push installed (never the current or previous one)."""
        try:
            if installed is not None:
                self.store.remove(installed)
        except Exception as exc:
            log.warning("Could not clean up the refused bundle: %s", exc)

    def _check_downgrade(self, bundle: Bundle, active: Bundle | None, begin: Begin) -> None:
        """Anti-rollback (docs/DELIVERY.md): refuse a bundle older than the active one, or the same version with
        other content, unless the push asked for it and update.allow_downgrade is "when-asked"; a device that
        requires signed bundles also requires the request to be signed (a grant for this archive, grants.py)."""
        if active is None:
            return
        new, cur = bundle.manifest, active.manifest
        order = compare_versions(new.version, cur.version)
        if order == 1 or (order == 0 and bundle.manifest_sha256 == active.manifest_sha256):
            return
        if order is None:
            problem = (f"version {new.version!r} cannot be ordered against the active {cur.version!r} (neither "
                       "semver nor PEP 440)")
        elif order == 0:
            problem = (f"version {new.version} is the active version but with other content (manifest "
                       f"{bundle.manifest_sha256[:12]} vs {active.manifest_sha256[:12]}); give it a new version")
        else:
            problem = f"version {new.version} is older than the active {cur.version}"
        policy = self.cfg.update.allow_downgrade
        if begin.allow_downgrade and policy == "when-asked":
            if self.cfg.security.allow_unsigned:
                signer = "unsigned: this device accepts unsigned bundles"
            else:  # a device that requires signed bundles requires a signed request too (grants.py)
                try:
                    signer = "signed by key " + check_grant(begin.downgrade_grant, begin.sha256,
                                                            [self.cfg.device_id, *self.cfg.groups], self.keyring)
                except GrantError as exc:
                    raise DowngradeError(f"Refused: {problem}; the push asked for a downgrade but {exc}") from None
            log.warning("Installing %s %s although %s: the push asked for it (--allow-downgrade, %s)", new.name,
                        new.version, problem, signer)
            return
        if begin.allow_downgrade:
            raise DowngradeError(f"Refused: {problem}; this device forbids downgrades (update.allow_downgrade = "
                                 "\"never\"): go back with 'edgecv rollback' instead")
        raise DowngradeError(f"Refused: {problem}; go back with 'edgecv rollback', or push with --allow-downgrade")

    def _activate_pushed(self, installed: Bundle, new: Classifier, report: SelfTestReport,
                         transfer: str) -> str | None:
        """Make a self-tested pushed model the active one (store pointer, then the host) and put it on probation;
        returns the probation state to publish (None without probation)."""
        with self._swap_lock:
            previous = self.store.current()
            if previous is not None and previous.root == installed.root:
                log.info("Pushed bundle is the one already active; reloading it")
            self.store.activate(installed)
            probe = Probe(baseline_ms=report.median_infer_ms, budget_ms=self.budget_ms)
            new.classify = probe.wrap(new.classify)  # type: ignore[method-assign]
            try:
                self._swap(new)
            except BaseException:
                if previous is not None:  # the store points at what still runs
                    self.store.activate(previous)
                raise
            self._probation = (new, probe, transfer) if self.cfg.update.probation_s > 0 else None
            if self._probation is None:
                del new.classify
                return None
            return PROBATION_RUNNING

    def _selftest(self, classifier: Classifier) -> SelfTestReport:
        """The bundle's self-test on this device, within its time limit and the device's latency budget."""
        return run_selftest(classifier, time_limit_s=self.cfg.update.selftest_timeout_s,
                            max_latency_ms=self.budget_ms)

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
                self._state("active", clf.bundle, transfer=transfer, probation=PROBATION_PASSED)
            return
        self._probation = None
        failed = f"{clf.name} {clf.version}"
        try:
            self.rollback(reason=f"Model {failed} rolled back: {reason}", transfer=transfer)
        except EdgecvError as exc:
            log.error("Model %s failed probation (%s) but rollback failed: %s", failed, reason, exc)

    def _load(self, bundle: Bundle, runtime: str | None = None) -> Classifier:
        """The bundle's fastest (artifact, runtime) pair on this device that passes its self-test (measured side by
        side: `edgecv.agent.vision.selection`), among the runtimes `runtime` (default `model.runtime`) allows."""
        m = self.cfg.model
        classifier, _ = choose_classifier(bundle, runtime=runtime or m.runtime, threads=m.threads,
                                          top_k=self.cfg.publish.top_k, min_score=self.cfg.publish.min_score)
        return classifier

    def _swap(self, new: Classifier) -> None:
        old = self.host.swap_classifier(new)
        self._model_problem(None)  # a model that passed its self-test runs now
        if old is not None and "classify" in vars(old):
            del old.classify  # drop a probation wrapper: it references the classifier (a cycle)
        del old  # no cycle left: reference counting frees the old runtime at once (a gc pass would stall frames)


def _reason(exc: BaseException) -> str:
    """An unexpected exception as a short published reason (the full traceback goes to the log)."""
    return T.bounded(f"{type(exc).__name__}: {exc}", 200) or type(exc).__name__


def _label(bundle: Bundle) -> str:
    return f"{bundle.manifest.name} {bundle.manifest.version}"
