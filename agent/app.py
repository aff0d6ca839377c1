"""The composition root: builds every part of the device agent from its config, starts them in order, and stops
them in the reverse order.

Each part gets only the narrow things it uses: the camera loops (`Agent`) publish through the `Link`; the updater
gets the link, the model store, the keyring and the model host (the `Agent`); the command handler gets the link,
a view of the device and the updater's reload/rollback; Home Assistant discovery gets the link and a way to name
the running model; the announce responder gets the link and what to re-publish. No part builds its
collaborators or reaches back into its owner.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from edgecv.agent.commands import CommandHandler
from edgecv.agent.config import AgentConfig
from edgecv.agent.contract import topics as T
from edgecv.agent.contract.signing import load_keyring
from edgecv.agent.delivery.store import ModelStore
from edgecv.agent.delivery.updater import Updater
from edgecv.agent.errors import NoModelError
from edgecv.agent.link.announce import AnnounceResponder
from edgecv.agent.link.discovery import HomeAssistantDiscovery
from edgecv.agent.link.mqtt import MqttLink
from edgecv.agent.link.outbox import Outbox
from edgecv.agent.link.predictions import PredictionStream
from edgecv.agent.samples.collector import SampleCollector
from edgecv.agent.samples.store import SampleStore
from edgecv.agent.service import Agent
from edgecv.agent.system.supervisor import EXIT_CODE, Supervisor
from edgecv.agent.vision.classifier import Classifier
from edgecv.agent.vision.regions import load_region_models

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 3.0


class App:
    """The assembled agent process. `run(stop)` blocks until `stop` is set and returns the exit code."""

    def __init__(self, config: AgentConfig, *, classifier: Classifier | None = None) -> None:
        self.config = config
        topics = self.topics = T.DeviceTopics(config.prefix, config.device_id)
        self.outbox = Outbox(config.publish.buffer, config.publish.spool_dir or None)
        self.predictions = PredictionStream(self.outbox, topics.predictions, config.publish.qos,
                                            config.publish.expiry_s)
        # The Will and the `online` status are built at each connect (they name the model running then), from the
        # agent built just below.
        self.link = MqttLink(config.broker, topics, outbox=self.outbox,
                             will=lambda: self.agent.status_bytes(T.STATUS_OFFLINE),
                             online=lambda: self.agent.status_bytes(T.STATUS_ONLINE),
                             batches={topics.predictions: config.publish.batch_max}, feed=self.predictions.drain)
        keyring = load_keyring(config.security.keyring)
        # Samples worth labelling (opt-in): the loops decide, one writer thread stores, the commands serve them.
        self.samples: SampleCollector | None = None
        if config.samples.enabled:
            store = SampleStore(config.samples_dir(), max_bytes=int(config.samples.max_mb * 1024 * 1024),
                                device_id=config.device_id, max_age_s=config.samples.max_age_h * 3600.0).open()
            self.samples = SampleCollector(config.samples, store, config.device_id)
        # Regions with a bundle of their own: verified and self-tested now (a bad one is a startup error); pushes
        # never replace them (they replace the camera-default model, which the other regions use).
        self.agent = Agent(config, topics, link=self.link, outbox=self.outbox, predictions=self.predictions,
                           classifier=classifier, region_models=load_region_models(config, keyring),
                           samples=self.samples)
        self.store = ModelStore(Path(config.model.store), keep=config.update.keep_versions, keyring=keyring,
                                allow_unsigned=config.security.allow_unsigned)
        self.updater = Updater(config, topics, self.link, self.store, keyring, host=self.agent,
                               on_model_problem=self.agent.set_model_problem)
        self.commands = CommandHandler(config.device_id, topics, self.link, device=self.agent, control=self.updater,
                                       samples=self.samples.store if self.samples is not None else None)
        self.discovery = HomeAssistantDiscovery(config, topics, self.link, current_model=lambda: self.agent.classifier)
        # Brokers that never deliver retained messages to wildcard subscriptions (RabbitMQ): the workstation asks,
        # the device re-publishes its retained status and model state live, and its latest health report (not
        # retained: without it `edgecv devices` would wait up to health.interval_s for fps and latency).
        self.announce = AnnounceResponder(self.link, T.announce_topic(config.prefix),
                                          [self.agent.publish_status, self.updater.republish_state,
                                           self.agent.republish_health])
        self.exit_code = 0
        self._stop: threading.Event | None = None
        # Every long-lived thread is watched: one that dies stops the watchdog pings and the process (exit 1).
        self.supervisor = Supervisor(self._part_failed)
        self.agent.notifier.set_health_check(self.supervisor.healthy)

    def load_model(self) -> Classifier:
        """The model to serve (the store's active one, seeded from `model.bundle`), unless one was given."""
        return self.agent.classifier or self.updater.load_active()

    def run(self, stop: threading.Event) -> int:
        """Start everything, serve until `stop` is set, shut down cleanly; returns the exit code: 0, or 1 when a
        supervised thread died (systemd's `Restart=on-failure` then starts a fresh process).

        A device with an empty store and no seed bundle (a fresh install) still comes up: it reports `online`
        with no model and waits for its first push instead of exiting into a systemd restart loop.
        """
        self._stop = stop
        try:
            clf = self.load_model()
            model = f"model {clf.name} {clf.version}"
        except NoModelError as exc:
            model = "no model yet"
            log.warning("%s; serving MQTT and waiting for a pushed model", exc)
        log.info("Agent %s starting: %s, %d camera(s), broker %s:%s", self.config.device_id, model,
                 len(self.agent.cameras), self.config.broker.host, self.config.broker.port)
        self.updater.start()
        self.commands.start()
        self.discovery.start()
        self.announce.start()
        self.link.start()
        if self.samples is not None:
            self.samples.start()
        self.agent.start(stop)
        self.supervisor.watch([*self.link.threads, *self.updater.threads, *self.commands.threads,
                               *(self.samples.threads if self.samples else [])])
        self.supervisor.watch(self.agent.threads, may_end=self.agent.finished)
        self.supervisor.watch(self.agent.grabbers, may_end=self.agent.grabber_done)
        self.supervisor.start()
        try:
            stop.wait()
        finally:
            self.supervisor.stop()
            self.shutdown()
            self.supervisor.close()
        return self.exit_code

    def _part_failed(self, reason: str) -> None:
        """A supervised thread died: shut down and exit non-zero (the supervisor already logged why)."""
        self.exit_code = EXIT_CODE
        if self._stop is not None:
            self._stop.set()

    def shutdown(self) -> None:
        """The loops finish their frame, what they staged is flushed (up to a few seconds), `stopped` is published
        retained and the link disconnects cleanly (so the broker does not send the Last Will)."""
        log.info("Stopping: finishing the current frames and flushing %d buffered message(s)",
                 len(self.outbox) + len(self.predictions))
        self.agent.join()
        for part in (self.commands, self.updater, self.samples):
            if part is None:
                continue
            try:
                part.stop()
            except Exception:
                log.exception("Stopping %s failed", type(part).__name__)
        self.predictions.drain()  # the loops have stopped: what they staged goes to the outbox (and its spool)
        self.link.stop(self.agent.status_bytes(T.STATUS_STOPPED), flush_timeout=FLUSH_TIMEOUT_S)
        self.agent.close()
        log.info("Stopped (published %d, dropped %d, %d left in the buffer, %d undeliverable)",
                 self.agent.monitor.published, self.outbox.dropped, len(self.outbox), self.outbox.undeliverable)
