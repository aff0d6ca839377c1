"""Polling for a condition with a deadline: the one way tests wait for something another thread or process does.

Tests never sleep a fixed time to let something happen; they wait until it has happened, with a timeout generous
enough for two busy cores, and fail with a message when it has not.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.02) -> bool:
    """True as soon as `predicate()` is truthy, False when it still is not after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
