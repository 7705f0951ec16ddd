"""Stopping a worker without sending twice or losing anything.

Once a worker is asked to stop, :func:`dispatcher.drain` claims nothing
more: the batches on the wire finish (within the timeout) and are recorded,
so a restart neither sends twice nor loses anything. Celery's warm shutdown
happens in the worker's main process: it sets a flag in memory that the pool
processes share (they are forked from it after this module is imported).
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import signal
import threading

log = logging.getLogger(__name__)

# 1: warm shutdown, 2: cold (the pool is being terminated).
_worker_stopping = mmap.mmap(-1, 1)
_stop_here = threading.Event()  # this process was asked to stop (SIGTERM)
_in_pool_process = False        # a Celery pool process (set by :mod:`worker`)


def worker_stopping(cold: bool = False) -> None:
    """The worker is shutting down: claim no more (every process of it)."""
    _worker_stopping[0] = max(_worker_stopping[0], 2 if cold else 1)


def in_pool_process() -> None:
    global _in_pool_process
    _in_pool_process = True


def stopping() -> bool:
    return bool(_worker_stopping[0]) or _stop_here.is_set()


@contextlib.contextmanager
def sigterm_deferred():
    """Around a task in a pool process. SIGTERM (systemd stopping the service,
    a deploy, the pool being terminated) would end the process at once, with
    requests on the wire and their outcomes unrecorded (and sent again when
    their lease ran out). Under this it only asks the drain to stop; once
    the task is done it takes its course, unless the pool is closing in a warm
    shutdown (the process then ends when the pool tells it to). A second
    SIGTERM, or one during a cold shutdown, takes its course at once."""
    previous = signal.getsignal(signal.SIGTERM) \
        if threading.current_thread() is threading.main_thread() else None
    if not _in_pool_process or previous in (None, signal.SIG_IGN):
        yield
        return
    state = {"deferred": False, "passed_on": False}

    def on_sigterm(signum, frame):
        if state["deferred"] or _worker_stopping[0] == 2:
            state["passed_on"] = True
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signum)
            return
        state["deferred"] = True
        _stop_here.set()
        log.info("SIGTERM: finishing the deliveries on the wire, claiming no more")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if state["deferred"] and not state["passed_on"] and _worker_stopping[0] != 1:
            signal.raise_signal(signal.SIGTERM)
