"""Wakes the delivery workers the moment events are committed, and writes
each worker's heartbeat.

A trigger on ``webhooks_event`` makes PostgreSQL notify the channel below when
a transaction that recorded events commits. Each worker runs one listener
thread (a Celery consumer bootstep, so it starts after the pool has forked),
on a database connection of its own (``ckanext.webhooks.listen_url``, or
``sqlalchemy.url``). Of all the workers, on however many machines, one
listens: the one holding a PostgreSQL advisory lock, on that connection. On a
notification it publishes a fan-out task (the task finds the events itself),
so a commit makes one fan-out, not one per worker. The others try to take the
lock every ``heartbeat_seconds``: when the listener's worker dies, its
connection closes, the lock is released and another worker takes over within
seconds. The web process takes no part: a broker outage never touches CKAN's
writes, and events committed meanwhile are fanned out when it returns (the
periodic sweep asks again for anything a notification missed).

Every worker's listener thread also writes the worker's heartbeat
(``webhooks_worker``), which ``ckan webhooks health`` reads.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time

import psycopg2
import psycopg2.extensions
from celery import bootsteps

from ckan import model

from . import settings
from .celery_app import send_fanout
from .model import NOTIFY_CHANNEL

log = logging.getLogger(__name__)

# The advisory lock whose holder is the listener (a fixed 64-bit key).
LISTENER_LOCK = 0x636B_616E_7768_6B31  # "ckanwhk1"


_wakes = 0  # fan-out tasks published by this worker's listener (its heartbeat says)


def _wake_a_worker() -> None:
    global _wakes
    try:
        send_fanout()
        _wakes += 1
    except Exception as error:  # noqa: BLE001 - the periodic sweep asks again
        log.warning("broker unavailable (%s); events wait for it", error)


def _dsn() -> str:
    url = settings.listen_url() or model.meta.engine.url.render_as_string(hide_password=False)
    return url.replace("postgresql+psycopg2://", "postgresql://")


def _beat(cursor, name: str, started: float, listening: bool) -> None:
    cursor.execute("""
        INSERT INTO webhooks_worker (name, host, pid, started, beat, listener, wakes)
        VALUES (%s, %s, %s, to_timestamp(%s), now(), %s, %s)
        ON CONFLICT (name) DO UPDATE
           SET beat = now(), listener = EXCLUDED.listener, wakes = EXCLUDED.wakes
    """, (name, socket.gethostname(), os.getpid(), started, listening, _wakes))


def _take_the_lock(cursor) -> bool:
    cursor.execute("SELECT pg_try_advisory_lock(%s)", (LISTENER_LOCK,))
    if not cursor.fetchone()[0]:
        if not _unseat_a_stuck_listener(cursor):
            return False
        cursor.execute("SELECT pg_try_advisory_lock(%s)", (LISTENER_LOCK,))
        if not cursor.fetchone()[0]:
            return False
    cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
    log.info("outbox listener: this worker now listens for every worker")
    _wake_a_worker()  # whatever was committed while nobody listened
    return True


def _unseat_a_stuck_listener(cursor) -> bool:
    """A listener whose worker hangs (stopped, stuck, its host frozen) keeps
    its connection and so the lock, but stops beating: when no listener has
    beaten for three heartbeats, end the connection that holds the lock (the
    database user may end its own sessions), so the lock comes free."""
    cursor.execute("""
        SELECT pg_terminate_backend(l.pid) FROM pg_locks l
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
           AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND l.classid = %(high)s AND l.objid = %(low)s AND l.pid <> pg_backend_pid()
           AND NOT EXISTS (SELECT 1 FROM webhooks_worker WHERE listener
                            AND beat > now() - make_interval(secs => %(stale)s))
    """, {"high": LISTENER_LOCK >> 32, "low": LISTENER_LOCK & 0xFFFFFFFF,
          "stale": 3 * settings.heartbeat_seconds()})
    ended = [row[0] for row in cursor.fetchall()]
    if ended:
        log.warning("outbox listener: the listening worker stopped beating; its "
                    "connection was ended so that this one takes over")
    return any(ended)


def _listen(stop: threading.Event, name: str) -> None:
    started = time.time()
    while not stop.is_set():
        conn = None
        try:
            conn = psycopg2.connect(_dsn(), application_name="ckanext-webhooks listener")
            conn.set_isolation_level(psycopg2.extensions.ISOLATION_LEVEL_AUTOCOMMIT)
            cursor = conn.cursor()
            listening = _take_the_lock(cursor)
            _beat(cursor, name, started, listening)
            next_beat = time.monotonic() + settings.heartbeat_seconds()
            while not stop.is_set():
                interval = settings.heartbeat_seconds()
                if time.monotonic() >= next_beat:
                    if not listening:
                        listening = _take_the_lock(cursor)
                    _beat(cursor, name, started, listening)
                    next_beat = time.monotonic() + interval
                wait = max(0.0, next_beat - time.monotonic())
                if not listening:
                    stop.wait(wait)
                    continue
                if select.select([conn], [], [], wait) == ([], [], []):
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
                    conn.close()  # also releases the lock: another worker takes over
                except Exception:  # noqa: BLE001 - the connection is gone already
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
            name = getattr(parent, "hostname", None) or f"webhooks-{os.getpid()}"
            self._thread = threading.Thread(target=_listen, args=(self._stop, name),
                                            daemon=True, name="ckanext-webhooks-listener")
            self._thread.start()

    def stop(self, parent):
        self._stop.set()
