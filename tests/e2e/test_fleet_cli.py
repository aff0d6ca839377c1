"""The fleet commands against real agents and a real broker (issue 13 items 8 and 9): live figures in `edgecv
devices`, fast failure for a device id never seen (and `--wait-for-device` for one coming online), one command to a
group or several devices with one row (or JSON object) per device, and the old `cmd DEVICE NAME` order."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from edgecv.tools.fleet.mqtt_client import ClientOptions, MqttClient
from tests.broker import Broker
from tests.e2e.conftest import DEFAULT_BUNDLE, StartAgent, edgecv_command

ARCHIVE = DEFAULT_BUNDLE.parent / "fashion-mnist.edgecv"


def cli(broker: Broker, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*edgecv_command(), *args, "--broker", broker.address], capture_output=True, text=True,
                          timeout=timeout)


def wait_online(broker: Broker, devices: list[str], timeout: float = 90) -> None:
    with MqttClient(ClientOptions(host=broker.host, port=broker.port)) as client:
        for device in devices:
            client.subscribe(f"edgecv/{device}/status")
        online: set[str] = set()
        deadline = time.monotonic() + timeout
        while online != set(devices) and time.monotonic() < deadline:
            msg = client.get(0.5)
            if msg is not None and msg.payload and msg.json().get("state") == "online":
                online.add(msg.topic.split("/")[1])
    assert online == set(devices), f"online: {online}"


def test_devices_shows_fps_and_latency_without_waiting_for_the_health_interval(start_agent: StartAgent,
                                                                                shared_broker: Broker) -> None:
    """Health is not retained and comes every health.interval_s (300 s here): `edgecv devices` used to show '-' for
    fps and latency unless --wait outlasted it. Devices now answer the announce request with their latest health."""
    agent = start_agent({"health": {"interval_s": 300.0}}, broker=shared_broker)
    with MqttClient(ClientOptions(host=shared_broker.host, port=shared_broker.port)) as client:
        client.subscribe(agent.topics.health, qos=0)
        first = client.wait_for(lambda m: True, timeout=90)  # the first report, ~2 s after start
    assert json.loads(first.payload)["fps"] > 0
    res = cli(shared_broker, "devices", "--device", agent.device, "--wait", "3", "--json")
    assert res.returncode == 0, res.stderr
    mine, = json.loads(res.stdout)
    assert mine["device"] == agent.device and mine["state"] == "online"
    assert mine["fps"] > 0 and mine["latency_p50_ms"] > 0, mine
    table = cli(shared_broker, "devices", "--device", agent.device, "--wait", "3")
    header, row = table.stdout.splitlines()[:2]
    fps, p50 = (row[header.index(col):].split()[0] for col in ("FPS", "P50 MS"))
    assert row.startswith(agent.device) and float(fps) > 0 and float(p50) > 0, table.stdout


def test_a_device_never_seen_fails_fast_and_wait_for_device_waits_for_one_coming_online(
        start_agent: StartAgent, shared_broker: Broker) -> None:
    ghost = f"ghost-{os.getpid()}"
    for argv in (["cmd", "ping", "--device", ghost], ["rollback", "--device", ghost],
                 ["push", str(ARCHIVE), "--device", ghost, "--no-progress"]):
        started = time.monotonic()
        res = cli(shared_broker, *argv, "--timeout", "300")
        elapsed = time.monotonic() - started
        assert res.returncode == 1, (argv, res.stderr)
        errors = [line for line in res.stderr.splitlines() if line.startswith("edgecv: error:")]
        assert len(errors) == 1 and f"Device '{ghost}' has never been seen" in errors[0], res.stderr
        assert "--wait-for-device" in errors[0] and "Traceback" not in res.stderr
        assert elapsed < 60, f"{argv[0]} took {elapsed:.1f} s with --timeout 300"  # ~2 s plus start-up

    late = f"late-{os.getpid()}"
    waiting = subprocess.Popen([*edgecv_command(), "cmd", "ping", "--device", late, "--wait-for-device", "240",
                                "--json", "--broker", shared_broker.address], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        start_agent({"device_id": late}, broker=shared_broker)
        out, err = waiting.communicate(timeout=300)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, err
    result, = json.loads(out)
    assert result["ok"] and result["device"] == late and result["model"]["name"] == "fashion-mnist"


def test_one_command_to_a_group_or_several_devices_answers_per_device(start_agent: StartAgent,
                                                                      shared_broker: Broker) -> None:
    group = f"g{os.getpid()}"
    agents = [start_agent({"groups": [group]}, broker=shared_broker) for _ in range(2)]
    names = sorted(a.device for a in agents)
    wait_online(shared_broker, names)

    by_group = cli(shared_broker, "cmd", "ping", "--group", group, "--json")
    assert by_group.returncode == 0, by_group.stderr
    results = json.loads(by_group.stdout)
    assert sorted(r["device"] for r in results) == names and all(r["ok"] and r["uptime_s"] > 0 for r in results)

    table = cli(shared_broker, "cmd", "ping", "--device", names[0], "--device", names[1])
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["DEVICE", "RESULT", "MODEL", "SECONDS", "DETAIL"]
    assert [line.split()[:2] for line in lines[1:]] == [[names[0], "ok"], [names[1], "ok"]]
    assert all("fashion-mnist" in line and "agent " in line for line in lines[1:])

    old = cli(shared_broker, "cmd", names[0], "ping", "--json")  # the old order: still works, with a warning
    assert old.returncode == 0 and json.loads(old.stdout)[0]["device"] == names[0], old.stderr
    assert f"'edgecv cmd DEVICE ping' is deprecated; write 'edgecv cmd ping --device {names[0]}'" in old.stderr

    snaps = cli(shared_broker, "cmd", "snapshot", "--group", group, "--out", str(Path(agents[0].workdir) / "snaps"))
    assert snaps.returncode == 0, snaps.stderr
    for name in names:
        assert (Path(agents[0].workdir) / "snaps" / f"{name}-snapshot.jpg").read_bytes()[:2] == b"\xff\xd8"
