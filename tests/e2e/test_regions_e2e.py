"""Camera regions and files that play once, end to end: real `edgecv-agent run` processes, a real Mosquitto, real
runtimes, the `synthetic:scene` source (whose door state is known in every frame) and the workstation CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import pytest

from edgecv.agent.contract.topics import PREDICTION_KEYS, STATE_KEYS, decode
from edgecv.agent.vision.scene import DOOR_CROP, SCENE_LABELS, Scene, SceneSpec
from edgecv.tools.fleet.mqtt_client import Received
from tests.broker import Broker
from tests.e2e.conftest import StartAgent
from tests.e2e.test_agent_e2e import collect, of_kind, subscriber

pytestmark = pytest.mark.e2e

SCENE = {"seed": "0", "start": "5000000", "hold": "30", "objects": "0"}


def edgecv(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "edgecv"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgecv.tools.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def states_of(msgs: list[Received]) -> list[dict[str, Any]]:
    return [decode(m.payload) for m in msgs if "/state/" in m.topic and m.payload]


def test_a_region_publishes_stable_states_that_follow_the_scene(start_agent: StartAgent, shared_broker: Broker,
                                                                 scene_bundle: Path) -> None:
    """The shipped path: a 640x480 scene at 20 fps, a door region with the default trigger (motion + interval)
    and three agreeing results per state; every confirmed state is the scene's truth at the frame that confirmed
    it, the newest is retained, Home Assistant gets its sensors, `edgecv devices` and `edgecv watch` show it."""
    query = "&".join(f"{k}={v}" for k, v in SCENE.items())
    agent = start_agent({"camera": [{"name": "garage", "source": f"synthetic:scene?{query}", "fps": 20.0,
                                     "region": [{"name": "door", "crop": list(DOOR_CROP), "interval_s": 2.0}]}],
                         "homeassistant": {"enabled": True, "max_rate_hz": 2.0}},
                        broker=shared_broker, bundle=scene_bundle)
    sub = subscriber(shared_broker, f"edgecv/{agent.device}/#", f"homeassistant/sensor/{agent.device}/#")

    def three_changes(msgs: list[Received]) -> bool:
        return sum(d["reason"] == "confirmed" for d in states_of(msgs)) >= 3 and bool(of_kind(msgs, "health"))

    msgs = collect(sub, three_changes, 90, agent)
    scene = Scene(SceneSpec(SCENE))
    states = states_of(msgs)
    assert all(set(d) == STATE_KEYS and (d["camera"], d["region"]) == ("garage", "door") for d in states)
    confirmed = [d for d in states if d["reason"] == "confirmed"]
    for d in confirmed:
        assert d["state"] == SCENE_LABELS[scene.truth_at(d["frame"])], (d, scene.truth_at(d["frame"]))
        assert d["count"] == 3 and d["score"] >= 0.5 and d["frame_ts"] <= d["since"] <= d["ts"]
    assert any(d["previous"] is not None and d["previous"] != d["state"] for d in confirmed)
    preds = of_kind(msgs, "predictions")
    assert preds and all(set(p) == PREDICTION_KEYS | {"region", "truth"} and p["region"] == "door" for p in preds)
    health = of_kind(msgs, "health")[-1]["cameras"]["garage"]["regions"]["door"]
    assert health["classified"] >= 9 and health["skipped"] > 0  # the trigger skips frames on which nothing moved
    status = [d for d in of_kind(msgs, "status") if d["state"] == "online"][-1]
    assert status["cameras"]["garage"]["regions"]["door"]["box"] == [384, 132, 192, 288]
    ha = {m.topic.rsplit("/", 2)[-2]: json.loads(m.payload) for m in msgs if m.topic.startswith("homeassistant/")}
    assert ha["garage_door_state"]["state_topic"] == f"edgecv/{agent.device}/state/garage/door"
    assert ha["garage_door_label"]["state_topic"] == f"edgecv/{agent.device}/latest/garage/door"
    assert any(m.topic == f"edgecv/{agent.device}/latest/garage/door" for m in msgs)
    sub.close()

    late = subscriber(shared_broker, f"edgecv/{agent.device}/state/#")  # a consumer that comes later
    retained = late.wait_for(lambda m: m.retain, 10)
    assert decode(retained.payload)["state"] in SCENE_LABELS
    late.close()
    devices = edgecv("devices", "--broker", f"{shared_broker.host}:{shared_broker.port}", "--wait", "1", "--json")
    assert devices.returncode == 0, devices.stderr
    mine = next(d for d in json.loads(devices.stdout) if d["device"] == agent.device)
    assert mine["regions"]["garage/door"]["state"] in SCENE_LABELS
    watch = edgecv("watch", "--broker", f"{shared_broker.host}:{shared_broker.port}", "--device", agent.device,
                   "--count", "2", "--timeout", "60")
    assert watch.returncode == 0, watch.stderr
    assert "STATE" in watch.stdout and "garage/door" in watch.stdout  # the retained state, then predictions
    assert agent.stop() == 0


def write_clip(path: Path, frames: int) -> Scene:
    """A video file of scene frames (MJPG .avi, 640x480)."""
    scene = Scene(SceneSpec({"seed": "2", "hold": "20", "objects": "0"}))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10.0, (640, 480))
    assert writer.isOpened()
    for i in range(frames):
        writer.write(scene.render(i)[0])
    writer.release()
    return scene


def test_a_file_without_loop_is_classified_exactly_once_then_the_agent_exits(
        start_agent: StartAgent, shared_broker: Broker, scene_bundle: Path, tmp_path: Path) -> None:
    """Two cameras read the same 60-frame clip with loop = false, one classifying whole frames (the camera's model),
    one a region (with a model of its own, trigger every): 60 predictions each, every frame once, in order; then
    the agent stops by itself (on_cameras_ended = "exit"), publishing `stopped`, exit code 0."""
    clip = tmp_path / "clip.avi"
    write_clip(clip, 60)
    device = f"file-once-{tmp_path.name}"[:60]
    sub = subscriber(shared_broker, f"edgecv/{device}/predictions", f"edgecv/{device}/status")  # before it starts
    agent = start_agent({"device_id": device, "camera": [
        {"name": "whole", "source": str(clip), "loop": False, "fps": 0.0},
        {"name": "door", "source": str(clip), "loop": False, "fps": 0.0,
         "region": [{"name": "door", "crop": list(DOOR_CROP), "trigger": "every", "model": str(scene_bundle)}]}]},
        broker=shared_broker)
    assert agent.wait_exit(90) == 0, agent.log()[-3000:]
    msgs = collect(sub, lambda m: any(d["state"] == "stopped" for d in of_kind(m, "status")), 20, agent)
    sub.close()
    preds = of_kind(msgs, "predictions")
    whole = [p for p in preds if p["camera"] == "whole"]
    door = [p for p in preds if p["camera"] == "door"]
    assert len(whole) == 60 and len(door) == 60, (len(whole), len(door))
    assert all("region" not in p for p in whole) and all(p["region"] == "door" for p in door)
    assert [p["frame_ts"] for p in whole] == sorted(p["frame_ts"] for p in whole)
    assert sorted(p["seq"] for p in preds) == list(range(120))  # nothing lost, nothing repeated
    assert {p["model"]["name"] for p in door} == {"scene-door-linear"}
    assert {p["model"]["name"] for p in whole} != {"scene-door-linear"}
    stopped = next(d for d in of_kind(msgs, "status") if d["state"] == "stopped")
    assert {c["state"] for c in stopped["cameras"].values()} == {"ended"}
    assert stopped["cameras"]["whole"]["reopens"] == 0 and stopped["cameras"]["whole"]["frames"] == 60
    assert "Every camera has ended: stopping" in agent.log()


def test_idle_after_the_files_ended_until_told_to_stop(start_agent: StartAgent, shared_broker: Broker,
                                                      tmp_path: Path) -> None:
    clip = tmp_path / "clip.avi"
    write_clip(clip, 12)
    device = f"file-idle-{tmp_path.name}"[:60]
    sub = subscriber(shared_broker, f"edgecv/{device}/predictions", f"edgecv/{device}/status")
    agent = start_agent({"device_id": device, "on_cameras_ended": "idle",
                         "camera": [{"name": "clip", "source": str(clip), "loop": False, "fps": 0.0}]},
                        broker=shared_broker)

    def ended(msgs: list[Received]) -> bool:
        return len(of_kind(msgs, "predictions")) >= 12 and any(
            d["state"] == "online" and d["cameras"]["clip"]["state"] == "ended" for d in of_kind(msgs, "status"))

    msgs = collect(sub, ended, 60, agent)  # every frame, and the retained status says the camera ended ...
    assert agent.alive()  # ... and the agent stays up, serving MQTT
    ping = edgecv("cmd", "ping", "--device", device, "--broker", f"{shared_broker.host}:{shared_broker.port}")
    assert ping.returncode == 0, ping.stderr
    assert len(of_kind(msgs, "predictions")) == 12 and agent.alive()
    assert agent.stop() == 0
    final = collect(sub, lambda m: any(d["state"] == "stopped" for d in of_kind(m, "status")), 10, agent)
    assert of_kind(final, "predictions") == []  # not one frame more
    sub.close()


def test_a_region_model_that_cannot_be_used_stops_the_start_with_one_line(tmp_path: Path,
                                                                        shared_broker: Broker) -> None:
    from tests.e2e.conftest import agent_command, to_toml

    path = tmp_path / "agent.toml"
    path.write_text(to_toml({"device_id": "bad-region", "broker": {"port": shared_broker.port},
                             "model": {"store": str(tmp_path / "store")},
                             "camera": [{"name": "garage", "source": "synthetic:scene", "region": [
                                 {"name": "door", "crop": list(DOOR_CROP), "model": str(tmp_path / "nope")}]}]}))
    proc = subprocess.run([*agent_command(), "run", "--config", str(path)], capture_output=True, text=True,
                          timeout=60)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgecv-agent: error:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert "camera[0].region[0].model: the region's model" in lines[0] and "does not exist" in lines[0]
    assert "Traceback" not in proc.stderr
