"""No thread dies silently: the Supervisor notices a dead thread, names it and its exception, withholds the systemd
watchdog and makes the assembled agent (`App.run`) shut down with exit code 1; an orderly shutdown is not a
failure; a shutdown that hangs ends in a hard exit."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from edgecv.agent.app import App
from edgecv.agent.config import parse_config
from edgecv.agent.service import Agent
from edgecv.agent.system.sdnotify import SystemdNotifier
from edgecv.agent.system.supervisor import Supervisor
from tests.agent.test_sdnotify import FakeClock, NotifySocket, notify_socket  # noqa: F401 (fixture)
from tests.broker import Broker
from tests.bundle_factory import make_bundle
from tests.waiting import wait_until


def _thread(target: object, name: str) -> threading.Thread:
    t = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
    t.start()
    return t


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_thread_that_raises_is_named_with_its_exception_and_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    release, keep = threading.Event(), threading.Event()
    failures: list[str] = []
    sup = Supervisor(failures.append, check_s=0.02, exit_deadline_s=60)
    sup.start()
    try:
        def crash() -> None:
            release.wait(5)
            raise RuntimeError("boom in the sender")

        sup.watch([_thread(lambda: keep.wait(10), "healthy"), _thread(crash, "mqtt-sender")])
        assert sup.healthy()
        release.set()
        assert wait_until(lambda: bool(failures), 10)
        assert failures == ["Thread mqtt-sender died unexpectedly (RuntimeError: boom in the sender)"]
        assert not sup.healthy()
        assert any(r.levelno == logging.CRITICAL and "mqtt-sender" in r.getMessage() for r in caplog.records)
        for _ in range(3):  # more rounds over the same dead thread report nothing new
            assert sup.check() == failures[0]
        assert len(failures) == 1
    finally:
        keep.set()
        sup.close()


def test_threads_ending_during_an_orderly_shutdown_are_not_failures() -> None:
    stop = threading.Event()
    failures: list[str] = []
    sup = Supervisor(failures.append, check_s=0.02).start()
    loop = _thread(lambda: stop.wait(10), "loop-cam0")
    sup.watch([loop])
    sup.stop()
    stop.set()
    loop.join(10)
    assert not loop.is_alive()  # it has ended, and that is not a failure during a shutdown
    assert failures == [] and sup.check() is None and sup.healthy()
    sup.close()


def test_a_shutdown_that_hangs_ends_in_a_hard_exit() -> None:
    exits: list[int] = []
    done = threading.Event()
    sup = Supervisor(lambda reason: None, check_s=0.02, exit_deadline_s=0.2,
                     hard_exit=lambda code: (exits.append(code), done.set()))  # type: ignore[func-returns-value]
    sup.watch([_thread(lambda: None, "updater")])
    assert sup.check() is not None
    assert done.wait(5) and exits == [1]
    sup.stop()


def test_the_watchdog_is_not_fed_while_the_health_check_fails(notify_socket: NotifySocket) -> None:  # noqa: F811
    clock = FakeClock()
    n = SystemdNotifier(notify_socket.address, watchdog_usec=2_000_000, clock=clock)
    healthy = {"ok": True}
    n.set_health_check(lambda: healthy["ok"])
    assert n.ready()
    notify_socket.drain()
    clock.t += 1.1
    n.frame()
    assert notify_socket.drain() == ["WATCHDOG=1"]
    healthy["ok"] = False
    for _ in range(5):  # frames still flow, but a part is dead: systemd must restart the agent
        clock.t += 1.1
        n.frame()
    assert notify_socket.drain() == []
    healthy["ok"] = True
    clock.t += 1.1
    n.frame()
    assert notify_socket.drain() == ["WATCHDOG=1"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_app_exits_1_when_a_supervised_thread_dies(tmp_path: Path, shared_broker: Broker,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    notify_socket: NotifySocket) -> None:  # noqa: F811
    """The assembled agent with a real broker: a bug kills the health thread (injected where its loop reads the
    camera states, outside any per-report try). Frames keep flowing, so the frame-driven watchdog alone would
    still be fed; instead the supervisor stops the pings and App.run returns 1."""
    seed = make_bundle(tmp_path / "seed", "1.0")
    config = parse_config({
        "device_id": "dev-sup", "broker": {"host": shared_broker.host, "port": shared_broker.port},
        "camera": [{"name": "cam0", "source": "synthetic:noise", "fps": 50.0}],
        "model": {"store": str(tmp_path / "store"), "bundle": str(seed)}, "security": {"allow_unsigned": True},
        "homeassistant": {"enabled": False}})
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    calls = {"n": 0}
    real = Agent._camera_states

    def camera_states(self: Agent) -> dict[str, str]:
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("injected bug in the health loop")
        return real(self)

    monkeypatch.setattr(Agent, "_camera_states", camera_states)
    app = App(config)
    seen: dict[str, int] = {}
    part_failed = app._part_failed

    def on_failure(reason: str) -> None:
        # Before the agent stops: let frames flow on for a while (20 more, several ping periods) and count pings.
        seen["pings"], frames = app.agent.notifier.watchdog_pings, app.agent.monitor.inferred
        wait_until(lambda: app.agent.monitor.inferred >= frames + 20, 20, interval=0.01)
        seen["frames_after"] = app.agent.monitor.inferred - frames
        seen["pings_after"] = app.agent.notifier.watchdog_pings - seen["pings"]
        part_failed(reason)

    app.supervisor._on_failure = on_failure
    stop = threading.Event()
    result: list[int] = []
    received: list[str] = []
    runner = threading.Thread(target=lambda: result.append(app.run(stop)), daemon=True)
    runner.start()
    while runner.is_alive():  # read like systemd does, while the agent runs
        received += notify_socket.drain(0.05)
    runner.join(60)
    assert result == [1]
    assert app.supervisor.failure == "Thread health died unexpectedly (RuntimeError: injected bug in the health loop)"
    assert {"mqtt-link", "mqtt-sender", "mqtt-worker", "loop-cam0", "health", "updater",
            "commands"} <= set(app.supervisor.watched)
    assert seen["frames_after"] >= 20 and seen["pings_after"] == 0  # frames flowed, the watchdog was not fed
    received += notify_socket.drain(0.1)
    pings = [m for m in received if "WATCHDOG=1" in m]
    assert pings, "the watchdog was fed before the failure"
    assert app.agent.notifier.watchdog_pings == len(pings)
    # nothing after the failure: the last datagrams are the stop notice, and no ping follows the failure log
    assert received[-1].startswith("STOPPING=1")


def _app(tmp_path: Path, broker: Broker, cameras: list[dict[str, object]], device: str) -> App:
    seed = make_bundle(tmp_path / "seed", "1.0")
    return App(parse_config({
        "device_id": device, "broker": {"host": broker.host, "port": broker.port}, "camera": cameras,
        "model": {"store": str(tmp_path / "store"), "bundle": str(seed)}, "security": {"allow_unsigned": True},
        "homeassistant": {"enabled": False}}))


def _run(app: App) -> tuple[threading.Event, threading.Thread, list[int]]:
    stop, result = threading.Event(), []
    runner = threading.Thread(target=lambda: result.append(app.run(stop)), daemon=True)
    runner.start()
    return stop, runner, result


def test_a_camera_whose_file_ended_is_not_a_dead_thread_while_the_others_go_on(tmp_path: Path,
                                                                              shared_broker: Broker) -> None:
    """A 10-frame clip (loop = false) beside an endless camera: the clip's loop returns when the clip ends, on
    purpose. The agent stays healthy and keeps classifying the other camera over many supervisor checks; it was
    shut down with exit code 1 ("died unexpectedly") when a camera loop's end counted as a death."""
    app = _app(tmp_path, shared_broker, [
        {"name": "clip", "source": "synthetic:scene?frames=10&width=160&height=120", "loop": False, "fps": 0.0},
        {"name": "live", "source": "synthetic:noise", "fps": 50.0}], "dev-sup-ended")
    stop, runner, result = _run(app)
    clip = next(c for c in app.agent.cameras if c.name == "clip")
    try:
        assert wait_until(lambda: clip.state == "ended" and "loop-clip" in app.supervisor.watched
                          and not any(t.name == "loop-clip" and t.is_alive() for t in app.agent.threads), 60)
        inferred = app.agent.monitor.inferred
        checks = app.supervisor.checks
        # Ten supervisor rounds later (each looks at every thread), the agent still serves the other camera.
        assert wait_until(lambda: app.supervisor.checks >= checks + 10 and app.agent.monitor.inferred > inferred + 20,
                          60)
        assert app.supervisor.healthy() and app.supervisor.failure is None and runner.is_alive()
    finally:
        stop.set()
        runner.join(60)
    assert result == [0]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_live_cameras_grabber_that_dies_stops_the_agent(tmp_path: Path, shared_broker: Broker,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A live camera's grabber thread is supervised too: a bug that ends it (injected in its read step) is a
    failure, named, and the agent exits 1, instead of a camera that silently delivers no more frames."""
    from edgecv.agent.vision.camera import Camera

    real, calls = Camera._step, {"n": 0}

    def step(self: Camera, deadline: float) -> object:
        calls["n"] += 1
        if calls["n"] > 20:
            raise RuntimeError("injected bug in the grabber")
        return real(self, deadline)

    monkeypatch.setattr(Camera, "_step", step)
    app = _app(tmp_path, shared_broker, [{"name": "cam", "source": "synthetic:noise?live=1", "fps": 50.0}],
               "dev-sup-grabber")
    _stop, runner, result = _run(app)
    runner.join(60)
    assert result == [1]
    assert app.supervisor.failure == "Thread camera-cam died unexpectedly (RuntimeError: injected bug in the grabber)"
