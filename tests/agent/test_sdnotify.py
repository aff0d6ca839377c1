"""SystemdNotifier against a real AF_UNIX datagram socket standing in for systemd's notify socket."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgecv.agent.system.sdnotify import SystemdNotifier


class NotifySocket:
    """A bound datagram socket like the one systemd passes in NOTIFY_SOCKET; collects what arrives."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(0.05)

    def drain(self, wait: float = 0.1) -> list[str]:
        out: list[str] = []
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                out.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(str(tmp_path / "notify.sock"))
    yield s
    s.close()


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_no_socket_is_a_noop() -> None:
    n = SystemdNotifier.from_env({})
    assert not n.enabled and not n.watchdog_enabled
    assert n.ready("x") is False
    n.frame()
    assert n.status("y") is False and n.stopping() is False and n.sent == 0


def test_ready_status_stopping_reach_the_socket(notify_socket: NotifySocket) -> None:
    n = SystemdNotifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    assert n.enabled and not n.watchdog_enabled
    assert n.ready("model fashion 1.0\nloaded")
    assert n.status("running 10 fps")
    assert n.stopping()
    got = notify_socket.drain()
    assert got[0].split("\n") == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=model fashion 1.0 loaded"]
    assert got[1] == "STATUS=running 10 fps"
    assert got[2] == "STOPPING=1"


def test_abstract_namespace_socket() -> None:
    name = f"@edgecv-test-{os.getpid()}-{time.monotonic_ns()}"
    s = NotifySocket(name)
    try:
        n = SystemdNotifier.from_env({"NOTIFY_SOCKET": name})
        assert n.ready()
        assert s.drain()[0].startswith("READY=1\n")
    finally:
        s.close()


def test_watchdog_pings_at_half_the_interval_only_while_frames_flow(notify_socket: NotifySocket) -> None:
    clock = FakeClock()
    n = SystemdNotifier(notify_socket.address, watchdog_usec=2_000_000, clock=clock)  # WatchdogSec=2 -> 1 s
    assert n.watchdog_interval_s == 1.0
    n.ready()
    assert "WATCHDOG=1" in notify_socket.drain()[0].split("\n")
    for _ in range(10):  # 10 frames within 0.9 s: no ping due yet
        clock.t += 0.09
        n.frame()
    assert notify_socket.drain() == []
    clock.t += 0.2
    n.frame()
    n.frame()
    assert notify_socket.drain() == ["WATCHDOG=1"]
    # Frames stop: however long we wait, frame() is not called, so nothing is sent.
    clock.t += 60
    assert notify_socket.drain(0.2) == []
    n.frame()  # frames resume
    assert notify_socket.drain() == ["WATCHDOG=1"]


def test_watchdog_pid_of_another_process_disables_the_watchdog(notify_socket: NotifySocket) -> None:
    env = {"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert not SystemdNotifier.from_env(env).watchdog_enabled
    env["WATCHDOG_PID"] = str(os.getpid())
    assert SystemdNotifier.from_env(env).watchdog_interval_s == 0.5
    assert not SystemdNotifier.from_env({**env, "WATCHDOG_USEC": "junk"}).watchdog_enabled


def test_stall_threshold_keeps_pinging_slow_cameras_but_not_stalled_ones(notify_socket: NotifySocket) -> None:
    # WatchdogSec=0.4 s -> ping every 0.2 s; one frame only; stall_s=0.8: pings continue ~0.8 s, then stop.
    n = SystemdNotifier(notify_socket.address, watchdog_usec=400_000, stall_s=0.8)
    n.ready()
    t0 = time.monotonic()
    got = notify_socket.drain(0.6)
    assert got[0].startswith("READY=1") and got[1:].count("WATCHDOG=1") >= 1
    got = notify_socket.drain(max(0.0, 1.2 - (time.monotonic() - t0)))  # until well past the stall threshold
    assert notify_socket.drain(0.6) == []
    n.close()


def test_frame_is_thread_safe_and_cheap(notify_socket: NotifySocket) -> None:
    n = SystemdNotifier(notify_socket.address, watchdog_usec=10_000_000)
    n.ready()
    notify_socket.drain()

    def hammer() -> None:
        for _ in range(20_000):
            n.frame()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    per_call_us = (time.perf_counter() - t0) / 80_000 * 1e6
    assert notify_socket.drain() == []  # 5 s interval not reached
    assert per_call_us < 50, per_call_us


def test_send_failure_is_logged_once_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    n = SystemdNotifier(str(tmp_path / "gone.sock"), watchdog_usec=1000)
    assert n.ready() is False
    n.frame()
    n.frame()
    assert sum("NOTIFY_SOCKET" in r.getMessage() for r in caplog.records) == 1
