"""The running device: camera loops that classify frames and stage predictions, the hosted model, status and health.

One loop thread per camera takes the newest frame, skips it if stale or static (motion gate), classifies it
(one inference at a time: the classifier lock), applies the publish policy and stages the prediction for the
MQTT sender; it never waits for the network. A camera with regions (agent/vision/regions.py) classifies each
region whose trigger fires instead of the whole frame, and publishes a region's stable state (retained) when it
changes. A camera whose file or finite source ended stops its loop; when every camera has, the agent stops or idles
(`on_cameras_ended`). A health thread publishes `health` every `health.interval_s` and
re-publishes the retained `status` when a camera changes state. `swap_classifier` replaces the model between two
frames. The agent is assembled, started and stopped by `edgecv.agent.app.App`; it publishes through the `Link`
it is given and never builds the parts that talk to it (updater, commands, discovery).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from edgecv.agent import __version__ as AGENT_VERSION
from edgecv.agent.config import AgentConfig
from edgecv.agent.contract import topics as T
from edgecv.agent.errors import CropError, EdgecvError
from edgecv.agent.link.outbox import Outbox
from edgecv.agent.link.predictions import PredictionStream
from edgecv.agent.link.protocol import Link
from edgecv.agent.samples.collector import SampleCollector
from edgecv.agent.system.health import FrameCounters, HealthMonitor
from edgecv.agent.system.sdnotify import SystemdNotifier
from edgecv.agent.vision.camera import STATE_ENDED, STATE_FAILED, Camera, Frame
from edgecv.agent.vision.classifier import Classifier
from edgecv.agent.vision.postprocess import MotionGate, PublishPolicy
from edgecv.agent.vision.regions import Region
from edgecv.agent.vision.states import StateChange

log = logging.getLogger(__name__)

STALE_FRAME_S = 2.0  # a frame older than this when the loop gets to it is skipped, not classified
WARN_EVERY_S = 30.0
STATUS_CHECK_S = 1.0


class LoopState:
    """What one camera loop keeps between frames; only that loop's thread touches it."""

    __slots__ = ("clf", "counts", "encoder", "name", "regions")

    def __init__(self, name: str, counts: FrameCounters, regions: tuple[Region, ...] = ()) -> None:
        self.name = name
        self.counts = counts
        self.clf: Classifier | None = None  # the model `encoder` was made for
        self.encoder: T.PredictionEncoder | None = None
        self.regions = regions  # empty: the whole frame is classified (Agent.process), else Agent.process_regions


