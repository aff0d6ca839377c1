"""Agent.process_regions, frame by frame, with the in-memory link: region predictions, retained stable states,
triggers and their counts, crops that do not fit, model swaps, regions with a model of their own, and the
rate-limited `latest` topics Home Assistant reads."""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecv.agent.config import parse_config
from edgecv.agent.contract.bundle import load_bundle
from edgecv.agent.contract.topics import LATEST_KEYS, PREDICTION_KEYS, STATE_KEYS, DeviceTopics
from edgecv.agent.link.memory import MemoryLink
from edgecv.agent.link.outbox import Outbox
from edgecv.agent.link.predictions import PredictionStream
from edgecv.agent.service import Agent, LoopState
from edgecv.agent.vision.camera import Frame
from edgecv.agent.vision.classifier import Classifier
from edgecv.agent.vision.regions import load_region_model
from edgecv.agent.vision.scene import DOOR_CROP, Scene, SceneSpec

FASHION = Path(__file__).resolve().parents[2] / "models" / "fashion-mnist"
SCENE = {"seed": "0", "start": "3000000", "hold": "40", "objects": "0"}


def make_agent(tmp_path: Path, bundle: Path | None, regions: list[dict[str, Any]], *,
               ha: dict[str, Any] | None = None, region_models: dict[tuple[str, str], Classifier] | None = None,
               publish: dict[str, Any] | None = None) -> tuple[Agent, LoopState, MemoryLink]:
    cfg = parse_config({
        "device_id": "pi-1", "camera": [{"name": "garage", "source": "synthetic:scene", "region": regions}],
        "model": {"store": str(tmp_path / "store"), "runtime": "onnxruntime"}, "publish": publish or {},
        "security": {"allow_unsigned": True}, "homeassistant": ha or {"enabled": False}})
    clf = Classifier.load(bundle, runtime="onnxruntime") if bundle else None
    outbox = Outbox(cfg.publish.buffer)
    topics = DeviceTopics(cfg.prefix, cfg.device_id)
    link = MemoryLink()
    agent = Agent(cfg, topics, link=link, outbox=outbox,
                  predictions=PredictionStream(outbox, topics.predictions, cfg.publish.qos), classifier=clf,
                  region_models=region_models)
    loop = LoopState("garage", agent.monitor.counters(), agent.regions["garage"])
    for region in loop.regions:  # what the camera loop does when it starts
        agent._publish_state(region, region.stabiliser.start(time.time()), None)
    return agent, loop, link


def frames(n: int, first: int = 0, **params: str) -> tuple[list[Frame], Scene]:
    scene = Scene(SceneSpec({**SCENE, **params}))
    out = []
    for i in range(first, first + n):
        image, truth = scene.render(i)
        out.append(Frame(image, time.time(), i, truth, "garage"))
    return out, scene


def run(agent: Agent, loop: LoopState, fs: list[Frame]) -> None:
    for f in fs:
        agent.process_regions(loop, f._replace(ts=time.time()))


def published(agent: Agent) -> list[dict[str, Any]]:
    agent.predictions.drain()
    docs = []
    while batch := agent.outbox.take_run({}):
        docs += [json.loads(m.payload) for m in batch if m.topic.endswith("/predictions")]
        agent.outbox.ack_all(m.id for m in batch)
    return docs


def states(link: MemoryLink, region: str = "door") -> list[dict[str, Any]]:
    msgs = link.messages(f"edgecv/pi-1/state/garage/{region}")
    assert all(m.retain and m.qos == 1 for m in msgs)
    return [json.loads(m.payload) for m in msgs]


DOOR = {"name": "door", "crop": list(DOOR_CROP), "trigger": "every"}


def test_a_region_publishes_predictions_with_its_name_and_a_retained_stable_state(tmp_path: Path,
                                                                                 scene_bundle: Path) -> None:
    agent, loop, link = make_agent(tmp_path, scene_bundle, [DOOR])
    fs, scene = frames(120)
    run(agent, loop, fs)
    preds = published(agent)
    assert len(preds) == 120 and all(set(p) == PREDICTION_KEYS | {"region", "truth"} for p in preds)
    assert {(p["camera"], p["region"]) for p in preds} == {("garage", "door")}
    assert [p["seq"] for p in preds] == list(range(120))
    per_frame = np.mean([p["top"][0]["index"] == p["truth"] for p in preds])
    assert per_frame >= 0.9
    docs = states(link)
    assert all(set(d) == STATE_KEYS for d in docs)
    assert docs[0]["state"] is None and docs[0]["reason"] == "start"  # unknown until results agree
    first = docs[1]
    assert first["reason"] == "confirmed" and first["previous"] is None and first["count"] == 3
    assert first["frame"] == 2  # the third agreeing result
    confirmed = docs[1:]
    assert len(confirmed) >= 2, "the scene changes state every ~40 frames"
    for d in confirmed:  # each confirmed state is the truth of the frame that confirmed it
        assert d["state"] == ("closed", "open")[scene.truth_at(d["frame"])], d
        assert 0.5 <= d["score"] <= 1.0 and d["model"] == {"name": "scene-door-linear", "version": "1.0.0"}
    for prev, cur in itertools.pairwise(confirmed):
        assert cur["previous"] == prev["state"] and cur["since"] >= prev["since"]
    assert link.retained["edgecv/pi-1/state/garage/door"] == json.dumps(confirmed[-1], separators=(",", ":"),
                                                                        sort_keys=True).encode()
    health = agent.health_payload()
    door = health["cameras"]["garage"]["regions"]["door"]
    assert door == {"classified": 120, "skipped": 0, "errors": 0, "state": confirmed[-1]["state"],
                    "since": door["since"]}
    assert abs(door["since"] - confirmed[-1]["since"]) <= 1e-3  # rounded to 3 and 4 places
    assert (health["frames"], health["inferred"], health["skipped"]) == (120, 120, 0)
    status = agent.status_payload("online")["cameras"]["garage"]["regions"]["door"]
    assert status == {"crop": list(DOOR_CROP), "box": [384, 132, 192, 288], "trigger": "every", "model": "camera",
                      "error": None}


