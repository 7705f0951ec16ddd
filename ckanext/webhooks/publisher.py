"""Hands committed events to the broker, off the writer's request path.

The writer's transaction already holds the events (the outbox), so publishing
is only a wake-up call for the workers: it runs on a background thread, never
delays or fails a CKAN request, and when the broker is down the periodic sweep
publishes what was missed.
"""
from __future__ import annotations

import logging
import os
import queue
import threading

log = logging.getLogger(__name__)

_queue: "queue.SimpleQueue[list[str]]" = queue.SimpleQueue()
_thread: threading.Thread | None = None
_thread_pid: int | None = None
_lock = threading.Lock()


def publish_after_commit(event_ids: list[str]) -> None:
    _ensure_thread()
    _queue.put(list(event_ids))


def _ensure_thread() -> None:
    global _thread, _thread_pid
    if _thread is not None and _thread_pid == os.getpid() and _thread.is_alive():
        return
    with _lock:  # a forked web worker needs its own thread
        if _thread is None or _thread_pid != os.getpid() or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="ckanext-webhooks-publisher",
                                       daemon=True)
            _thread_pid = os.getpid()
            _thread.start()


def _run() -> None:
    from .celery_app import send_fanout
    while True:
        event_ids = _queue.get()
        while True:  # take everything already waiting in one message
            try:
                event_ids.extend(_queue.get_nowait())
            except queue.Empty:
                break
        try:
            send_fanout(event_ids)
        except Exception as error:  # noqa: BLE001 - the sweep recovers
            log.warning("broker unavailable (%s); %d event(s) will be published "
                        "by the next sweep", error, len(event_ids))


def flush(timeout: float = 5.0) -> bool:
    """Wait until queued events were handed over (tests and CLI use this)."""
    import time
    deadline = time.monotonic() + timeout
    while not _queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    return _queue.empty()
