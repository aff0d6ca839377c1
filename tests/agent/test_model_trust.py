"""No model runs unchecked: absolute latency budget and self-test time limit (refused at self-test, rolled back in
probation), `probation: passed` announced, the self-test never holds the lock a rollback needs, and the start-up
self-test (other runtime, then previous version, then no model at all). Real store, bundles, classifier and
runtimes; the MQTT link is the in-memory twin."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgecv.agent.config import parse_config
from edgecv.agent.contract.bundle import Bundle, Manifest, write_manifest
from edgecv.agent.contract.signing import Keyring, generate_private_key, load_keyring, public_key_pem
from edgecv.agent.delivery.store import ModelStore
from edgecv.agent.delivery.updater import Probe, Updater
from edgecv.agent.errors import NoModelError
from edgecv.agent.vision.classifier import Classifier
from edgecv.agent.vision.runtimes.litert import LiteRtEngine
from tests.agent.test_updater import BRIGHT, FakeAgent, push, wait_state
from tests.bundle_factory import make_archive, make_bundle
from tests.waiting import wait_until


@pytest.fixture(scope="module")
def key():  # type: ignore[no-untyped-def]
    return generate_private_key()


def _device(tmp_path: Path, key: Any, **update: Any) -> tuple[FakeAgent, Updater]:
    ring = tmp_path / "keyring"
    ring.mkdir()
    (ring / "ws.pub").write_bytes(public_key_pem(key.public_key()))
    agent = FakeAgent(tmp_path, ring, **update)
    bundle = agent.store.ensure_model(make_archive(tmp_path / "seed", "1.0", top1=1, key=key), Keyring.from_path(ring))
    agent.classifier = Classifier.load(bundle)
    return agent, Updater(agent.config, agent.topics, agent.link, agent.store, load_keyring(ring), host=agent)


@pytest.fixture
def stop_after() -> Iterator[list[Updater]]:
    started: list[Updater] = []
    yield started
    for updater in started:
        updater.stop()


def _states(agent: FakeAgent, transfer: str) -> list[dict[str, Any]]:
    return [s for s in agent.link.states() if s["transfer"] == transfer]


def test_budget_defaults_to_one_frame_period_of_the_fastest_camera() -> None:
    def cfg(**kw: Any) -> Any:
        return parse_config({"device_id": "d", **kw})

    assert cfg(camera=[{"name": "a", "fps": 10.0}, {"name": "b", "fps": 25.0}]).latency_budget_ms() == 40.0
    assert cfg(camera=[{"fps": 0.0}]).latency_budget_ms() == 1000.0
    assert cfg(camera=[{"fps": 25.0}], update={"max_latency_ms": 250.0}).latency_budget_ms() == 250.0


@pytest.mark.parametrize(("update", "message"), [
    ({"max_latency_ms": 0.0001}, "Model is too slow for this device: median"),
    ({"selftest_timeout_s": 1e-9}, "took longer than its limit of 1e-09 s (update.selftest_timeout_s)"),
])
def test_a_model_over_the_budget_is_rejected_at_self_test(tmp_path: Path, key: Any, stop_after: list[Updater],
                                                          update: dict[str, Any], message: str) -> None:
    agent, updater = _device(tmp_path, key, **update)
    stop_after.append(updater.start())
    before = agent.classifier
    tid = push(agent, make_archive(tmp_path, "2.0", top1=2, key=key).read_bytes(), "2.0")
    state = wait_state(agent, tid, ("active", "rejected"))
    assert state["state"] == "rejected" and message in state["error"], state
    assert agent.classifier is before and agent.store.current().manifest.version == "1.0"


def test_a_model_over_the_budget_in_probation_is_rolled_back(tmp_path: Path, key: Any,
                                                             stop_after: list[Updater]) -> None:
    """It passed its self-test (fast on the self-test frames), then every real frame takes 3.5 ms against a 2 ms
    budget (slowness injected at the runtime boundary). The old rule alone (3x its self-test median + 5 ms) would
    have kept it: the absolute budget rolls it back."""
    agent, updater = _device(tmp_path, key, max_latency_ms=2.0, probation_s=30.0)
    stop_after.append(updater.start())
    tid = push(agent, make_archive(tmp_path, "2.0", top1=2, key=key).read_bytes(), "2.0")
    active = wait_state(agent, tid, ("active", "rejected"))
    assert active["state"] == "active" and active["probation"] == "running" and active["probation_s"] == 30.0
    engine = agent.classifier.engine
    run = engine.run

    def slow(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.0035)
        return run(batch)  # type: ignore[no-any-return]

    engine.run = slow  # type: ignore[method-assign]
    for _ in range(6):
        agent.classifier.classify(BRIGHT)
    state = wait_state(agent, tid, ("rolled_back",), timeout=10)
    assert "exceeds the device's budget of 2.0 ms" in state["error"] and state["version"] == "1.0"
    assert agent.classifier.version == "1.0"


def test_probe_verdict_on_the_absolute_budget() -> None:
    probe = Probe(baseline_ms=100.0, budget_ms=20.0)  # relative rule: 3 x 100 + 5 = 305 ms would allow it
    probe.infer_ms, probe.total_ms = [30.0] * 10, [31.0] * 10
    assert "exceeds the device's budget of 20.0 ms" in (probe.verdict() or "")
    probe.total_ms = [19.0] * 10
    assert probe.verdict() is None


def test_a_model_that_survives_probation_is_announced(tmp_path: Path, key: Any, stop_after: list[Updater]) -> None:
    agent, updater = _device(tmp_path, key, probation_s=0.5)
    stop_after.append(updater.start())
    tid = push(agent, make_archive(tmp_path, "2.0", top1=2, key=key).read_bytes(), "2.0")
    passed = wait_state(agent, tid, ("active",), timeout=10)
    for _ in range(3):  # a few frames on probation (fewer than the latency rules judge: load cannot fail it)
        agent.classifier.classify(BRIGHT)
    assert wait_until(lambda: _states(agent, tid)[-1].get("probation") == "passed", 10)
    passed = _states(agent, tid)[-1]
    assert [(s["state"], s.get("probation")) for s in _states(agent, tid)][-2:] == [("active", "running"),
                                                                                    ("active", "passed")]
    assert passed["version"] == "2.0" and agent.classifier.version == "2.0"
    # and a pusher asking again later learns the final word, not the provisional one
    agent.link.deliver(f"edgecv/dev1/model/push/{tid}/begin",
                       json.dumps({**json.loads(_begin_payload(tmp_path, key, tid))}).encode())
    repeated = [json.loads(m.payload) for m in agent.link.messages("+/+/model/state") if not m.retain]
    assert repeated and repeated[-1]["probation"] == "passed"


def _begin_payload(tmp_path: Path, key: Any, tid: str) -> bytes:
    from edgecv.agent.contract.transfer import begin_for

    data = (tmp_path / "tiny-2.0.edgecv").read_bytes()
    return begin_for(data, "tiny", "2.0", chunk_size=4096, transfer_id=tid).to_payload()


def test_a_rollback_does_not_wait_for_a_self_test(tmp_path: Path, key: Any, stop_after: list[Updater],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A push's self-test is held at its first frame (an injected gate); a rollback command meanwhile completes
    at once instead of waiting for it (before: the self-test held the swap lock, ~20 s for a slow model)."""
    agent, updater = _device(tmp_path, key, probation_s=0.0)
    stop_after.append(updater.start())
    tid = push(agent, make_archive(tmp_path / "two", "2.0", top1=2, key=key).read_bytes(), "2.0")
    assert wait_state(agent, tid, ("active", "rejected"))["state"] == "active"
    in_selftest, release = threading.Event(), threading.Event()
    forward = Classifier.forward

    def gated(self: Classifier, image: np.ndarray) -> Any:
        if self.version == "3.0" and threading.current_thread().name == "updater":
            in_selftest.set()
            release.wait(30)
        return forward(self, image)

    monkeypatch.setattr(Classifier, "forward", gated)
    tid3 = push(agent, make_archive(tmp_path / "three", "3.0", top1=3, key=key).read_bytes(), "3.0")
    try:
        assert in_selftest.wait(20), "the self-test of 3.0 did not start"
        t0 = time.monotonic()
        rolled = updater.rollback(reason="operator")
        took = time.monotonic() - t0
        assert rolled.manifest.version == "1.0" and agent.classifier.version == "1.0"
        assert took < 5.0 and not release.is_set(), took  # done while the self-test is still held
    finally:
        release.set()
    assert wait_state(agent, tid3, ("active", "rejected"))["state"] == "active"  # and the push completes after
    assert agent.classifier.version == "3.0"


