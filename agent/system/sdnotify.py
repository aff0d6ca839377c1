"""The systemd notify protocol (sd_notify) spoken directly over `$NOTIFY_SOCKET`, with a frame-driven watchdog.

No compiled dependency: one AF_UNIX datagram per message, the wire format systemd documents in sd_notify(3)
(newline-separated `KEY=VALUE` assignments; a socket path starting with '@' is in the abstract namespace).
Outside systemd (`NOTIFY_SOCKET` unset) every method is a cheap no-op.

Watchdog policy: `frame()` is called after every inferred frame and sends `WATCHDOG=1` at most every
`WATCHDOG_USEC / 2`. When frames stop flowing (stalled camera, hung runtime, dead loop) nothing is sent and
systemd's `WatchdogSec=` kills and restarts the service. With `stall_s > 0` (config `systemd.watchdog_stall_s`)
a small thread keeps pinging on the systemd cadence as long as the last frame is younger than `stall_s`, so a
slow camera (one frame per minute) does not trip the watchdog while a stalled one still does.

A health gate (`set_health_check`, the composition root passes its Supervisor's `healthy`) is asked before every
ping: while an essential thread is dead no ping is sent, even though frames still flow, so systemd restarts an
agent that classifies but can no longer publish (or take pushes, or answer commands).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

SEND_TIMEOUT_S = 0.5


class SystemdNotifier:
    """Sends sd_notify messages; thread-safe; never raises on the per-frame path."""

    def __init__(self, address: str | None, watchdog_usec: int = 0, *, stall_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address or None
        self._sockaddr = self._to_sockaddr(address) if address else None
        self.watchdog_interval_s: float | None = watchdog_usec / 2e6 if (self._sockaddr and watchdog_usec > 0) else None
        self.stall_s = stall_s if self.watchdog_interval_s is not None else 0.0
        self._clock = clock
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._next_ping = 0.0  # monotonic time when the next WATCHDOG=1 is due
        self._last_frame: float | None = None
        self._failed = False
        self._closed = threading.Event()
        self._pinger: threading.Thread | None = None
        self._healthy: Callable[[], bool] = lambda: True
        self._unhealthy_logged = False
        self.sent = 0  # messages sent (tests and health read it)
        self.watchdog_pings = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, stall_s: float = 0.0) -> SystemdNotifier:
        """Build from `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, as sd_watchdog_enabled(3) reads them."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        usec = 0
        raw = env.get("WATCHDOG_USEC", "")
        if raw:
            try:
                usec = max(0, int(raw))
            except ValueError:
                log.warning("Ignoring WATCHDOG_USEC=%r: not an integer", raw)
        pid = env.get("WATCHDOG_PID", "")
        if usec and pid and pid != str(os.getpid()):
            # The watchdog belongs to another process (we are a child of the service's main process).
            usec = 0
        return cls(address, usec, stall_s=stall_s)

    @staticmethod
    def _to_sockaddr(address: str) -> str:
        if address.startswith("@"):
            return "\0" + address[1:]
        if not address.startswith("/"):
            raise ValueError(f"NOTIFY_SOCKET {address!r} must be an absolute path or start with '@'")
        return address

    @property
    def enabled(self) -> bool:
        return self._sockaddr is not None

    @property
    def watchdog_enabled(self) -> bool:
        return self.watchdog_interval_s is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of `KEY=VALUE` lines; False (logged once) when it could not be sent."""
        if self._sockaddr is None:
            return False
        data = "\n".join(assignments).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # A receiver that does not read (its queue full) must not block a camera loop for ever: a
                    # lost datagram is logged, a hung agent is not an option.
                    self._sock.settimeout(SEND_TIMEOUT_S)
                self._sock.sendto(data, self._sockaddr)
            except OSError as exc:
                if not self._failed:
                    log.warning("Cannot send to systemd's NOTIFY_SOCKET %s: %s (further failures not logged)",
                                self.address, exc)
                    self._failed = True
                return False
            self.sent += 1
            return True

    def ready(self, status: str = "") -> bool:
        """READY=1: the model is loaded and the first frame was inferred. Also sends the first watchdog ping."""
        lines = ["READY=1", f"MAINPID={os.getpid()}"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        if self.watchdog_interval_s is not None:
            lines.append("WATCHDOG=1")
        ok = self.notify(*lines)
        if ok and self.watchdog_interval_s is not None:
            now = self._clock()
            self._last_frame = now
            self._next_ping = now + self.watchdog_interval_s
            self.watchdog_pings += 1
            self._start_pinger()
        return ok

    def frame(self) -> None:
        """Record that a frame was inferred; sends WATCHDOG=1 when the last ping is WATCHDOG_USEC/2 old."""
        if self.watchdog_interval_s is None:
            return
        now = self._clock()
        self._last_frame = now
        if now < self._next_ping:  # the common case: one comparison, no lock
            return
        self._ping(now)

    def set_health_check(self, healthy: Callable[[], bool]) -> None:
        """`healthy()` is asked before each watchdog ping (at most every WATCHDOG_USEC/2); False withholds it."""
        self._healthy = healthy

    def _ping(self, now: float) -> None:
        assert self.watchdog_interval_s is not None
        self._next_ping = now + self.watchdog_interval_s
        try:
            healthy = self._healthy()
        except Exception:
            log.exception("The watchdog's health check failed; treating the agent as unhealthy")
            healthy = False
        if not healthy:
            if not self._unhealthy_logged:
                self._unhealthy_logged = True
                log.error("Not feeding the systemd watchdog: an essential part of the agent is dead")
            return
        if self.notify("WATCHDOG=1"):
            self.watchdog_pings += 1

    def status(self, text: str) -> bool:
        """STATUS=…: the one-line state `systemctl status` shows."""
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str = "") -> bool:
        """STOPPING=1: shutting down on purpose (no watchdog pings follow)."""
        self.watchdog_interval_s = None
        self._closed.set()
        lines = ["STOPPING=1"]
        if status:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more time while starting or stopping (e.g. a slow model self-test)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def _start_pinger(self) -> None:
        if self.stall_s <= 0 or self._pinger is not None:
            return
        self._pinger = threading.Thread(target=self._ping_loop, name="sd-watchdog", daemon=True)
        self._pinger.start()

    def _ping_loop(self) -> None:
        interval = self.watchdog_interval_s
        while interval is not None and not self._closed.wait(min(interval, self.stall_s) / 2):
            interval = self.watchdog_interval_s
            last = self._last_frame
            now = self._clock()
            if interval is None or last is None or now - last >= self.stall_s:
                continue  # frames stalled: let systemd's watchdog fire
            if now >= self._next_ping:
                self._ping(now)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.split())
