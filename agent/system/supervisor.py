"""Supervision of the agent's long-lived threads: no thread may die silently.

Every loop in the agent catches what one frame, message or job can raise, so a thread that still ends is a bug or
a broken runtime, and its state (a half-done send round, a camera loop's counters) cannot be trusted: restarting
that one thread in place could hide the fault and repeat it. The policy is the embedded one: log the death with
its exception, stop feeding the systemd watchdog at once (`healthy()` is false), and shut the process down with
exit code 1 so `Restart=on-failure` starts a fresh one. Should the orderly shutdown itself hang, the process exits
hard after EXIT_DEADLINE_S (systemd's `TimeoutStopSec` would otherwise be the only way out).

The composition root (`app.App`) registers the threads of every part and passes `healthy` to the notifier.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)

CHECK_S = 0.5
EXIT_DEADLINE_S = 30.0
EXIT_CODE = 1


class Supervisor:
    """Watches threads; the first unexpected death calls `on_failure(reason)` once (from the supervisor's thread)."""

    def __init__(self, on_failure: Callable[[str], None], *, check_s: float = CHECK_S,
                 exit_deadline_s: float = EXIT_DEADLINE_S, hard_exit: Callable[[int], None] = os._exit) -> None:
        self._on_failure = on_failure
        self._check_s = check_s
        self._exit_deadline_s = exit_deadline_s
        self._hard_exit = hard_exit
        self._watched: list[threading.Thread] = []
        # Threads that may end on purpose (a camera loop whose file ended): asked before a death counts as one.
        self._may_end: dict[threading.Thread, Callable[[threading.Thread], bool]] = {}
        self._errors: dict[int, str] = {}  # thread ident -> the exception that ended it
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_hook: Callable[[threading.ExceptHookArgs], object] | None = None
        self._timer: threading.Timer | None = None
        self.failure: str | None = None
        self.checks = 0  # rounds completed (tests wait on it instead of on time)

    def watch(self, threads: Iterable[threading.Thread],
              may_end: Callable[[threading.Thread], bool] | None = None) -> None:
        """Supervise these (started) threads from now on. With `may_end`, a thread that has ended is not a failure
        while `may_end(thread)` is true (its owner says it finished its work, e.g. a file played once)."""
        with self._lock:
            for thread in threads:
                if thread not in self._watched:
                    self._watched.append(thread)
                if may_end is not None:
                    self._may_end[thread] = may_end

    @property
    def watched(self) -> list[str]:
        return [t.name for t in self._watched]

    def healthy(self) -> bool:
        """True while no supervised thread has died (read by the watchdog before every ping; cheap)."""
        if self.failure is not None:
            return False
        if self._stopping.is_set():
            return True
        return not any(self._died(t) for t in self._watched)

    def _died(self, thread: threading.Thread) -> bool:
        if thread.is_alive():
            return False
        may_end = self._may_end.get(thread)
        return may_end is None or not may_end(thread)

    def start(self) -> Supervisor:
        self._previous_hook = threading.excepthook
        threading.excepthook = self._excepthook
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """An orderly shutdown begins: threads ending from now on are expected."""
        self._stopping.set()
        if self._previous_hook is not None and threading.excepthook == self._excepthook:
            threading.excepthook = self._previous_hook
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def close(self) -> None:
        """The shutdown completed: the hard-exit deadline is no longer needed."""
        self.stop()
        if self._timer is not None:
            self._timer.cancel()

    def check(self) -> str | None:
        """Look at the threads once; returns (and acts on) the failure, if any."""
        if self._stopping.is_set() or self.failure is not None:
            return self.failure
        with self._lock:
            dead = [t for t in self._watched if self._died(t)]
        self.checks += 1
        if not dead:
            return None
        thread = dead[0]
        error = self._errors.get(thread.ident or -1, "it returned without an exception")
        self.failure = f"Thread {thread.name} died unexpectedly ({error})"
        log.critical("%s; the systemd watchdog is no longer fed and the agent stops with exit code %d so that "
                     "systemd restarts it", self.failure, EXIT_CODE)
        self._timer = threading.Timer(self._exit_deadline_s, self._deadline)
        self._timer.daemon = True
        self._timer.start()
        self._on_failure(self.failure)
        return self.failure

    def _run(self) -> None:
        while not self._stopping.wait(self._check_s):
            if self.check() is not None:
                return

    def _deadline(self) -> None:
        log.critical("The agent did not stop within %g s of %s; exiting now", self._exit_deadline_s, self.failure)
        self._hard_exit(EXIT_CODE)

    def _excepthook(self, args: threading.ExceptHookArgs) -> None:
        if args.thread is not None and args.thread.ident is not None:
            self._errors[args.thread.ident] = f"{args.exc_type.__name__}: {args.exc_value}"
        if self._previous_hook is not None:
            self._previous_hook(args)  # the default one prints the traceback to stderr (the journal)
