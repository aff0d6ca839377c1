"""Model delivery end to end: real Mosquitto, real `edgecv-agent run` processes, real runtimes, `edgecv` CLI.

Covers: push to one device with a hot swap (no lost frame), push to a group of 10 agents, every kind of bad
bundle rejected while the old model keeps serving, broker restart during a push (resume), automatic rollback
of a model that fails after activation, SIGKILL of agents during receive/verify/swap, and the fleet commands.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgecv.agent.contract.signing import generate_private_key
from edgecv.agent.contract.topics import MODEL_STATE_KEYS
from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient, Received
from edgecv.tools.fleet.push import Pusher
from tests.broker import Broker
from tests.bundle_factory import make_archive, make_bundle
from tests.e2e.conftest import AgentHandle, StartAgent, agent_command, wait_until

pytestmark = pytest.mark.e2e
EDGECV = [str(Path(sys.executable).parent / "edgecv")]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, signing: tuple[Any, Path]) -> dict[str, Path]:
    key, _ = signing
    work = tmp_path_factory.mktemp("bundles")
    return {"1.0": make_archive(work, "1.0", top1=1, key=key),
            "2.0": make_archive(work, "2.0", top1=2, key=key, pad_bytes=1_000_000),
            "3.0": make_archive(work, "3.0", top1=3, key=key, pad_bytes=3_000_000),
            "broken": make_archive(work, "9.0", top1=6, key=key, fail_on_bright=True)}


class Watch:
    """Collects predictions and model states of some devices."""

    def __init__(self, broker: Broker, devices: list[str]) -> None:
        self.predictions: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
        self.states: dict[str, list[dict[str, Any]]] = {d: [] for d in devices}
        self.status: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.client = MqttClient(ClientOptions(host=broker.host, port=broker.port)).connect()
        for kind in ("predictions", "model/state", "status"):
            self.client.subscribe(f"edgecv/+/{kind}", callback=self._on)

    def _on(self, msg: Received) -> None:
        device, _, kind = msg.topic.split("/", 2)[1:][0], None, msg.topic.split("/", 2)[2]
        doc = msg.json()
        with self.lock:
            if kind == "predictions" and device in self.predictions:
                self.predictions[device].append(doc)
            elif kind == "model/state" and device in self.states:
                self.states[device].append(doc)
            elif kind == "status":
                self.status[device] = doc

    def versions_after(self, device: str, n: int) -> set[str]:
        with self.lock:
            return {p["model"]["version"] for p in self.predictions[device][n:]}

    def count(self, device: str) -> int:
        with self.lock:
            return len(self.predictions[device])

    def wait_predictions(self, device: str, n: int, timeout: float = 30) -> None:
        start = self.count(device)
        assert wait_until(lambda: self.count(device) >= start + n, timeout), f"{device}: no predictions"

    def state(self, device: str, *states: str, transfer: str | None = None, timeout: float = 30) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            with self.lock:
                for s in self.states[device]:
                    if s["state"] in states and (transfer is None or s["transfer"] == transfer):
                        return s
            return None

        assert wait_until(lambda: find() is not None, timeout), f"{device}: no {states}: {self.states[device]}"
        found = find()
        assert found is not None
        return found

    def close(self) -> None:
        self.client.close()


def secure_agent(start_agent: StartAgent, mqtt: Broker, ring: Path, seed: Path,
                 **overrides: Any) -> AgentHandle:
    cfg: dict[str, Any] = {"security": {"keyring": str(ring), "allow_unsigned": False},
                           "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 10.0}],
                           "update": {"probation_s": 3.0}}
    for k, v in overrides.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return start_agent(cfg, broker=mqtt, bundle=seed)


def push(broker: Broker, archive: Path, devices: list[str], group: str | None = None, timeout: float = 60,
         **kw: Any) -> Any:
    data = archive.read_bytes()
    version = archive.stem.split("-", 1)[1]
    pusher = Pusher(ClientOptions(host=broker.host, port=broker.port), data, "tiny", version, timeout=timeout, **kw)
    return pusher, pusher.push(devices, group=group)


def cli(*args: str, broker: Broker, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*EDGECV, *args, "--broker", f"{broker.host}:{broker.port}"], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def watch_factory() -> Iterator[Any]:
    watches: list[Watch] = []

    def make(broker: Broker, devices: list[str]) -> Watch:
        w = Watch(broker, devices)
        watches.append(w)
        return w

    yield make
    for w in watches:
        w.close()


# ------------------------------------------------------------------------------------------------ tests
def test_push_one_device_hot_swap_without_lost_frames_and_commands(start_agent: StartAgent, shared_broker: Broker,
                                                                    signing, bundles, watch_factory,  # type: ignore[no-untyped-def]
                                                                    tmp_path: Path) -> None:
    _, ring = signing
    agent = secure_agent(start_agent, shared_broker, ring, bundles["1.0"])
    watch = watch_factory(shared_broker, [agent.device])
    watch.wait_predictions(agent.device, 5)
    before = watch.count(agent.device)
    res = cli("push", str(bundles["2.0"]), "--device", agent.device, "--timeout", "60", "--no-progress",
              broker=shared_broker)
    assert res.returncode == 0, res.stdout + res.stderr
    assert agent.device in res.stdout and "active" in res.stdout and "2.0" in res.stdout
    watch.wait_predictions(agent.device, 5)
    with watch.lock:
        preds = watch.predictions[agent.device][before - 5:]
    versions = [p["model"]["version"] for p in preds]
    assert versions[0] == "1.0" and versions[-1] == "2.0"
    assert all(p["top"][0]["index"] == (1 if p["model"]["version"] == "1.0" else 2) for p in preds)
    seqs = [p["seq"] for p in preds]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a frame was lost around the swap"
    assert watch.status[agent.device]["model"]["version"] == "2.0"
    with watch.lock:
        states = list(watch.states[agent.device])
    assert all(set(s) >= MODEL_STATE_KEYS for s in states)
    pushed = [s["state"] for s in states if s["version"] == "2.0" and s["transfer"]]
    assert pushed[0] == "receiving" and pushed[-2:] == ["verifying", "active"], pushed
    assert all(0 <= s["progress"] <= 1 for s in states if s["state"] == "receiving")

    # fleet commands against the running agent
    ping = cli("cmd", "ping", "--device", agent.device, "--json", broker=shared_broker)
    assert ping.returncode == 0 and json.loads(ping.stdout)[0]["model"]["version"] == "2.0"
    snap = cli("cmd", "snapshot", "--device", agent.device, "--out", str(tmp_path / "s.jpg"), "--json",
               broker=shared_broker)
    assert snap.returncode == 0, snap.stderr
    shot, = json.loads(snap.stdout)
    assert (tmp_path / "s.jpg").read_bytes()[:2] == b"\xff\xd8" and shot["top"] and "jpeg" not in shot
    assert shot["saved"] == str(tmp_path / "s.jpg") and shot["jpeg_bytes"] > 0
    devices = cli("devices", "--wait", "1.5", broker=shared_broker)
    line = next(line for line in devices.stdout.splitlines() if line.startswith(agent.device))
    assert "online" in line and "2.0" in line
    listed = json.loads(cli("devices", "--wait", "1.5", "--json", broker=shared_broker).stdout)
    mine = next(d for d in listed if d["device"] == agent.device)
    assert mine["fps"] > 0 and mine["latency_p50_ms"] > 0 and mine["model_state"] == "active"
    back = cli("rollback", "--device", agent.device, broker=shared_broker)
    assert back.returncode == 0 and "1.0" in back.stdout, back.stderr
    n = watch.count(agent.device)
    watch.wait_predictions(agent.device, 3)
    assert watch.versions_after(agent.device, n + 1) == {"1.0"}
    assert watch.state(agent.device, "rolled_back")["version"] == "1.0"
    bad = cli("rollback", "--device", agent.device, "--to", "7.7", broker=shared_broker)
    assert bad.returncode == 1 and "No installed model matches" in bad.stderr


def test_group_push_to_ten_agents_and_staged_rollout(start_agent: StartAgent, shared_broker: Broker, signing,  # type: ignore[no-untyped-def]
                                                     bundles, watch_factory, tmp_path: Path) -> None:
    from edgecv.agent.contract.signing import write_keypair

    key, ring = signing
    agents = [secure_agent(start_agent, shared_broker, ring, bundles["1.0"], groups=["lab"],
                           camera=[{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 2.0}])
              for _ in range(10)]
    outsider = secure_agent(start_agent, shared_broker, ring, bundles["1.0"], groups=["other"],
                            camera=[{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 2.0}])
    names = [a.device for a in agents]
    watch = watch_factory(shared_broker, [*names, outsider.device])
    assert wait_until(lambda: all(watch.status.get(d, {}).get("state") == "online" for d in names), 60), \
        [a.log()[-500:] for a in agents if not a.alive()]
    t0 = time.monotonic()
    res = cli("push", str(bundles["2.0"]), "--group", "lab", "--timeout", "90", "--no-progress",
              broker=shared_broker)
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    assert sum(" active " in line for line in res.stdout.splitlines()) == 10
    assert outsider.device not in res.stdout
    for d in names:
        watch.wait_predictions(d, 1, timeout=20)
        assert watch.versions_after(d, watch.count(d) - 1) == {"2.0"}
    assert watch.versions_after(outsider.device, 0) == {"1.0"}
    assert elapsed < 60, f"group push took {elapsed:.1f} s"
    print(f"group push of {bundles['2.0'].stat().st_size} bytes to 10 agents: {elapsed:.1f} s")

    # staged rollout that fails in the canary stage: nothing beyond the canaries is touched
    unsigned = make_archive(tmp_path, "6.0")
    res = cli("push", str(unsigned), "--group", "lab", "--canary", "2", "--batch-size", "4", "--max-failures", "0",
              "--timeout", "60", "--no-progress", broker=shared_broker)
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert sum(" rejected " in line for line in lines) == 2 and sum(" skipped " in line for line in lines) == 8
    # staged rollout that succeeds: canary 1, then batches of 4; given a bundle directory (packed on the fly); 1.0
    # is older than the active 2.0, so the push asks for the downgrade explicitly, signed with the key (--key)
    write_keypair(key, tmp_path / "ws.key")
    res = cli("push", str(bundles["1.0"].parent / "src-1.0"), "--group", "lab", "--canary", "1", "--batch-size",
              "4", "--timeout", "60", "--no-progress", "--allow-downgrade", "--key", str(tmp_path / "ws.key"),
              broker=shared_broker)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stderr.count("stage ") == 4 and sum(" active " in line for line in res.stdout.splitlines()) == 10


def test_bad_bundles_are_rejected_while_the_old_model_serves(start_agent: StartAgent, shared_broker: Broker,  # type: ignore[no-untyped-def]
                                                              signing, bundles, watch_factory,
                                                              tmp_path: Path) -> None:
    import io
    import tarfile

    from edgecv.agent.contract.bundle import pack_bundle

    key, ring = signing
    agent = secure_agent(start_agent, shared_broker, ring, bundles["1.0"], update={"max_bundle_bytes": 500_000})
    watch = watch_factory(shared_broker, [agent.device])
    watch.wait_predictions(agent.device, 3)
    tampered = make_bundle(tmp_path / "t", "5.0", key=key)
    model = bytearray((tampered / "model.fp32.onnx").read_bytes())
    model[-10] ^= 0xFF
    (tampered / "model.fp32.onnx").write_bytes(bytes(model))
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w:gz") as tar:
        info = tarfile.TarInfo("../../../escape.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    (tmp_path / "trav-5.0.edgecv").write_bytes(evil.getvalue())
    (tmp_path / "trunc-5.0.edgecv").write_bytes(bundles["1.0"].read_bytes()[:1200])
    cases = {
        "tampered": pack_bundle(tampered, tmp_path / "tamp-5.0.edgecv"),
        "wrong key": make_archive(tmp_path / "w", "5.0", key=generate_private_key()),
        "unsigned": make_archive(tmp_path / "u", "5.0"),
        "truncated": tmp_path / "trunc-5.0.edgecv",
        "path traversal": tmp_path / "trav-5.0.edgecv",
        "oversized": bundles["2.0"],
    }
    for case, archive in cases.items():
        n = watch.count(agent.device)
        pusher, [result] = push(shared_broker, archive, [agent.device], timeout=30)
        assert result.state in ("rejected", "failed"), (case, result)
        state = watch.state(agent.device, "rejected", transfer=pusher.transfer_id)
        assert state["error"], case
        watch.wait_predictions(agent.device, 2)
        assert watch.versions_after(agent.device, n) == {"1.0"}, case
    assert not any(p.name == "escape.txt" for p in agent.workdir.rglob("escape.txt"))
    assert agent.alive()


def test_broker_restart_during_push_resumes(start_agent: StartAgent, broker: Broker, signing, bundles,  # type: ignore[no-untyped-def]
                                            watch_factory) -> None:
    _, ring = signing
    agent = secure_agent(start_agent, broker, ring, bundles["1.0"])
    watch = watch_factory(broker, [agent.device])
    watch.wait_predictions(agent.device, 2)
    data = bundles["3.0"].read_bytes()
    sent = [0]
    restarted = threading.Event()

    def bounce() -> None:
        broker.stop(kill=True)
        time.sleep(1.0)
        broker.start()

    def progress(n: int) -> None:
        sent[0] += n
        if sent[0] > len(data) // 3 and not restarted.is_set():
            restarted.set()
            threading.Thread(target=bounce).start()

    pusher = Pusher(ClientOptions(host=broker.host, port=broker.port), data, "tiny", "3.0", chunk_size=16 * 1024,
                    timeout=90, progress=progress)
    [result] = pusher.push([agent.device])
    assert restarted.is_set()
    assert result.state == "active", result
    assert pusher.reconnects >= 1
    watch.close()
    watch = watch_factory(broker, [agent.device])
    watch.wait_predictions(agent.device, 2, timeout=30)
    assert watch.versions_after(agent.device, 0) == {"3.0"}


def test_model_failing_after_activation_is_rolled_back(start_agent: StartAgent, shared_broker: Broker,  # type: ignore[no-untyped-def]
                                                       signing, bundles, watch_factory) -> None:
    _, ring = signing
    agent = secure_agent(start_agent, shared_broker, ring, bundles["1.0"])
    watch = watch_factory(shared_broker, [agent.device])
    watch.wait_predictions(agent.device, 2)
    pusher, [result] = push(shared_broker, bundles["broken"], [agent.device])
    assert result.state == "active"  # it passed verification and its self-test
    state = watch.state(agent.device, "rolled_back", transfer=pusher.transfer_id, timeout=20)
    assert state["version"] == "1.0" and "9.0" in state["error"] and "inference errors" in state["error"]
    n = watch.count(agent.device)
    watch.wait_predictions(agent.device, 3)
    assert watch.versions_after(agent.device, n) == {"1.0"}


@pytest.mark.parametrize("rounds", [pytest.param(3, id="short"), pytest.param(20, id="long", marks=pytest.mark.slow)])
def test_agent_killed_during_receive_verify_swap_restarts_valid(start_agent: StartAgent, shared_broker: Broker,  # type: ignore[no-untyped-def]
                                                                signing, bundles, watch_factory, rounds: int) -> None:
    key, ring = signing
    agent = secure_agent(start_agent, shared_broker, ring, bundles["1.0"])
    watch = watch_factory(shared_broker, [agent.device])
    watch.wait_predictions(agent.device, 1)
    rng = random.Random(7)
    proc = agent.proc
    archives = [bundles["2.0"] if i % 2 == 0 else bundles["1.0"] for i in range(rounds)]
    for round_, archive in enumerate(archives):
        data = archive.read_bytes()
        pusher = Pusher(ClientOptions(host=shared_broker.host, port=shared_broker.port), data, "tiny",
                        archive.stem.split("-")[1], chunk_size=32 * 1024, timeout=15,
                        allow_downgrade=True, grant_key=key)  # 2.0 and 1.0 alternate: a signed downgrade
        results: list[Any] = []
        t0 = time.monotonic()
        t = threading.Thread(target=lambda p=pusher, r=results: r.extend(p.push([agent.device])), daemon=True)
        t.start()
        time.sleep(rng.uniform(0.03, 0.4))  # the push itself takes ~0.2 s: lands in receive, verify or swap
        proc.kill()
        proc.wait(10)
        log = open(agent.log_path, "ab")
        proc = subprocess.Popen([*agent_command(), "run", "--config", str(agent.config_path)],
                                stdout=subprocess.DEVNULL, stderr=log, cwd=agent.workdir,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        agent.proc = proc  # the fixture kills whatever runs last
        n = watch.count(agent.device)
        watch.wait_predictions(agent.device, 2, timeout=30)
        assert watch.versions_after(agent.device, n) <= {"1.0", "2.0"}, round_
        t.join(30)
        # the push survives the kill: the restarted agent resumes (or restarts) the transfer and activates it
        assert results and results[0].state == "active", (round_, results, time.monotonic() - t0)


def test_push_to_an_mqtt_311_agent(start_agent: StartAgent, shared_broker: Broker, signing, bundles,  # type: ignore[no-untyped-def]
                                   watch_factory) -> None:
    # chunk checksums travel in a payload header, not MQTT 5 user properties: 3.1.1 devices work the same
    _, ring = signing
    agent = secure_agent(start_agent, shared_broker, ring, bundles["1.0"], broker={"protocol": "3.1.1"})
    watch = watch_factory(shared_broker, [agent.device])
    watch.wait_predictions(agent.device, 2)
    _, [result] = push(shared_broker, bundles["2.0"], [agent.device])
    assert result.state == "active", result
    n = watch.count(agent.device)
    watch.wait_predictions(agent.device, 2)
    assert watch.versions_after(agent.device, n) == {"2.0"}
    assert "(MQTT 3.1.1" in agent.log()


def test_fresh_device_without_a_model_comes_online_and_takes_its_first_push(
        start_agent: StartAgent, shared_broker: Broker, signing, bundles, watch_factory) -> None:  # type: ignore[no-untyped-def]
    """A fresh install has an empty store and no seed bundle: the agent must stay up and accept a first push
    (exiting would put systemd into a restart loop and the device could never receive a model)."""
    _, ring = signing
    agent = start_agent({"security": {"keyring": str(ring), "allow_unsigned": False},
                         "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 10.0}],
                         "model": {"bundle": ""}}, broker=shared_broker)
    watch = watch_factory(shared_broker, [agent.device])
    assert wait_until(lambda: watch.status.get(agent.device, {}).get("state") == "online", 30), agent.log()
    assert watch.status[agent.device]["model"] is None
    time.sleep(1.0)
    assert agent.alive() and watch.count(agent.device) == 0  # frames arrive, nothing to classify them with
    res = cli("push", str(bundles["1.0"]), "--device", agent.device, "--timeout", "60", "--no-progress",
              broker=shared_broker)
    assert res.returncode == 0, res.stdout + res.stderr + agent.log()
    watch.wait_predictions(agent.device, 5)
    assert watch.versions_after(agent.device, 0) == {"1.0"}
    assert wait_until(lambda: (watch.status[agent.device].get("model") or {}).get("version") == "1.0", 10)