def test_frames_a_region_is_not_due_on_are_skipped_and_counted(tmp_path: Path, scene_bundle: Path) -> None:
    agent, loop, _link = make_agent(tmp_path, scene_bundle, [
        {"name": "door", "crop": list(DOOR_CROP), "trigger": "interval", "interval_s": 3600},
        {"name": "wall", "crop": [0, 0, 200, 100], "trigger": "motion"}])
    fs, _ = frames(30, static="1", noise="0", jpeg="0", shake="0", drift="0")
    run(agent, loop, fs)
    regions = agent.health_payload()["cameras"]["garage"]["regions"]
    assert (regions["door"]["classified"], regions["door"]["skipped"]) == (1, 29)  # the first frame only
    # a still wall: the first frame counts as motion and starts a run towards a first state; while that is pending
    # the region is classified on the next frames too, until three results agree; then no motion, no classification
    assert (regions["wall"]["classified"], regions["wall"]["skipped"]) == (3, 27)
    assert regions["wall"]["state"] is not None
    assert agent.health_payload()["skipped_by"]["trigger"] == 27  # frames on which no region was classified
    assert len(published(agent)) == 4


def test_a_crop_that_does_not_fit_is_reported_and_counted_not_fatal(tmp_path: Path, scene_bundle: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    agent, loop, _link = make_agent(tmp_path, scene_bundle, [
        {"name": "door", "crop": list(DOOR_CROP), "trigger": "every"},
        {"name": "far", "crop": [600, 400, 100, 100], "trigger": "every"}])
    fs, _ = frames(5)
    run(agent, loop, fs)
    status = agent.status_payload("online")["cameras"]["garage"]["regions"]["far"]
    assert status["box"] is None and "does not fit the 640x480 frame" in status["error"]
    assert status["error"].startswith("camera[0].region[1].crop")
    health = agent.health_payload()["cameras"]["garage"]["regions"]
    assert health["far"]["errors"] == 5 and health["door"]["classified"] == 5
    assert [m.getMessage() for m in caplog.records if "does not fit" in m.getMessage()] != []


def test_a_model_swap_keeps_a_state_the_new_model_knows_and_forgets_one_it_does_not(
        tmp_path: Path, scene_bundle: Path) -> None:
    agent, loop, link = make_agent(tmp_path, scene_bundle, [DOOR])
    fs, _ = frames(12, static="1")
    run(agent, loop, fs[:6])
    assert states(link)[-1]["state"] == "closed"
    loaded = Classifier.load(scene_bundle, runtime="onnxruntime")
    bundle = dataclasses.replace(loaded.bundle, manifest=dataclasses.replace(loaded.bundle.manifest, version="2.0"))
    agent.swap_classifier(Classifier(bundle, loaded.engine))
    run(agent, loop, fs[6:8])
    assert [d["reason"] for d in states(link)] == ["start", "confirmed"]  # same labels: the state stands
    agent.swap_classifier(Classifier.load(FASHION, runtime="onnxruntime"))  # a model that cannot say "closed"
    run(agent, loop, fs[8:9])
    last = states(link)[-1]
    assert (last["state"], last["previous"], last["reason"]) == (None, "closed", "model_changed")
    assert last["model"]["name"] == "fashion-mnist"
    assert published(agent)[-1]["model"]["name"] == "fashion-mnist"


def test_a_region_with_its_own_model_keeps_it_whatever_the_camera_runs(tmp_path: Path, scene_bundle: Path) -> None:
    cfg = parse_config({"device_id": "pi-1", "security": {"allow_unsigned": True}})
    own = load_region_model(str(scene_bundle), cfg, None, "camera[0].region[0].model")
    agent, loop, _link = make_agent(tmp_path, None, [DOOR, {"name": "other", "crop": [0, 0, 64, 64],
                                                           "trigger": "every"}],
                                   region_models={("garage", "door"): own})
    fs, _ = frames(4)
    run(agent, loop, fs)  # no camera model yet (a fresh device): only the region with its own model runs
    regions = agent.health_payload()["cameras"]["garage"]["regions"]
    assert (regions["door"]["classified"], regions["other"]["classified"], regions["other"]["skipped"]) == (4, 0, 4)
    assert agent.status_payload("online")["cameras"]["garage"]["regions"]["door"]["model"] == \
        "scene-door-linear 1.0.0"
    agent.swap_classifier(Classifier.load(FASHION, runtime="onnxruntime"))  # what a push does
    run(agent, loop, fs)
    models = {(p["region"], p["model"]["name"]) for p in published(agent)}
    assert models == {("door", "scene-door-linear"), ("other", "fashion-mnist")}


def test_a_broken_region_model_is_a_startup_error_naming_the_key(tmp_path: Path, scene_bundle: Path) -> None:
    from edgecv.agent.errors import BundleError

    cfg = parse_config({"device_id": "pi-1", "security": {"allow_unsigned": True}})
    with pytest.raises(BundleError, match=r"camera\[0\]\.region\[0\]\.model: the region's model .* cannot be used"):
        load_region_model(str(tmp_path / "missing"), cfg, None, "camera[0].region[0].model")
    signed_only = parse_config({"device_id": "pi-1"})
    from edgecv.agent.contract.signing import generate_private_key, load_keyring, write_keypair

    write_keypair(generate_private_key(), tmp_path / "k.key")
    keyring = load_keyring(str(tmp_path / "k.pub"))
    assert load_bundle(scene_bundle).signature is None
    with pytest.raises(BundleError, match="unsigned"):
        load_region_model(str(scene_bundle), signed_only, keyring, "camera[0].region[0].model")


def test_home_assistant_reads_rate_limited_latest_topics(tmp_path: Path, scene_bundle: Path) -> None:
    agent, loop, link = make_agent(tmp_path, scene_bundle, [DOOR], ha={"enabled": True, "max_rate_hz": 0.01})
    fs, _ = frames(20)
    run(agent, loop, fs)
    latest = link.messages("edgecv/pi-1/latest/#")
    assert len(latest) == 1 and latest[0].topic == "edgecv/pi-1/latest/garage/door" and latest[0].retain
    doc = json.loads(latest[0].payload)
    assert set(doc) == LATEST_KEYS | {"region"} and doc["label"] in ("closed", "open")
    assert doc["label"] == doc["top"][0]["label"] and doc["region"] == "door"
    unlimited, loop2, link2 = make_agent(tmp_path / "b", scene_bundle, [DOOR], ha={"enabled": True,
                                                                                   "max_rate_hz": 0})
    run(unlimited, loop2, fs[:5])
    assert len(link2.messages("edgecv/pi-1/latest/#")) == 5
    off, loop3, link3 = make_agent(tmp_path / "c", scene_bundle, [DOOR])
    run(off, loop3, fs[:5])
    assert link3.messages("edgecv/pi-1/latest/#") == []


def test_whole_frame_cameras_feed_the_device_latest_topic_only_when_rate_limited(tmp_path: Path) -> None:
    from edgecv.agent.vision.synthetic import SyntheticSource

    def agent_with(ha: dict[str, Any]) -> tuple[Agent, LoopState, MemoryLink]:
        cfg = parse_config({"device_id": "pi-1", "camera": [{"name": "cam0"}], "homeassistant": ha,
                            "model": {"store": str(tmp_path / "s"), "runtime": "onnxruntime"}})
        outbox = Outbox(100)
        topics = DeviceTopics(cfg.prefix, cfg.device_id)
        link = MemoryLink()
        agent = Agent(cfg, topics, link=link, outbox=outbox, predictions=PredictionStream(outbox, topics.predictions,
                                                                                          1),
                      classifier=Classifier.load(FASHION, runtime="onnxruntime"))
        return agent, LoopState("cam0", agent.monitor.counters()), link

    src = SyntheticSource("synthetic:fashion-mnist")
    images = []
    for _ in range(10):
        src.grab()
        images.append(src.retrieve())
    for ha, expected in (({"max_rate_hz": 0.01}, 1), ({"max_rate_hz": 0}, 0), ({"enabled": False}, 0)):
        agent, loop, link = agent_with(ha)
        for i, (image, truth) in enumerate(images):
            agent.process(loop, Frame(image, time.time(), i, truth, "cam0"))
        msgs = link.messages("edgecv/pi-1/latest")
        assert len(msgs) == expected, ha
        if msgs:
            doc = json.loads(msgs[0].payload)
            assert set(doc) == LATEST_KEYS and doc["camera"] == "cam0" and "region" not in doc
        assert link.messages("edgecv/pi-1/state/#") == []  # no regions, no states
