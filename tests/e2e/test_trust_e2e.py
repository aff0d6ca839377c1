"""Device trust under faults, end to end: real `edgecv-agent run` processes, a real Mosquitto, the real `edgecv` CLI.

- `edgecv push --wait-probation` reports whether the model survived its probation, not only that it became active.
- A device whose only model fails its own self-test publishes no prediction, says why, and takes a push.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgecv.agent.contract.bundle import Manifest, write_manifest
from tests.broker import Broker
from tests.bundle_factory import make_bundle
from tests.e2e.conftest import StartAgent, wait_until
from tests.e2e.test_delivery_e2e import bundles, cli, secure_agent, signing, watch_factory  # noqa: F401 (fixtures)
from tests.ops.probe import Probe

pytestmark = pytest.mark.e2e


def test_push_wait_probation_reports_survival_and_rollback(start_agent: StartAgent, shared_broker: Broker,  # type: ignore[no-untyped-def]
                                                           signing, bundles, watch_factory) -> None:  # noqa: F811
    _, ring = signing
    agent = secure_agent(start_agent, shared_broker, ring, bundles["1.0"], update={"probation_s": 2.0})
    watch = watch_factory(shared_broker, [agent.device])
    watch.wait_predictions(agent.device, 2)
    done = cli("push", str(bundles["2.0"]), "--device", agent.device, "--wait-probation", "--no-progress",
               broker=shared_broker)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "probation passed" in done.stdout and "active" in done.stdout
    states = [(s["state"], s.get("probation")) for s in watch.states[agent.device] if s.get("version") == "2.0"]
    assert ("active", "running") in states and states[-1] == ("active", "passed")
    # a model that passes its self-test and then fails on camera frames: active at first, rolled back in probation
    failed = cli("push", str(bundles["broken"]), "--device", agent.device, "--wait-probation", "--no-progress",
                 broker=shared_broker)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "rolled_back" in failed.stdout and "inference errors" in failed.stdout
    n = watch.count(agent.device)
    watch.wait_predictions(agent.device, 3)
    assert watch.versions_after(agent.device, n) == {"2.0"}


def _failing_selftest_bundle(root: Path) -> Path:
    src = make_bundle(root, "1.0", top1=4)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["selftest"]["expected_top1"] = [5, 5, 5, 5]  # the model gives 4: its own self-test fails everywhere
    write_manifest(src, Manifest.from_dict(manifest))
    return src


def test_a_model_failing_its_self_test_at_start_never_publishes(start_agent: StartAgent, shared_broker: Broker,
                                                                 tmp_path: Path) -> None:
    """Before: the active model's self-test ran only for pushed bundles, so a model computing garbage on this
    device was served at start without a word. Now the agent serves no model, says why, and waits for a push."""
    seed = _failing_selftest_bundle(tmp_path / "bad")
    agent = start_agent({"homeassistant": {"enabled": False}}, broker=shared_broker, bundle=seed)
    probe = Probe(shared_broker.port)
    for kind in ("status", "model/state", "health", "predictions"):
        assert probe.subscribe(f"{agent.topics.base}/{kind}")
    got: dict[str, list[dict[str, Any]]] = {"status": [], "model/state": [], "health": [], "predictions": []}

    def collect() -> None:
        for m in probe.collect(0.2):
            got[m.topic.split("/", 2)[2]].append(json.loads(m.payload))

    def frames_skipped_without_model() -> bool:
        collect()
        return any(h["skipped_by"].get("no_model", 0) >= 10 for h in got["health"])

    assert wait_until(frames_skipped_without_model, 60), f"{got}\n{agent.log()}"
    assert got["predictions"] == []  # frames flowed (10+ skipped for want of a model), none was published
    health = got["health"][-1]
    assert health["published"] == 0 and health["model"] is None
    status = got["status"][-1]
    assert status["model"] is None and "No installed model passes its self-test" in status["model_error"]
    state = got["model/state"][-1]
    assert state["state"] == "idle" and "frames disagree" in state["error"]
    assert agent.alive()
    probe.close()