# ------------------------------------------------------------------------------------------ start-up self-test
def _start_device(tmp_path: Path, store: ModelStore, **model: Any) -> tuple[FakeAgent, Updater]:
    agent = FakeAgent(tmp_path, None)
    agent.config = parse_config({"device_id": "dev1", "model": {"store": str(store.root), **model},
                                 "security": {"allow_unsigned": True}})
    agent.store = store
    return agent, Updater(agent.config, agent.topics, agent.link, store, None, host=agent)


def _failing_selftest(root: Path, version: str, top1: int) -> Path:
    """A bundle whose model gives `top1` but whose self-test expects top1 + 1 (unsigned: the device allows it)."""
    src = make_bundle(root, version, top1=top1)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["selftest"]["expected_top1"] = [top1 + 1] * 4
    write_manifest(src, Manifest.from_dict(manifest))
    return src


def test_at_start_a_runtime_that_computes_garbage_is_not_used(tmp_path: Path, tiny_bundle: Bundle,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              stop_after: list[Updater]) -> None:
    """The issue's emulated-CPU case: LiteRT (preferred for int8) returns wrong logits on this device. The
    start-up self-test catches it, the agent runs the bundle on onnxruntime and says why."""
    real_run, real_codes = LiteRtEngine.run, LiteRtEngine.run_codes
    monkeypatch.setattr(LiteRtEngine, "run", lambda self, x: np.roll(real_run(self, x), 3, axis=1))
    monkeypatch.setattr(LiteRtEngine, "run_codes", lambda self, c: np.roll(real_codes(self, c), 3, axis=1))
    store = ModelStore(tmp_path / "store")
    store.ensure_model(tiny_bundle.root, allow_unsigned=True)
    agent, updater = _start_device(tmp_path, store)
    clf = updater.load_active()
    assert clf.engine.name == "onnxruntime" and agent.classifier is clf
    stop_after.append(updater.start())
    state = agent.link.states()[-1]
    assert state["state"] == "active" and "failed its self-test" in state["error"]
    assert "litert" in state["error"] and "running it on onnxruntime instead" in state["error"]


