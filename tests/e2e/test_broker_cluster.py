"""A three-node NATS cluster as the fleet's broker: the path for users who outgrow one broker.

Three nats-servers joined by routes, JetStream clustered (the MQTT gateway keeps retained messages and sessions in
JetStream streams replicated to all three), MQTT 3.1.1 on every node. Two agents attach to two different nodes;
the workstation talks to the third only: it lists both devices from their retained status, pushes a signed
bundle to their group, sees their predictions, commands one, sees the Last Will of the one killed, and still gets
both retained statuses after one of the other two servers is stopped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgecv.agent.contract import topics as T
from edgecv.agent.contract.topics import decode
from edgecv.tools.fleet.mqtt_client import Received
from tests.broker import NatsCluster
from tests.bundle_factory import make_archive
from tests.e2e.conftest import AgentLauncher, Target, collect, docs_of, require_nats

pytestmark = pytest.mark.e2e
GROUP = "floor"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    require_nats()
    nodes = NatsCluster(tmp_path_factory.mktemp("nats-cluster"), size=3).start()
    yield nodes
    nodes.stop()


def test_agents_on_two_nodes_and_the_workstation_on_a_third(cluster: NatsCluster, tmp_path: Path,
                                                            signing: tuple[Any, Path]) -> None:
    key, ring = signing
    bundles = {v: make_archive(tmp_path / "bundles", v, top1=int(float(v)), key=key) for v in ("1.0", "2.0")}
    node_a, node_b, node_ws = cluster.nodes
    launcher = AgentLauncher(tmp_path, bundles["1.0"])
    try:
        agents = [launcher.start({"broker": {"protocol": "3.1.1"}, "groups": [GROUP],
                                  "security": {"keyring": str(ring), "allow_unsigned": False},
                                  "camera": [{"name": "cam0", "source": "synthetic:fashion-mnist", "fps": 10.0}]},
                                 broker=node)
                  for node in (node_a, node_b)]
        ws = Target("nats-cluster", node_ws, "3.1.1")
        statuses = [a.topics.status for a in agents]

        # retained status from the agents' nodes reaches a wildcard subscriber on the third
        sub = ws.client(T.fleet_filter("edgecv", "status"))
        try:
            def online(msgs: list[Received]) -> bool:
                return all(any(d["state"] == "online" for d in docs_of(msgs, s)) for s in statuses)

            collect(sub, online, 60, agents[0])
        finally:
            sub.close()
        listed = ws.cli("devices", "--json", "--wait", "1.5")
        assert listed.returncode == 0, listed.stderr
        found = {d["device"]: d for d in json.loads(listed.stdout)}
        assert all(found[a.device]["state"] == "online" and found[a.device]["groups"] == [GROUP] for a in agents)

        # a signed group push through the third node activates on both
        res = ws.cli("push", str(bundles["2.0"]), "--group", GROUP, "--timeout", "90", "--no-progress")
        assert res.returncode == 0, res.stdout + res.stderr + "".join(a.log()[-1500:] for a in agents)
        assert sum(" active " in f" {line} " for line in res.stdout.splitlines()) == 2

        # both devices' predictions, now from 2.0, arrive at the third node; a command crosses the cluster
        sub = ws.client(*[a.topics.predictions for a in agents], agents[0].topics.cmd_result("ping"))
        try:
            def both_on_v2(msgs: list[Received]) -> bool:
                return all(sum(p["model"]["version"] == "2.0" for p in docs_of(msgs, a.topics.predictions)) >= 3
                           for a in agents)

            collect(sub, both_on_v2, 30, agents[1])
            sub.publish(agents[0].topics.cmd("ping"), {"id": "cluster-1"})
            pong = sub.wait_for(lambda m: m.topic.endswith("/cmd/ping/result"), 15).json()
            assert pong["id"] == "cluster-1" and pong["ok"] and pong["model"]["version"] == "2.0"
        finally:
            sub.close()

        # kill -9 the agent on node a: its Last Will reaches the third node; the other device stays online
        sub = ws.client(T.fleet_filter("edgecv", "status"))
        try:
            collect(sub, online, 15, agents[0])
            agents[0].kill()
            msgs = collect(sub, lambda m: any(d["state"] == "offline" for d in docs_of(m, statuses[0])), 20,
                           agents[0])
        finally:
            sub.close()
        assert all(d["state"] != "offline" for d in docs_of(msgs, statuses[1])) and agents[1].alive()
        late = ws.client(statuses[0])
        try:
            assert decode(late.wait_for(lambda m: m.retain, 10).payload)["state"] == "offline"
        finally:
            late.close()

        # stop the server agent a was on: the retained statuses (replicated to all three) are still served
        agents[1].kill()
        node_a.stop()
        survivor = ws.client(T.fleet_filter("edgecv", "status"))
        try:
            msgs = collect(survivor, lambda m: all(docs_of(m, s, True) for s in statuses), 60)
        finally:
            survivor.close()
        assert docs_of(msgs, statuses[0], True)[-1]["state"] == "offline"
        assert docs_of(msgs, statuses[1], True)[-1]["state"] == "offline"  # its Will, fired when it was killed
    finally:
        launcher.close()
