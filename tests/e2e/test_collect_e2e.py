"""Sample collection end to end: a real `edgecv-agent run` on a `synthetic:scene` clip with a door region and
`[samples]` on, a real Mosquitto, and `edgecv collect` writing the dataset that `edgecv label` reads."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgecv.agent.contract.samples import REASONS
from edgecv.agent.vision.scene import DOOR_CROP, SCENE_LABELS
from edgecv.tools.dataset_layout import UNLABELLED, read_sidecar
from edgecv.tools.fleet.collect import PART_SUFFIX, SampleFetcher, collect_device
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received
from edgecv.tools.label.store import LabelStore
from tests.broker import Broker
from tests.e2e.conftest import AgentHandle, StartAgent
from tests.e2e.test_agent_e2e import collect, of_kind, subscriber

pytestmark = pytest.mark.e2e

FRAMES = 40
SCENE = f"synthetic:scene?seed=2&hold=20&objects=0&frames={FRAMES}"  # a 40-frame clip whose door state is known


def edgecv(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "edgecv"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "edgecv.tools.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=300)


class Interrupted(Exception):
    """Raised from the progress hook: a run stopped after some chunks (a protocol point, not a timer)."""


def settled_samples(agent: AgentHandle, broker: Broker) -> dict[str, Any]:
    """The health `samples` block once the clip has ended and two reports in a row show the same counts."""
    sub = subscriber(broker, f"edgecv/{agent.device}/health")

    def settled(msgs: list[Received]) -> bool:
        docs = of_kind(msgs, "health")
        if len(docs) < 2 or docs[-1]["cameras"]["garage"]["state"] != "ended":
            return False
        a, b = docs[-2]["samples"], docs[-1]["samples"]
        return a == b and b["queued"] == 0

    msgs = collect(sub, settled, 120, agent)
    sub.close()
    return of_kind(msgs, "health")[-1]["samples"]  # type: ignore[no-any-return]


def test_collect_fetches_verified_samples_resumes_skips_what_it_has_and_deletes(
        start_agent: StartAgent, shared_broker: Broker, scene_bundle: Path, tmp_path: Path) -> None:
    device = f"collect-{tmp_path.name}"[:60]
    agent = start_agent({"device_id": device, "on_cameras_ended": "idle",
                         "camera": [{"name": "garage", "source": SCENE, "loop": False, "fps": 0.0,
                                     "region": [{"name": "door", "crop": list(DOOR_CROP), "trigger": "every"}]}],
                         "samples": {"enabled": True, "low_confidence": 1.0, "min_interval_s": 0.0, "queue": 256}},
                        broker=shared_broker, bundle=scene_bundle)
    health = settled_samples(agent, shared_broker)
    stored = health["stored"]
    assert stored >= 10 and health["errors"] == 0, health
    assert stored + health["dropped"] + health["limited"] >= FRAMES - 2  # every result is kept (score < 1.0)
    assert health["by_reason"]["state_change"] >= 1 and health["by_reason"]["pending"] >= 1, health
    broker = f"{shared_broker.host}:{shared_broker.port}"
    options = ClientOptions(host=shared_broker.host, port=shared_broker.port)
    with MqttClient(options) as client:
        listed = {s.id: s for s in SampleFetcher(client, "edgecv", device).list_all()}
    assert len(listed) == stored
    ds = tmp_path / "dataset"

    # 1. a run interrupted after 5 chunks of 1 KiB: the first sample is partly on disk, hidden
    chunks = 0

    def interrupt(n: int) -> None:
        nonlocal chunks
        chunks += 1
        if chunks == 5:
            raise Interrupted

    with pytest.raises(Interrupted):
        collect_device(options, "edgecv", device, ds, chunk_size=1024, progress=interrupt)
    first = min(listed)
    part = ds / UNLABELLED / f".{first}{PART_SUFFIX}"
    assert part.stat().st_size == 5 * 1024 < listed[first].bytes
    assert not list((ds / UNLABELLED).glob("*.jpg"))  # nothing incomplete is visible
    # a partial download of another sample that is not its image: found out by the sha256, fetched again
    second = sorted(listed)[1]
    (ds / UNLABELLED / f".{second}{PART_SUFFIX}").write_bytes(b"\0" * 100)

    # 2. edgecv collect resumes and completes: every image byte-identical to the device's, with its sidecar
    run = edgecv("collect", "--device", device, "--out", str(ds), "--broker", broker, "--json", "--no-progress")
    assert run.returncode == 0, run.stderr
    [result] = json.loads(run.stdout)
    assert result["ok"] and sorted(result["fetched"]) == sorted(listed) and result["already"] == []
    total = sum(s.bytes for s in listed.values())
    assert result["bytes"] == total
    # resumed: the first sample's 5 KiB were not fetched again; the second's rest was, and then all of it
    assert result["transferred"] == total - 5 * 1024 + listed[second].bytes - 100
    assert not list((ds / UNLABELLED).glob(".*"))
    box_w, box_h = 192, 288  # DOOR_CROP of a 640x480 frame
    for sample_id, sample in listed.items():
        image = ds / UNLABELLED / f"{sample_id}.jpg"
        data = image.read_bytes()
        assert hashlib.sha256(data).hexdigest() == sample.sha256 and len(data) == sample.bytes
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert decoded.shape == (box_h, box_w, 3)  # the region's crop (samples.what = "crop")
        side = read_sidecar(ds / UNLABELLED / f"{sample_id}.json")
        assert (side.camera, side.region, side.device) == ("garage", "door", device)
        assert side.reason in REASONS and side.predicted in SCENE_LABELS and 0.0 <= (side.score or 0) < 1.0
        assert side.model is not None and side.model.name == "scene-door-linear"
        assert side.model.labels == SCENE_LABELS and side.truth in (0, 1)
        assert side.ts is not None and sample_id.startswith(f"{device}-")

    # 3. again: nothing new is fetched, also for a sample a person has labelled meanwhile
    labelled = ds / "open"
    labelled.mkdir()
    moved = sorted(listed)[-1]
    (ds / UNLABELLED / f"{moved}.jpg").rename(labelled / f"{moved}.jpg")
    again = edgecv("collect", "--device", device, "--out", str(ds), "--broker", broker, "--json", "--no-progress")
    assert again.returncode == 0, again.stderr
    [result] = json.loads(again.stdout)
    assert result["fetched"] == [] and sorted(result["already"]) == sorted(listed) and result["transferred"] == 0
    assert not (ds / UNLABELLED / f"{moved}.jpg").exists()

    # 4. --delete-after frees the device's store (what is in the dataset was verified by its sha256)
    table = edgecv("collect", "--device", device, "--out", str(ds), "--broker", broker, "--delete-after",
                   "--no-progress")
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:3] == ["DEVICE", "LISTED", "FETCHED"]
    assert row.split() == [device, str(stored), "0", str(stored), "0", "0", str(stored)]
    samples = edgecv("cmd", "samples", "--device", device, "--broker", broker, "--json")
    assert samples.returncode == 0, samples.stderr
    [answer] = json.loads(samples.stdout)
    assert answer["ok"] and answer["samples"] == [] and answer["more"] is False

    # 5. the dataset is what edgecv label reads: every unlabelled sample with the device's prediction
    store = LabelStore(ds)
    waiting = store.samples()
    assert len(waiting) == stored - 1
    assert all(s.sidecar is not None and s.sidecar.predicted in SCENE_LABELS for s in waiting)
    assert agent.stop() == 0


def test_collect_fails_clearly_when_the_device_keeps_no_samples(start_agent: StartAgent, shared_broker: Broker,
                                                                  tmp_path: Path) -> None:
    agent = start_agent(broker=shared_broker)  # [samples] not enabled
    run = edgecv("collect", "--device", agent.device, "--out", str(tmp_path / "ds"), "--wait-for-device", "30",
                 "--broker", f"{shared_broker.host}:{shared_broker.port}", "--no-progress")
    assert run.returncode == 1
    assert "Sample collection is off" in run.stderr and "enabled = true" in run.stderr
    assert agent.stop() == 0
