"""The agent's health loop, with the in-memory link: the latest health report is re-sent on request (the announce
answer that gives `edgecv devices` live figures), and a flapping camera's state changes all reach the status while
the log gets one line per interval."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from edgecv.agent import service as service_module
from edgecv.agent.config import parse_config
from edgecv.agent.contract.topics import DeviceTopics
from edgecv.agent.link.memory import MemoryLink
from edgecv.agent.link.outbox import Outbox
from edgecv.agent.link.predictions import PredictionStream
from edgecv.agent.service import Agent
from edgecv.agent.vision.classifier import Classifier
from tests.waiting import wait_until

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "fashion-mnist"



@contextmanager
def running_agent(tmp_path: Path, camera: dict[str, Any], health_s: float) -> Iterator[tuple[Agent, MemoryLink]]:
    cfg = parse_config({
        "device_id": "pi-1", "camera": [{"name": "cam0", **camera}],
        "model": {"store": str(tmp_path / "store"), "runtime": "onnxruntime"}, "health": {"interval_s": health_s},
        "security": {"allow_unsigned": True}, "homeassistant": {"enabled": False}})
    outbox = Outbox(cfg.publish.buffer)
    topics = DeviceTopics(cfg.prefix, cfg.device_id)
    link = MemoryLink()
    agent = Agent(cfg, topics, link=link, outbox=outbox,
                  predictions=PredictionStream(outbox, topics.predictions, cfg.publish.qos),
                  classifier=Classifier.load(BUNDLE, runtime="onnxruntime"))
    stop = threading.Event()
    agent.start(stop)
    try:
        yield agent, link
    finally:
        stop.set()
        agent.join()
        agent.close()


def test_the_latest_health_report_is_sent_again_on_request(tmp_path: Path) -> None:
    with running_agent(tmp_path, {"source": "synthetic:fashion-mnist", "fps": 50.0}, health_s=600.0) as (agent, link):
        health = agent.topics.health
        agent.republish_health()
        assert link.messages(health) == []  # nothing measured yet: nothing to send
        # the first report comes ~2 s after start, the next one only after health.interval_s (600 s)
        assert wait_until(lambda: len(link.messages(health)) == 1, timeout=30.0)
        first = link.messages(health)[0]
        agent.republish_health()
        again = link.messages(health)
    assert len(again) == 2 and again[1].payload == first.payload and again[1].retain is False
    doc = json.loads(first.payload)
    assert doc["fps"] > 0 and doc["latency_ms"]["p50"] > 0  # what `edgecv devices` shows


def test_a_flapping_camera_changes_the_status_every_time_but_logs_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "STATUS_CHECK_S", 0.01)  # look at the camera states often
    monkeypatch.setattr(service_module, "WARN_EVERY_S", 3600.0)  # the interval outlasts the test, however slow
    camera = {"source": "synthetic:fail?after=10", "fps": 100.0}  # open ~0.1 s, then a backoff of up to 0.5 s
    with caplog.at_level(logging.INFO, logger="edgecv.agent.service"), \
            running_agent(tmp_path, camera, health_s=600.0) as (agent, link):
        status = agent.topics.status
        assert wait_until(lambda: len(link.messages(status)) >= 6, timeout=60.0)
    states = [json.loads(m.payload)["cameras"]["cam0"]["state"] for m in link.messages(status)]
    assert {"open", "reopening"} <= set(states)  # every change published ...
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Camera states changed")]
    assert len(lines) == 1, lines  # ... one log line per interval
