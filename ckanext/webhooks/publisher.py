"""Right after a commit: takes the entity's API view and hands the events to
the broker, on a background thread, off the writer's request path.

The writer's transaction already holds the events (the outbox), so this
thread never delays or fails a CKAN request. It first records each entity as
``package_show``/``resource_show`` return it at that moment (so a
``dataset/create`` carries the dataset as created, even when an update
follows a millisecond later), then publishes a wake-up call for the workers.
If this process dies first, or the broker is down, the periodic sweep
publishes the events and the worker takes the entity's view itself.
"""
from __future__ import annotations

import logging
import os
import queue
import threading

log = logging.getLogger(__name__)

_queue: "queue.SimpleQueue[tuple[object, list[str]]]" = queue.SimpleQueue()
_thread: threading.Thread | None = None
_thread_pid: int | None = None
_lock = threading.Lock()


def publish_after_commit(event_ids: list[str]) -> None:
    import flask
    app = flask.current_app._get_current_object() if flask.has_app_context() else None
    _ensure_thread()
    _queue.put((app, list(event_ids)))


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
        app, event_ids = _queue.get()
        while True:  # take everything already waiting in one message
            try:
                event_ids.extend(_queue.get_nowait()[1])
            except queue.Empty:
                break
        if app is not None:
            _take_entity_views(app, event_ids)
        try:
            send_fanout(event_ids)
        except Exception as error:  # noqa: BLE001 - the sweep recovers
            log.warning("broker unavailable (%s); %d event(s) will be published "
                        "by the next sweep", error, len(event_ids))


def _take_entity_views(app, event_ids: list[str]) -> None:
    from ckan import model
    from .dispatcher import record_entity_views
    try:
        with app.test_request_context():
            record_entity_views(event_ids)
    except Exception:  # noqa: BLE001 - the worker takes the view instead
        log.exception("could not record the entity views of %d event(s)", len(event_ids))
    finally:
        model.Session.remove()


def flush(timeout: float = 5.0) -> bool:
    """Wait until queued events were handed over (tests and CLI use this)."""
    import time
    deadline = time.monotonic() + timeout
    while not _queue.empty() and time.monotonic() < deadline:
        time.sleep(0.01)
    return _queue.empty()
