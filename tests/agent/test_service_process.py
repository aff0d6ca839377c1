"""Agent.process, one frame at a time: what it stages for publishing and what it counts (it records inline)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from edgecv.agent.config import parse_config
from edgecv.agent.contract.topics import DeviceTopics
from edgecv.agent.link.memory import MemoryLink
from edgecv.agent.link.outbox import Outbox
from edgecv.agent.link.predictions import PredictionStream
from edgecv.agent.service import Agent, LoopState
from edgecv.agent.vision.camera import Frame
from edgecv.agent.vision.classifier import Classifier
from edgecv.agent.vision.synthetic import SyntheticSource

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "fashion-mnist"


def _agent(tmp_path: Path, publish: dict[str, Any] | None = None, motion: bool = False,
           classifier: bool = True) -> tuple[Agent, LoopState]:
    cfg = parse_config({
        "device_id": "pi-1", "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist"}],
        "model": {"store": str(tmp_path / "store"), "runtime": "onnxruntime"},
        "publish": publish or {}, "motion": {"enabled": motion},
        "security": {"allow_unsigned": True}, "homeassistant": {"enabled": False}})
    clf = Classifier.load(BUNDLE, runtime="onnxruntime") if classifier else None
    outbox = Outbox(cfg.publish.buffer)
    topics = DeviceTopics(cfg.prefix, cfg.device_id)
    predictions = PredictionStream(outbox, topics.predictions, cfg.publish.qos)
    agent = Agent(cfg, topics, link=MemoryLink(), outbox=outbox, predictions=predictions, classifier=clf)
    return agent, LoopState("cam0", agent.monitor.counters())


def _frames(n: int) -> list[Frame]:
    src = SyntheticSource("synthetic:fashion-mnist")
    out = []
    for i in range(n):
        src.grab()
        image, truth = src.retrieve()
        out.append(Frame(image, time.time(), i, truth, "cam0"))
    return out


def _published(agent: Agent) -> list[dict[str, Any]]:
    agent.predictions.drain()
    docs = []
    while run := agent.outbox.take_run({}):
        docs += [json.loads(m.payload) for m in run]
        agent.outbox.ack_all(m.id for m in run)
    return docs


def test_classified_frames_are_staged_and_counted(tmp_path: Path) -> None:
    agent, loop = _agent(tmp_path)
    frames = _frames(5)
    assert all(agent.process(loop, f) for f in frames)
    assert len(agent.outbox) == 0 and len(agent.predictions) == 5  # staged, not yet encoded
    docs = _published(agent)
    assert [d["seq"] for d in docs] == list(range(5))
    assert [d["truth"] for d in docs] == [f.truth for f in frames]
    assert all(d["camera"] == "cam0" and d["model"]["name"] == "fashion-mnist" for d in docs)
    c = loop.counts
    assert (c.frames, c.inferred, c.published, c.errors, c.skipped) == (5, 5, 5, 0, {})
    assert len(c.total_ms) == len(c.infer_ms) == 5 and all(t >= i > 0 for t, i in zip(c.total_ms, c.infer_ms,
                                                                                       strict=True))
    health = agent.health_payload()
    assert (health["frames"], health["inferred"], health["published"], health["skipped"]) == (5, 5, 5, 0)
    assert health["latency_ms"]["p50"] is not None


def test_stale_frames_and_a_missing_model_are_skipped_and_counted(tmp_path: Path) -> None:
    agent, loop = _agent(tmp_path, classifier=False)
    fresh, = _frames(1)
    assert not agent.process(loop, fresh)  # no model yet: a fresh device waiting for its first push
    old = fresh._replace(ts=time.time() - 60)
    assert not agent.process(loop, old)
    assert loop.counts.skipped == {"no_model": 1, "stale": 1}
    assert (loop.counts.frames, loop.counts.inferred, loop.counts.published) == (2, 0, 0)
    assert len(agent.predictions) == 0
    assert agent.health_payload()["skipped_by"] == {"motion": 0, "stale": 1, "no_model": 1}


def test_motion_gate_and_on_change_policy(tmp_path: Path) -> None:
    agent, loop = _agent(tmp_path, motion=True)
    frame, = _frames(1)
    assert agent.process(loop, frame)
    assert not agent.process(loop, frame._replace(ts=time.time()))  # the same picture: static, not inferred
    assert loop.counts.skipped == {"motion": 1} and loop.counts.inferred == 1

    agent, loop = _agent(tmp_path / "b", publish={"mode": "on_change"})
    assert agent.process(loop, frame)
    assert not agent.process(loop, frame._replace(ts=time.time()))  # inferred, same label: not published
    assert (loop.counts.inferred, loop.counts.published) == (2, 1)
    assert len(_published(agent)) == 1


def test_a_model_swap_gives_the_next_predictions_the_new_model(tmp_path: Path) -> None:
    agent, loop = _agent(tmp_path)
    a, b = _frames(2)
    agent.process(loop, a)
    loaded = Classifier.load(BUNDLE, runtime="onnxruntime")
    bundle = dataclasses.replace(loaded.bundle, manifest=dataclasses.replace(loaded.bundle.manifest, version="9.9.9"))
    agent.swap_classifier(Classifier(bundle, loaded.engine))
    agent.process(loop, b)
    assert [d["model"]["version"] for d in _published(agent)] == [loaded.bundle.manifest.version, "9.9.9"]