class Agent:
    """The camera loops and the model they run. `start(stop)` spawns the loops, `join()` waits for them."""

    def __init__(self, config: AgentConfig, topics: T.DeviceTopics, *, link: Link, outbox: Outbox,
                 predictions: PredictionStream, boot: str | None = None,
                 classifier: Classifier | None = None,
                 region_models: Mapping[tuple[str, str], Classifier] | None = None,
                 samples: SampleCollector | None = None) -> None:
        self.config = config
        self.topics = topics
        self.link = link
        self.outbox = outbox  # read here only for its counts (dropped, depth); the link sends what it holds
        self.predictions = predictions
        self.samples = samples  # keeps results worth labelling (None: sample collection is off)
        self.boot = boot or uuid.uuid4().hex[:12]  # random per process start: consumers tell restarts apart
        self.monitor = HealthMonitor(config.device_id)
        self.cameras = [Camera(cam) for cam in config.cameras]
        models = region_models or {}
        self.regions: dict[str, tuple[Region, ...]] = {
            cam.name: tuple(Region(cam.name, r, models.get((cam.name, r.name)), f"camera[{i}].region[{j}].crop")
                            for j, r in enumerate(cam.regions))
            for i, cam in enumerate(config.cameras)}
        ha = config.homeassistant
        # Home Assistant's per-frame sensors read <p>/<dev>/latest[/<camera>/<region>], at most max_rate_hz.
        self._latest_period = (1.0 / ha.max_rate_hz if ha.max_rate_hz > 0 else 0.0) if ha.enabled else math.inf
        self._latest_due = 0.0 if ha.enabled and ha.max_rate_hz > 0 else math.inf  # whole frames: only if throttled
        if self._latest_period == math.inf:
            for regions in self.regions.values():
                for region in regions:
                    region.latest_due = math.inf
        self._ended: set[str] = set()  # cameras whose source ended
        self._finished: set[threading.Thread] = set()  # camera loops that returned because their source ended
        self._ended_lock = threading.Lock()
        self.policy = PublishPolicy(config.publish)
        self.motion = MotionGate(config.motion)
        self._motion_gating = config.motion.enabled
        self.notifier = SystemdNotifier.from_env(stall_s=config.systemd.watchdog_stall_s)
        self._classifier = classifier
        self._classify_lock = threading.Lock()
        self._ready = False
        self._ready_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._warned: dict[str, float] = {}
        self._last_health: bytes | None = None  # the newest health report, re-sent on the announce request
        self.last_frame: Frame | None = None
        self.last_top: list[dict[str, Any]] | None = None
        self.model_error: str | None = None  # why no (or a fallback) model runs, from the start-up self-test
        self.started = time.time()

    # ------------------------------------------------------------------------------------------ model
    @property
    def classifier(self) -> Classifier | None:
        return self._classifier

    def swap_classifier(self, new: Classifier) -> Classifier | None:
        """Make `new` the model from the next frame on (the frame being classified finishes on the old one);
        returns the old classifier. Thread-safe."""
        with self._classify_lock:
            old, self._classifier = self._classifier, new
        self.monitor.reset_infer_window()
        self.policy.reset()
        log.info("Model is now %s %s (%s)", new.name, new.version, new.engine.name)
        self.notifier.status(f"Classifying with {new.name} {new.version}")
        self.publish_status()
        return old

    def set_model_problem(self, why: str | None) -> None:
        """Show in the status why the device runs no model, or a fallback (None once a pushed model runs)."""
        self.model_error = why
        self.publish_status()

    def mark_waiting(self) -> None:
        """A fresh device with no model yet: tell systemd it is up, waiting for its first push."""
        self._mark_ready("Waiting for a model push")

    # ----------------------------------------------------------------------------------------- status
    def model_info(self) -> dict[str, Any] | None:
        clf = self._classifier
        if clf is None:
            return None
        info = {"name": clf.name, "version": clf.version, "sha256": clf.bundle.manifest_sha256,
                "runtime": clf.engine.name}
        choice = clf.runtime_choice
        if choice is not None:
            info.update(artifact=choice["chosen"], runtime_reason=choice["reason"])
        return info

    def status_payload(self, state: str) -> dict[str, Any]:
        cameras = {}
        for cam in self.cameras:
            cameras[cam.name] = st = cam.status()
            if self.regions[cam.name]:
                st["regions"] = {r.name: r.status() for r in self.regions[cam.name]}
        doc = T.status_payload(self.config.device_id, state, AGENT_VERSION, self.model_info(), cameras,
                               groups=self.config.groups)
        doc.update(boot=self.boot, dropped=self.outbox.dropped, model_error=self.model_error)
        return doc

    def status_bytes(self, state: str) -> bytes:
        return T.encode(self.status_payload(state))

    def publish_status(self) -> None:
        """Queue a fresh retained `online` status (camera or model change)."""
        if self.link.is_connected():
            self.link.publish(self.topics.status, self.status_bytes(T.STATUS_ONLINE), qos=1, retain=True)

    # -------------------------------------------------------------------------------------------- run
    def start(self, stop: threading.Event) -> None:
        """Open the cameras and spawn one loop per camera plus the health loop; they run until `stop` is set."""
        for cam in self.cameras:
            cam.start()
        if self._classifier is None:
            self.mark_waiting()
        for cam in self.cameras:
            self._spawn(f"loop-{cam.name}", self._camera_loop, cam, stop)
        self._spawn("health", self._health_loop, stop)

    @property
    def threads(self) -> list[threading.Thread]:
        """The camera loops and the health loop, for supervision."""
        return list(self._threads)

    def finished(self, thread: threading.Thread) -> bool:
        """Whether a thread of `threads` ended on purpose: a camera loop whose source ended (files play once), while
        the other cameras go on. The supervisor asks this before it counts an ended thread as a failure."""
        return thread in self._finished

    @property
    def grabbers(self) -> list[threading.Thread]:
        """The live cameras' grabber threads, for supervision."""
        return [t for cam in self.cameras if (t := cam.grabber) is not None]

    def grabber_done(self, thread: threading.Thread) -> bool:
        """Whether a grabber ended on purpose: its camera's source ended or its source string is wrong (both are
        reported in status); any other end of a grabber is a failure."""
        return any(cam.grabber is thread and cam.state in (STATE_ENDED, STATE_FAILED) for cam in self.cameras)

    def join(self, timeout: float = 10.0) -> None:
        """After `stop` was set: tell systemd, and wait for the loops to finish their frame."""
        self.notifier.stopping()
        for thread in self._threads:
            thread.join(timeout=timeout)

    def close(self) -> None:
        """Release the cameras and the systemd socket (after `join`)."""
        for cam in self.cameras:
            cam.stop()
        self.notifier.close()

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # ------------------------------------------------------------------------------------ camera loop
    def _camera_loop(self, cam: Camera, stop: threading.Event) -> None:
        loop = LoopState(cam.name, self.monitor.counters(), self.regions[cam.name])
        process = self.process_regions if loop.regions else self.process  # chosen once: no per-frame test
        for region in loop.regions:
            self._publish_state(region, region.stabiliser.start(time.time()), None)
        while not stop.is_set():
            frame = cam.latest(timeout=0.5)
            if frame is None:
                if cam.state == STATE_ENDED:
                    self._finished.add(threading.current_thread())  # before the thread ends: see finished()
                    self._camera_ended(cam, stop)
                    return
                continue
            try:
                process(loop, frame)
            except EdgecvError as exc:
                loop.counts.error()
                self._warn(f"infer-{cam.name}", "Camera %s: frame %d failed: %s", cam.name, frame.seq, exc)
            except Exception as exc:  # keep the loop alive; the error counter feeds probation
                loop.counts.error()
                self._warn(f"crash-{cam.name}", "Camera %s: frame %d failed unexpectedly: %r", cam.name, frame.seq,
                           exc)

    def process(self, loop: LoopState, frame: Frame) -> bool:
        """One frame through gate → classifier → policy → prediction stream; True if it is to be published.

        The daemon's per-frame path: at thousands of frames per second every step here costs throughput, so the
        JSON is written later, in batches, by the PredictionStream (drained on the MQTT sender thread), and the
        counters are the loop's own (no lock).
        """
        counts = loop.counts
        self.last_frame = frame
        if time.time() - frame.ts > STALE_FRAME_S:
            counts.skip("stale")
            return False
        if self._motion_gating and self.motion.is_static(frame.image, key=loop.name):
            counts.skip("motion")
            self.notifier.frame()  # frames flow and the loop is alive: a static scene must not trip the watchdog
            return False
        with self._classify_lock:
            clf = self._classifier
            if clf is None:  # a fresh device waiting for its first push
                counts.skip("no_model")
                self.notifier.frame()  # frames flow; the loop is alive
                return False
            result = clf.classify(frame.image)
        top = self.last_top = result.top
        if not self._ready and self._mark_ready(f"Classifying with {clf.name} {clf.version}"):
            log.info("First frame classified (%.1f ms); ready", result.latency_ms["total"])
        self.notifier.frame()
        now = time.time()
        latency = result.latency_ms
        publish = self.policy.should_publish(top, now, key=loop.name)
        if publish:
            encoder = loop.encoder
            if encoder is None or loop.clf is not clf:
                encoder = self._new_encoder(loop, clf)
            self.predictions.stage(encoder, now, frame.ts, top, latency, frame.truth)
            counts.published += 1
        if now >= self._latest_due and top:  # Home Assistant's rate-limited sensors (inf when not wanted)
            self._latest_due = now + self._latest_period
            self._publish_latest(self.topics.latest, loop.name, None, frame.ts, top, clf)
        if self.samples is not None:
            self.samples.offer(camera=loop.name, region=None, crop=None, frame=frame.image, top=top, clf=clf,
                               frame_ts=frame.ts, truth=frame.truth)
        # FrameCounters.inferred_one, inlined (it runs for every frame); nothing below can raise
        counts.frames += 1
        counts.inferred += 1
        counts.total_ms.append(latency["total"])
        counts.infer_ms.append(latency["infer"])
        return publish

    def process_regions(self, loop: LoopState, frame: Frame) -> bool:
        """One frame of a camera with regions: each region whose trigger fires is cropped, classified (with its own
        model or the camera's), fed to its stabiliser and published (prediction with `region`, state on change);
        True if any prediction is to be published.

        The frame counts once in the camera's counters: inferred when any region was classified, else failed when a
        region failed, else skipped ("trigger"). Per region: classified, skipped, errors (health)."""
        counts = loop.counts
        self.last_frame = frame
        now = time.time()
        if now - frame.ts > STALE_FRAME_S:
            counts.skip("stale")
            return False
        mono = time.monotonic()
        image = frame.image
        total_ms = 0.0
        classified = failed = 0
        published = waiting = False
        clf: Classifier | None = None
        for region in loop.regions:
            try:
                crop = region.take(image, mono)
            except CropError as exc:
                failed += 1
                self._warn(f"crop-{region.key}", "%s", exc)
                continue
            if crop is None:  # its trigger did not fire
                continue
            try:
                clf = region.model
                if clf is not None:  # its own model: only this loop uses it
                    result = clf.classify(crop)
                else:
                    with self._classify_lock:
                        clf = self._classifier
                        if clf is None:  # a fresh device waiting for its first push
                            region.skipped += 1
                            waiting = True
                            continue
                        result = clf.classify(crop)
                        counts.infer_ms.append(result.latency_ms["infer"])  # the hosted model's latency
            except EdgecvError as exc:
                region.errors += 1
                failed += 1
                self._warn(f"infer-{region.key}", "Camera %s region %s: frame %d failed: %s", loop.name,
                           region.name, frame.seq, exc)
                continue
            classified += 1
            total_ms += result.latency_ms["total"]
            top = result.top
            changes = region.record(clf, top, now, mono, frame.seq, frame.ts)
            if self.policy.should_publish(top, now, key=region.key):
                self.predictions.stage(region.encoder_for(clf, self.boot, self.config.device_id), now, frame.ts, top,
                                       result.latency_ms, frame.truth)
                counts.published += 1
                published = True
            for change in changes:
                self._publish_state(region, change, clf)
            if self.samples is not None:
                confirmed = any(c.reason == "confirmed" for c in changes)
                self.samples.offer(camera=loop.name, region=region.name, crop=crop, frame=image, top=top, clf=clf,
                                   frame_ts=frame.ts, truth=frame.truth, state_change=confirmed,
                                   pending=not confirmed and region.stabiliser.run == 1)
            if now >= region.latest_due and top:
                region.latest_due = now + self._latest_period
                self._publish_latest(self.topics.latest_region(loop.name, region.name), loop.name, region.name,
                                     frame.ts, top, clf)
        if classified:
            if not self._ready and clf is not None and self._mark_ready(f"Classifying with {clf.name} {clf.version}"):
                log.info("First frame classified (%d region(s), %.1f ms); ready", classified, total_ms)
            counts.frames += 1
            counts.inferred += 1
            counts.total_ms.append(total_ms)
        elif failed:
            counts.error()
        else:
            counts.skip("no_model" if waiting else "trigger")
        self.notifier.frame()  # frames flow and the loop is alive, whether or not a region was due
        return published

    def _publish_state(self, region: Region, change: StateChange, clf: Classifier | None) -> None:
        """A region's new stable state, retained. What the loops staged goes out first, so the predictions that
        confirmed a state arrive before it."""
        model = {"name": clf.name, "version": clf.version} if clf is not None else None
        doc = T.state_payload(self.config.device_id, self.boot, region.camera, region.name, state=change.state,
                              previous=change.previous, since=change.since, reason=change.reason, score=change.score,
                              count=change.count, frame=change.frame, frame_ts=change.frame_ts, model=model)
        if change.reason != "start":
            log.info("Camera %s region %s: state %s -> %s (%s)", region.camera, region.name, change.previous,
                     change.state, change.reason)
        self.predictions.drain()
        self.link.publish(self.topics.state(region.camera, region.name), T.encode(doc), qos=1, retain=True)

    def _publish_latest(self, topic: str, camera: str, region: str | None, frame_ts: float,
                        top: list[dict[str, Any]], clf: Classifier) -> None:
        doc = T.latest_payload(self.config.device_id, camera, frame_ts, top, {"name": clf.name, "version": clf.version},
                               region=region)
        self.link.publish(topic, T.encode(doc), qos=0, retain=True)

    def _camera_ended(self, cam: Camera, stop: threading.Event) -> None:
        """A camera's source ended (a file or finite source with loop = false). When every camera has ended, the
        agent stops (`on_cameras_ended = "exit"`: the same clean shutdown as SIGTERM, `stopped` published, exit code
        0) or stays up idle (`"idle"`: MQTT commands and pushes are still served)."""
        with self._ended_lock:
            self._ended.add(cam.name)
            everything = len(self._ended) == len(self.cameras)
        log.info("Camera %s: the source ended (%d frame(s)); it is not reopened", cam.name, cam.status()["frames"])
        if not everything:
            return
        if self.config.on_cameras_ended == "exit":
            log.info("Every camera has ended: stopping (on_cameras_ended = \"exit\")")
            stop.set()
            return
        log.info("Every camera has ended: staying up idle (on_cameras_ended = \"idle\")")
        self.notifier.status("Every camera has ended; idle")
        while not stop.wait(0.5):  # the agent is idle on purpose, not stalled: keep systemd's watchdog fed
            self.notifier.frame()

    def _new_encoder(self, loop: LoopState, clf: Classifier) -> T.PredictionEncoder:
        """The prediction encoder of this camera and model (made again after a model swap)."""
        loop.clf = clf
        loop.encoder = T.PredictionEncoder(boot=self.boot, device=self.config.device_id, camera=loop.name,
                                           model_name=clf.name, model_version=clf.version, labels=clf.labels,
                                           model_sha=clf.bundle.manifest_sha256)
        return loop.encoder

    def _mark_ready(self, status: str) -> bool:
        """Send READY=1 once per process; True the first time."""
        if self._ready:
            return False
        with self._ready_lock:
            if self._ready:
                return False
            self._ready = True
        self.notifier.ready(status)
        return True

    # ------------------------------------------------------------------------------------------ health
    def health_payload(self) -> dict[str, Any]:
        cams = {}
        for cam in self.cameras:
            st = cam.status()
            cams[cam.name] = {"state": st.get("state"), "fps": st.get("fps"), "reopens": st.get("reopens")}
            if self.regions[cam.name]:
                cams[cam.name]["regions"] = {r.name: r.health() for r in self.regions[cam.name]}
        outbox = self.outbox
        extra = {"boot": self.boot, "cameras": cams, "model": self.model_info(),
                 "undeliverable": outbox.undeliverable, "spool": outbox.spool_state}
        if self.samples is not None:
            extra["samples"] = self.samples.health()
        return self.monitor.payload(dropped=outbox.dropped, queue_depth=len(outbox) + len(self.predictions),
                                    extra=extra)

    def _health_loop(self, stop: threading.Event) -> None:
        interval = self.config.health.interval_s
        next_health = time.monotonic() + min(interval, 2.0)  # a first report soon after start
        states = logged = self._camera_states()
        logged_at, changes = -math.inf, 0
        while not stop.wait(min(STATUS_CHECK_S, max(0.05, next_health - time.monotonic()))):
            current = self._camera_states()
            if current != states:
                states = current
                changes += 1
                self.publish_status()
            # Every change goes into the status; the log gets one line per WARN_EVERY_S at most (a camera that keeps
            # failing flaps between open and reopening every few seconds), and always the state it settled in.
            if current != logged and time.monotonic() - logged_at >= WARN_EVERY_S:
                log.info("Camera states changed: %s%s", ", ".join(f"{k}={v}" for k, v in current.items()),
                         f" ({changes} changes since the last such line)" if changes > 1 else "")
                logged, logged_at, changes = current, time.monotonic(), 0
            if time.monotonic() >= next_health:
                next_health += interval
                try:
                    health = T.encode(self.health_payload())
                    self._last_health = health
                    self.link.publish(self.topics.health, health, qos=0)
                except Exception:
                    log.exception("Building the health report failed")

    def republish_health(self) -> None:
        """Publish the latest health report again (the announce request's answer): `edgecv devices` then shows fps
        and latency at once, without waiting up to health.interval_s. Not a new measurement: the same document,
        with its `ts`, covering the interval before it. Nothing before the first report (~2 s after start)."""
        health = self._last_health
        if health is not None and self.link.is_connected():
            self.link.publish(self.topics.health, health, qos=0)

    def _camera_states(self) -> dict[str, str]:
        return {cam.name: cam.state for cam in self.cameras}

    def _warn(self, key: str, fmt: str, *args: Any) -> None:
        """Per-frame warnings: at most one per WARN_EVERY_S per kind, the rest at debug level."""
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) >= WARN_EVERY_S:
            self._warned[key] = now
            log.warning(fmt, *args)
        else:
            log.debug(fmt, *args)