def test_at_start_a_failing_model_falls_back_to_the_previous_version(tmp_path: Path,
                                                                     stop_after: list[Updater]) -> None:
    store = ModelStore(tmp_path / "store")
    store.ensure_model(make_bundle(tmp_path / "good", "1.0", top1=1), allow_unsigned=True)
    store.activate(store.install(_failing_selftest(tmp_path / "bad", "2.0", top1=4), allow_unsigned=True))
    agent, updater = _start_device(tmp_path, store)
    clf = updater.load_active()
    assert clf.version == "1.0" and store.current().manifest.version == "1.0"
    assert clf.classify(BRIGHT).top[0]["index"] == 1
    stop_after.append(updater.start())
    state = agent.link.states()[-1]
    assert state["state"] == "rolled_back" and state["version"] == "1.0"
    assert "tiny 2.0 failed its self-test at start" in state["error"] and "fell back to tiny 1.0" in state["error"]


def test_with_no_passing_model_the_device_serves_none_and_says_why(tmp_path: Path,
                                                                   stop_after: list[Updater]) -> None:
    store = ModelStore(tmp_path / "store")
    store.ensure_model(_failing_selftest(tmp_path / "bad", "2.0", top1=4), allow_unsigned=True)
    agent, updater = _start_device(tmp_path, store)
    problems: list[str | None] = []
    updater._on_model_problem = problems.append
    with pytest.raises(NoModelError, match="No installed model passes its self-test"):
        updater.load_active()
    assert agent.classifier is None and problems and "waiting for a push" in (problems[-1] or "")
    stop_after.append(updater.start())
    state = agent.link.states()[-1]
    assert state["state"] == "idle" and state["version"] == "2.0" and "frames disagree" in state["error"]
