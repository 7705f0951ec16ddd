"""Waiting on a state, not on the clock: poll a predicate until it holds."""
from __future__ import annotations

import time


def until(predicate, timeout: float, what="condition", interval: float = 0.2):
    """Poll ``predicate`` until it returns something true, and return that;
    fail after ``timeout`` seconds, naming ``what`` (a text, or a callable
    giving one at the failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, \
            f"not within {timeout}s: {what() if callable(what) else what}"
        time.sleep(interval)
