"""RabbitMQ's MQTT plugin as the fleet's broker (slow: a private RabbitMQ node takes 10-20 s to start).

RabbitMQ 3.10 does not deliver retained messages to wildcard subscriptions, only to exact-topic ones: a late
`<p>/+/status` subscriber hears nothing of the devices already online. This test measures that on a real node
(so it notices if a RabbitMQ release fixes it) and proves the workaround: `edgecv devices`, `watch --group` and
`push --group` send the announce request (`<p>/announce`) after subscribing, and every online device re-publishes
its status and model state, which arrive live. The Last Will and commands work as on any broker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgecv.agent.contract import topics as T
from edgecv.agent.contract.topics import decode
from tests.broker import RabbitBroker, rabbitmq_server
from tests.bundle_factory import make_archive
from tests.e2e.conftest import AgentLauncher, Target, collect, docs_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
GROUP = "warren"


def test_fleet_listing_and_group_push_work_without_retained_wildcard_delivery(tmp_path: Path,
                                                                              signing: tuple[Any, Path]) -> None:
    if rabbitmq_server() is None:
        pytest.fail("rabbitmq-server is not installed (Debian package rabbitmq-server; scripts/setup.sh installs it "
                    "when EDGECV_SLOW=1)")
    key, ring = signing
    bundles = {v: make_archive(tmp_path / "bundles", v, top1=int(float(v)), key=key) for v in ("1.0", "2.0")}
    broker = RabbitBroker(tmp_path / "rabbitmq").start()
    launcher = AgentLauncher(tmp_path, bundles["1.0"])
    try:
        ws = Target("rabbitmq", broker, "3.1.1")
        agent = launcher.start({"broker": {"protocol": "3.1.1"}, "groups": [GROUP],
                                "security": {"keyring": str(ring), "allow_unsigned": False},
                                "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 10.0}]},
                               broker=broker)
        exact = ws.client(agent.topics.status)  # exact topic: the retained status is delivered
        try:
            collect(exact, lambda m: any(d["state"] == "online" for d in docs_of(m, agent.topics.status)), 60, agent)
        finally:
            exact.close()
        late = ws.client(agent.topics.status)
        try:
            assert decode(late.wait_for(lambda m: m.retain, 10).payload)["state"] == "online"
        finally:
            late.close()

        # The limitation: the same retained status is not delivered to a wildcard subscription.
        wild = ws.client(T.fleet_filter("edgecv", "status"), T.fleet_filter("edgecv", "model/state"))
        try:
            # A negative check needs a window (on Mosquitto or NATS the retained status arrives within ms); live
            # updates (a camera coming up) may arrive meanwhile, with the retain flag clear.
            heard = list(wild.iter_messages(timeout=3.0))
            assert not [m for m in heard if m.retain], f"RabbitMQ now delivers retained messages to wildcards: {heard}"
            # ... and the announce request brings both documents live
            wild.publish(T.announce_topic("edgecv"), {"id": "rabbit"})
            msgs = collect(wild, lambda m: bool(docs_of(m, agent.topics.status)
                                                and docs_of(m, agent.topics.model_state)), 15, agent)
            assert docs_of(msgs, agent.topics.status)[-1]["state"] == "online"
        finally:
            wild.close()

        listed = ws.cli("devices", "--json", "--wait", "1.5")
        assert listed.returncode == 0, listed.stderr
        mine = [d for d in json.loads(listed.stdout) if d["device"] == agent.device]
        assert len(mine) == 1 and mine[0]["state"] == "online" and mine[0]["model_version"] == "1.0", listed.stdout
        assert mine[0]["model_state"] == "active" and mine[0]["groups"] == [GROUP]

        res = ws.cli("push", str(bundles["2.0"]), "--group", GROUP, "--timeout", "60", "--no-progress")
        assert res.returncode == 0, res.stdout + res.stderr + agent.log()[-2000:]
        watched = ws.cli("watch", "--json", "--group", GROUP, "--count", "3", "--timeout", "30")
        assert watched.returncode == 0, watched.stderr
        docs = [json.loads(line) for line in watched.stdout.splitlines()]
        assert {d["device"] for d in docs} == {agent.device}
        assert {d["model"]["version"] for d in docs} == {"2.0"}

        sub = ws.client(agent.topics.status, agent.topics.cmd_result("ping"))
        try:
            sub.publish(agent.topics.cmd("ping"), {"id": "rabbit-1"})
            pong = sub.wait_for(lambda m: m.topic.endswith("/cmd/ping/result"), 15).json()
            assert pong["id"] == "rabbit-1" and pong["ok"] and pong["model"]["version"] == "2.0"
            agent.kill()
            msgs = collect(sub, lambda m: any(d["state"] == "offline" for d in docs_of(m, agent.topics.status)), 20,
                           agent)
            assert docs_of(msgs, agent.topics.status)[-1]["device"] == agent.device
        finally:
            sub.close()
    finally:
        launcher.close()
        broker.stop()
