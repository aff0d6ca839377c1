"""The agent as a daemon, end to end: real `edgecv-agent run` processes, a real Mosquitto, real runtimes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from edgecv.agent.contract.topics import HEALTH_KEYS, PREDICTION_KEYS, STATUS_KEYS, decode
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received
from tests.broker import Broker
from tests.e2e.conftest import (
    StartAgent,
    agent_command,
    collect,
    durable_subscriber,
    persistent_broker,
    recorded_accuracy,
    to_toml,
    wait_for_autosave,
    wait_until,
)

pytestmark = pytest.mark.e2e


def subscriber(broker: Broker, *filters: str) -> MqttClient:
    client = MqttClient(ClientOptions(host=broker.host, port=broker.port)).connect()
    for flt in filters:
        client.subscribe(flt)
    return client



def drain(client: MqttClient) -> list[Received]:
    out = []
    while (msg := client.get(0)) is not None:
        out.append(msg)
    return out


def of_kind(msgs: list[Received], kind: str) -> list[dict[str, Any]]:
    return [decode(m.payload) for m in msgs if m.topic.endswith("/" + kind) and m.payload]


def test_predictions_status_and_health_follow_the_documented_schema(start_agent: StartAgent,
                                                                     shared_broker: Broker) -> None:
    agent = start_agent(broker=shared_broker)
    sub = subscriber(shared_broker, f"edgecv/{agent.device}/#")
    msgs = collect(sub, lambda m: len(of_kind(m, "predictions")) >= 30 and of_kind(m, "health"), 30, agent)
    preds = of_kind(msgs, "predictions")
    for p in preds:
        assert set(p) == PREDICTION_KEYS | {"truth"}, set(p) ^ (PREDICTION_KEYS | {"truth"})
        assert p["device"] == agent.device and p["camera"] == "cam0"
        assert set(p["model"]) == {"name", "sha", "version"} and len(p["model"]["sha"]) == 12
        assert set(p["latency_ms"]) == {"pre", "infer", "post", "total"}
        assert 1 <= len(p["top"]) <= 3 and all(set(t) == {"label", "index", "score"} for t in p["top"])
        assert p["top"][0]["score"] >= p["top"][-1]["score"]
        assert 0 <= p["truth"] < 10 and p["frame_ts"] <= p["ts"]
    seqs = [p["seq"] for p in preds]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))) and seqs[0] == 0
    assert len({p["boot"] for p in preds}) == 1
    status = of_kind(msgs, "status")
    assert status and status[0]["state"] == "online" and set(status[0]) >= STATUS_KEYS
    assert status[-1]["model"]["name"] and "cam0" in status[-1]["cameras"]
    # model.sha in every prediction is the start of the bundle hash the status carries
    assert {p["model"]["sha"] for p in preds} == {status[-1]["model"]["sha256"][:12]}
    health = of_kind(msgs, "health")[0]
    assert set(health) >= HEALTH_KEYS
    assert health["rss_mb"] > 10 and health["cpu_percent"] is not None and health["latency_ms"]["p50"] > 0

    assert agent.stop() == 0  # SIGTERM: drain, `stopped`, exit 0
    final = collect(sub, lambda m: any(d["state"] == "stopped" for d in of_kind(m, "status")), 10, agent)
    assert of_kind(final, "status")[-1]["state"] == "stopped"
    assert not any(d["state"] == "offline" for d in of_kind(final, "status"))  # no Will after a clean exit
    sub.close()


def test_batched_predictions_carry_every_frame_in_order(start_agent: StartAgent, shared_broker: Broker) -> None:
    """publish.batch_max = 50 with an unpaced camera: every predictions message is a JSON array of up to 50
    documented predictions; together they hold consecutive seqs from 0 (nothing lost, nothing repeated)."""
    agent = start_agent({"camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 0.0}],
                         "publish": {"batch_max": 50}}, broker=shared_broker)
    sub = subscriber(shared_broker, f"edgecv/{agent.device}/predictions")
    msgs = collect(sub, lambda m: sum(len(json.loads(x.payload)) for x in m) >= 2000, 60, agent)
    assert agent.stop() == 0
    arrays: list[list[dict[str, Any]]] = [json.loads(m.payload) for m in msgs]
    assert all(isinstance(a, list) and 1 <= len(a) <= 50 for a in arrays)
    assert max(len(a) for a in arrays) > 1  # at thousands of frames per second, predictions were batched
    preds = [p for a in arrays for p in a]
    assert all(set(p) == PREDICTION_KEYS | {"truth"} for p in preds)
    assert [p["seq"] for p in preds] == list(range(len(preds)))
    assert len({p["boot"] for p in preds}) == 1
    sub.close()


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_prediction_accuracy_matches_the_bundles_recorded_accuracy(start_agent: StartAgent, shared_broker: Broker,
                                                                    fashion_bundle: Path, runtime: str) -> None:
    ext = {"onnxruntime": "onnx", "litert": "tflite"}[runtime]
    assert list(fashion_bundle.glob(f"model.int8.{ext}")), f"the shipped bundle lacks its int8 .{ext} artifact"
    agent = start_agent({"camera": [{"name": "cam0", "source": "synthetic:fashion-mnist?shuffle=1&seed=3",
                                     "fps": 0.0}],
                         "model": {"runtime": runtime}, "publish": {"top_k": 1}}, broker=shared_broker)
    sub = subscriber(shared_broker, f"edgecv/{agent.device}/predictions", f"edgecv/{agent.device}/status")
    n = 3000
    msgs = collect(sub, lambda m: len(m) >= n + 1, 120, agent)
    preds = of_kind(msgs, "predictions")[:n]
    status = of_kind(msgs, "status")[0]
    assert status["model"]["runtime"] == runtime and status["model"]["artifact"].startswith(runtime)
    assert f"allowed by runtime = '{runtime}'" in status["model"]["runtime_reason"]  # measured on the device
    accuracy = sum(p["top"][0]["index"] == p["truth"] for p in preds) / len(preds)
    installed = next((agent.workdir / "models" / "versions").iterdir())
    engine = {"runtime": runtime, "format": ext,
              "precision": "int8" if (installed / f"model.int8.{ext}").exists() else "fp32"}
    expected = recorded_accuracy(fashion_bundle, engine)
    assert abs(accuracy - expected) <= 0.02, (accuracy, expected)
    assert agent.stop() == 0
    sub.close()


def test_broker_killed_and_restarted_mid_stream(start_agent: StartAgent, tmp_path: Path) -> None:
    broker = persistent_broker(tmp_path).start()
    try:
        agent = start_agent({"camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 25.0}]},
                            broker=broker)
        filters = [f"edgecv/{agent.device}/predictions", f"edgecv/{agent.device}/status"]
        sub = durable_subscriber(broker, filters, f"sub-{agent.device}")
        subscribed = time.time()
        before = collect(sub, lambda m: len(of_kind(m, "predictions")) >= 40, 30, agent)
        wait_for_autosave(tmp_path, subscribed)  # the subscriber's session survives the kill
        broker.stop(kill=True)
        sub.close()
        before += drain(sub)  # what arrived while we slept
        time.sleep(2.0)  # ~50 predictions are buffered in the agent meanwhile
        broker.start()
        sub = durable_subscriber(broker, filters, f"sub-{agent.device}")
        after = collect(sub, lambda m: len(of_kind(m, "predictions")) >= 100, 40, agent)
        assert agent.stop() == 0
        after += collect(sub, lambda m: any(d["state"] == "stopped" for d in of_kind(m, "status")), 10, agent)
        sub.close()
    finally:
        broker.stop()
    states = [d["state"] for d in of_kind(after, "status")]
    assert "online" in states, states  # re-published after the reconnect
    seqs = sorted({p["seq"] for p in of_kind(before + after, "predictions")})
    boots = {p["boot"] for p in of_kind(before + after, "predictions")}
    assert len(boots) == 1
    missing = sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs))
    assert missing == [], f"{len(missing)} predictions lost across the broker restart: {missing[:20]}"
    assert "MQTT connection to" in agent.log() and "lost" in agent.log()


def test_failing_camera_is_reopened_and_reported(start_agent: StartAgent, shared_broker: Broker) -> None:
    agent = start_agent({"camera": [{"name": "flaky", "source": "synthetic:fail?after=15", "fps": 30.0}]},
                        broker=shared_broker)
    sub = subscriber(shared_broker, f"edgecv/{agent.device}/status", f"edgecv/{agent.device}/predictions")

    def reopened_and_flowing(msgs: list[Received]) -> bool:
        cams = [d["cameras"]["flaky"] for d in of_kind(msgs, "status") if d["state"] == "online"]
        seen_reopening = any(c["state"] == "reopening" and c["error"] for c in cams)
        return seen_reopening and any(c["state"] == "open" and c["reopens"] >= 1 for c in cams)

    msgs = collect(sub, reopened_and_flowing, 30, agent)
    error = next(d["cameras"]["flaky"]["error"] for d in of_kind(msgs, "status")
                 if d["cameras"]["flaky"]["state"] == "reopening" and d["cameras"]["flaky"]["error"])
    assert "Synthetic failure" in error
    more = collect(sub, lambda m: len(of_kind(m, "predictions")) >= 5, 15, agent)  # predictions resume
    assert of_kind(more, "predictions")[-1]["camera"] == "flaky"
    assert agent.stop() == 0
    sub.close()


def test_sigkill_leaves_the_last_will_offline(start_agent: StartAgent, shared_broker: Broker) -> None:
    agent = start_agent(broker=shared_broker)
    sub = subscriber(shared_broker, f"edgecv/{agent.device}/status")
    collect(sub, lambda m: any(d["state"] == "online" for d in of_kind(m, "status")), 30, agent)
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)
    msgs = collect(sub, lambda m: any(d["state"] == "offline" for d in of_kind(m, "status")), 15, agent)
    will = next(d for d in of_kind(msgs, "status") if d["state"] == "offline")
    assert will["device"] == agent.device and will["model"]["name"]
    sub.close()
    late = subscriber(shared_broker, f"edgecv/{agent.device}/status")  # and it is the retained state
    assert decode(late.wait_for(lambda m: m.retain, 5).payload)["state"] == "offline"
    late.close()


def test_spooled_predictions_survive_an_agent_restart(start_agent: StartAgent, tmp_path: Path) -> None:
    broker = Broker(tmp_path)  # not started yet: the first agent cannot deliver anything
    spool = tmp_path / "spool"
    overrides = {"publish": {"spool_dir": str(spool)}}
    first = start_agent(overrides, broker=broker)
    assert wait_until(lambda: (spool / "outbox.log").exists() and (spool / "outbox.log").stat().st_size > 2000, 30)
    assert first.stop() == 0
    broker.start()
    try:
        sub = subscriber(broker, f"edgecv/{first.device}/predictions")
        second = start_agent({**overrides, "device_id": first.device}, broker=broker)
        msgs = collect(sub, lambda m: len({d["boot"] for d in of_kind(m, "predictions")}) >= 2, 30, second)
        preds = of_kind(msgs, "predictions")
        first_boot = preds[0]["boot"]
        old = [p["seq"] for p in preds if p["boot"] == first_boot]
        assert old[0] == 0 and old == list(range(len(old)))  # buffered ones arrive first, in order
        assert second.stop() == 0
        sub.close()
    finally:
        broker.stop()


@pytest.mark.parametrize(("content", "message"), [
    ('device_id = "x"\n[camera]\nfps = "fast"\n', "camera"),
    ('device_id = "x"\nbogus = 1\n', "bogus"),
    ('prefix = "edgecv"\n', "device_id"),
    ('device_id = "x"\n[[camera]]\nfps = "fast"\n', "camera[0].fps"),
    ('device_id = "x"\n[broker]\npassword_env = "EDGECV_SURELY_UNSET"\nusername = "u"\n', "EDGECV_SURELY_UNSET"),
    ("device_id = \n", "not valid TOML"),
])
def test_bad_configs_fail_with_one_clear_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(content)
    for command in ("check-config", "run --config"):
        proc = subprocess.run([*agent_command(), *command.split(), str(path)], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2, (command, proc.stderr)
        lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgecv-agent: error:")]
        assert len(lines) == 1 and message in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr


def test_unusable_model_store_is_a_clear_startup_error(tmp_path: Path, shared_broker: Broker) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(to_toml({"device_id": "no-model", "broker": {"port": shared_broker.port},
                             "model": {"store": str(tmp_path / "store"), "bundle": str(tmp_path / "missing")}}))
    proc = subprocess.run([*agent_command(), "run", "--config", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert "edgecv-agent: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_watch_prints_predictions_filtered_by_device_and_group(start_agent: StartAgent,
                                                              shared_broker: Broker) -> None:
    import json

    agent = start_agent({"groups": ["lab"]}, broker=shared_broker)
    sub = subscriber(shared_broker, f"edgecv/{agent.device}/status")
    collect(sub, lambda m: any(d["state"] == "online" for d in of_kind(m, "status")), 30, agent)
    sub.close()
    exe = Path(sys.executable).parent / "edgecv"
    edgecv = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgecv.tools.cli"]
    base = [*edgecv, "watch", "--broker", f"{shared_broker.host}:{shared_broker.port}"]
    proc = subprocess.run([*base, "--json", "--group", "lab", "--count", "5", "--timeout", "30"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == 5 and {d["device"] for d in docs} == {agent.device}
    assert all(set(d) >= PREDICTION_KEYS for d in docs)
    table = subprocess.run([*base, "--device", agent.device, "--count", "3", "--timeout", "30"],
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["TIME", "DEVICE", "CAMERA", "TOP"] and len(lines) == 4
    assert all(agent.device[:16] in line for line in lines[1:])
    other = subprocess.run([*base, "--group", "no-such-group", "--count", "1", "--timeout", "2"],
                           capture_output=True, text=True, timeout=60)
    assert other.returncode == 1 and "Only 0 of 1 predictions" in other.stderr
    assert agent.stop() == 0


def test_watch_unpacks_batched_predictions_and_stops_at_count(start_agent: StartAgent,
                                                              shared_broker: Broker) -> None:
    """A device with publish.batch_max = 20 at an unpaced camera: `edgecv watch --json --count 45` prints
    exactly 45 predictions, one per line, consecutive seqs, although they arrived as arrays."""
    agent = start_agent({"camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 0.0}],
                         "publish": {"batch_max": 20}}, broker=shared_broker)
    exe = Path(sys.executable).parent / "edgecv"
    edgecv = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgecv.tools.cli"]
    proc = subprocess.run([*edgecv, "watch", "--broker", f"{shared_broker.host}:{shared_broker.port}", "--json",
                           "--device", agent.device, "--count", "45", "--timeout", "30"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(docs) == 45 and all(isinstance(d, dict) and set(d) >= PREDICTION_KEYS for d in docs)
    seqs = [d["seq"] for d in docs]
    assert seqs == list(range(seqs[0], seqs[0] + 45))
    assert agent.stop() == 0


def test_hot_swap_between_frames_loses_nothing(tmp_path: Path, shared_broker: Broker, fashion_bundle: Path) -> None:
    """In-process Agent: swap_classifier while frames flow; predictions switch model with no seq gap."""
    import dataclasses
    import shutil
    import threading

    from edgecv.agent.app import App
    from edgecv.agent.config import parse_config
    from edgecv.agent.contract.bundle import load_bundle, write_manifest
    from edgecv.agent.vision.classifier import Classifier

    v2 = tmp_path / "v2"
    shutil.copytree(fashion_bundle, v2, ignore=shutil.ignore_patterns("manifest.sig"))
    manifest = load_bundle(v2).manifest
    write_manifest(v2, dataclasses.replace(manifest, version=manifest.version + "-swapped"))
    config = parse_config({
        "device_id": f"swap-{time.time_ns()}", "broker": {"port": shared_broker.port},
        "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 60.0}],
        "model": {"store": str(tmp_path / "store"), "bundle": str(fashion_bundle), "runtime": "onnxruntime"},
        "security": {"allow_unsigned": True}, "homeassistant": {"enabled": False}})
    app = App(config)
    agent = app.agent
    sub = subscriber(shared_broker, f"edgecv/{config.device_id}/predictions")
    stop = threading.Event()
    runner = threading.Thread(target=app.run, args=(stop,))
    runner.start()
    try:
        first = collect(sub, lambda m: len(m) >= 20, 30)
        new = Classifier.load(v2, runtime="onnxruntime")
        old = agent.swap_classifier(new)
        assert old is not None and old.version == manifest.version and agent.classifier is new
        rest = collect(sub, lambda m: sum(d["model"]["version"].endswith("-swapped")
                                          for d in of_kind(m, "predictions")) >= 20, 30)
    finally:
        stop.set()
        runner.join(30)
        sub.close()
    preds = of_kind(first + rest, "predictions")
    seqs = [p["seq"] for p in preds]
    assert seqs == list(range(len(seqs)))
    versions = [p["model"]["version"] for p in preds]
    switch = versions.index(manifest.version + "-swapped")
    assert set(versions[:switch]) == {manifest.version} and set(versions[switch:]) == {manifest.version + "-swapped"}
    assert agent.monitor.errors == 0
    assert agent.monitor.frames == agent.monitor.inferred  # every frame taken was classified
