"""A real `edgecv-agent run` process under a stand-in for systemd: a bound NOTIFY_SOCKET datagram socket and
WATCHDOG_USEC in its environment. READY=1 after the first inference, WATCHDOG=1 while frames flow, silence once
the camera stalls (so systemd's watchdog would fire), STOPPING=1 on SIGTERM. Plus Home Assistant discovery from
the real agent, retained on a real broker."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.broker import Broker
from tests.e2e.conftest import StartAgent
from tests.ops.probe import Probe

WATCHDOG_USEC = 1_000_000  # WatchdogSec=1 -> a ping at most every 0.5 s


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)

    def read(self, seconds: float) -> list[tuple[float, str]]:
        """(monotonic arrival time, datagram) for everything arriving within `seconds`."""
        out: list[tuple[float, str]] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                out.append((time.monotonic(), self.sock.recv(4096).decode()))
            except TimeoutError:
                continue
        return out

    def wait_for(self, prefix: str, timeout: float) -> tuple[float, str, list[tuple[float, str]]]:
        seen: list[tuple[float, str]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, msg in self.read(0.1):
                seen.append((t, msg))
                if msg.startswith(prefix):
                    return t, msg, seen
        raise AssertionError(f"no {prefix!r} within {timeout:g} s; got {seen}")


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.sock.close()


def test_ready_then_watchdog_while_frames_flow_and_silence_when_the_camera_stalls(
        start_agent: StartAgent, shared_broker: Broker, notify: NotifyListener) -> None:
    frames = 50  # at 20 fps: 2.5 s of frames, then the source hangs like a stuck driver
    agent = start_agent({"camera": [{"name": "cam0", "source": f"synthetic:stall?after={frames}", "fps": 20.0}]},
                        broker=shared_broker,
                        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    ready_t, ready, before = notify.wait_for("READY=1", timeout=60)
    assert not any("WATCHDOG=1" in m for _, m in before[:-1])  # nothing before READY
    lines = ready.split("\n")
    assert f"MAINPID={agent.proc.pid}" in lines and "WATCHDOG=1" in lines
    assert any(line.startswith("STATUS=Classifying with") for line in lines)
    assert "First frame classified" in agent.log() or agent.alive()
    # Watch the frames' 2.5 s and 4.5 s of stall. Arrival times carry the test's own scheduling jitter (CI is
    # loaded), hence the margins; without rate limiting there would be ~10 pings per 0.5 s, not 1.
    window_end = ready_t + frames / 20.0 + 4.5
    pings = [t for t, m in notify.read(window_end - time.monotonic()) if m == "WATCHDOG=1"]
    assert len(pings) >= 2, pings  # while frames flow: at least every ~1 s ...
    flow_s = pings[-1] - ready_t
    assert len(pings) <= flow_s / 0.5 + 1, (len(pings), flow_s)  # ... and at most every WATCHDOG_USEC / 2
    gaps = [b - a for a, b in zip([ready_t, *pings], pings, strict=False)]
    assert min(gaps) >= 0.25, gaps
    # The camera started before READY, so its last frame comes ~2.5 s after READY (later only under load); the
    # last ping at most one period after it. Then silence for 3+ s: systemd's 1 s watchdog would have fired.
    assert flow_s <= frames / 20.0 + 1.5, flow_s
    assert window_end - pings[-1] >= 3.0, window_end - pings[-1]
    assert agent.alive()  # the agent itself does not notice; systemd's watchdog is what recovers it
    assert agent.stop() == 0
    tail = [m for _, m in notify.read(0.3)]
    assert any(m.startswith("STOPPING=1") for m in tail), tail


def test_real_agent_publishes_retained_discovery_and_answers_home_assistant(
        start_agent: StartAgent, broker: Broker) -> None:
    agent = start_agent({"homeassistant": {"enabled": True}}, broker=broker)
    watcher = Probe(broker.port)
    assert watcher.subscribe(f"{agent.topics.predictions}")
    assert watcher.collect(60, n=1), f"agent published nothing; log:\n{agent.log()}"
    watcher.close()
    ha = Probe(broker.port)  # subscribes after the agent published: only retained messages can reach it
    assert ha.subscribe(f"homeassistant/sensor/{agent.device}/+/config")
    configs = ha.collect(5, n=5)
    assert len(configs) == 5 and all(m.retain for m in configs)
    assert {m.topic.split("/")[3] for m in configs} == {"top_label", "top_score", "fps", "inference_latency",
                                                        "model_version"}
    assert all(f'"state_topic":"edgecv/{agent.device}/' in m.payload.decode() for m in configs)
    assert ha.publish("homeassistant/status", "online")
    again = ha.collect(5, n=5)
    assert len(again) == 5 and not any(m.retain for m in again)  # live re-publication, not the retained copy
    assert agent.stop() == 0
    ha.close()
