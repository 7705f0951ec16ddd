"""Wakes the delivery workers the moment events are committed.

A trigger on ``webhooks_event`` makes PostgreSQL notify the channel below when
a transaction that recorded events commits. Each worker runs one listener
thread (a Celery consumer bootstep, so it starts after the pool has forked):
on a notification it publishes a fan-out task (the task finds the events
itself). The web process takes no part: a broker outage never touches CKAN's
writes, and events committed meanwhile are fanned out when it returns (the
periodic sweep asks again for anything a notification missed).
"""
from __future__ import annotations

import logging
import select
import threading

import psycopg2
import psycopg2.extensions
from celery import bootsteps

from ckan import model

from .celery_app import send_fanout
from .model import NOTIFY_CHANNEL

log = logging.getLogger(__name__)


def _wake_a_worker() -> None:
    try:
        send_fanout()
    except Exception as error:  # noqa: BLE001 - the periodic sweep asks again
        log.warning("broker unavailable (%s); events wait for it", error)


def _listen(stop: threading.Event) -> None:
    dsn = model.meta.engine.url.render_as_string(hide_password=False)
    dsn = dsn.replace("postgresql+psycopg2://", "postgresql://")
    while not stop.is_set():
        conn = None
        try:
            conn = psycopg2.connect(dsn)
            conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
            conn.cursor().execute(f"LISTEN {NOTIFY_CHANNEL}")
            _wake_a_worker()  # whatever was committed while nobody listened
            while not stop.is_set():
                if select.select([conn], [], [], 5.0) == ([], [], []):
                    continue
                conn.poll()
                if conn.notifies:
                    conn.notifies.clear()
                    _wake_a_worker()
        except Exception as error:  # noqa: BLE001 - reconnect; the sweep covers the gap
            log.warning("outbox listener: %s; reconnecting", error)
            stop.wait(2.0)
        finally:
            if conn is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass


class OutboxListener(bootsteps.StartStopStep):
    """The listener thread, in the worker's main process."""

    requires = {"celery.worker.consumer.tasks:Tasks"}

    def __init__(self, parent, **kwargs):
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread = None

    def start(self, parent):
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=_listen, args=(self._stop,), daemon=True,
                                            name="ckanext-webhooks-listener")
            self._thread.start()

    def stop(self, parent):
        self._stop.set()
