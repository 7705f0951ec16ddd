"""The worker process (``ckan webhooks worker``): a Celery worker consuming
the webhooks queue, with the outbox listener in its main process and the
shutdown hooks that let a stop finish and record what is on the wire.

The wiring runs one way: this module imports :mod:`celery_app`, :mod:`tasks`
and :mod:`listener`; none of them imports it.
"""
from __future__ import annotations

import gc
import glob
import logging
import os
import tempfile
import time
from typing import Any

import sqlalchemy as sa
from billiard import active_children
from celery import signals

from ckan import model

from . import metrics, shutdown, tasks  # noqa: F401 - tasks registers the Celery tasks
from .celery_app import celery, queue_name, use_flask_app
from .delivery_queue import hold_limit
from .listener import OutboxListener

log = logging.getLogger(__name__)


@signals.worker_process_init.connect
@signals.beat_init.connect
def _fresh_connections(**_: Any) -> None:
    """A forked process must not share its parent's database connections."""
    model.Session.remove()
    model.meta.engine.dispose(close=False)


@signals.worker_init.connect
@signals.worker_process_init.connect
def _freeze_what_is_loaded(**_: Any) -> None:
    """What is loaded before the pool forks (CKAN, its plugins) and as each
    process starts lives as long as the process: frozen, the collector's
    full passes, which a large fan-out's thousands of jobs set off, no longer
    walk it, and the forked processes leave those pages shared."""
    gc.freeze()


@signals.worker_process_init.connect
def _pool_process(**_: Any) -> None:
    """In a pool process, a drain under way defers SIGTERM until its requests
    are finished and recorded (see :func:`shutdown.sigterm_deferred`)."""
    shutdown.in_pool_process()


@signals.worker_shutting_down.connect
def _stop_claiming(how: str = "Warm", **_: Any) -> None:
    """Runs in the worker's main process (in its signal handler) when it is
    asked to stop: every process of the worker stops claiming deliveries and
    records those on the wire before its task returns."""
    shutdown.worker_stopping(cold=how != "Warm")


@signals.worker_process_shutdown.connect
def _pool_process_gone(pid: int | None = None, **_: Any) -> None:
    """Its live gauges leave the sums (prometheus_client's multiprocess mode)."""
    if pid:
        metrics.process_gone(pid)


@signals.worker_ready.connect
def _announce_ready(**_: Any) -> None:
    log.info("ckanext-webhooks worker ready, consuming %s", queue_name())


def _end_abandoned_transactions() -> None:
    """A worker process that hangs or is frozen inside a transaction would hold
    its row locks for as long as its connection lives, and deliveries it had
    locked could never be taken over (claims skip locked rows). No transaction
    of a worker waits on its client longer than a batch may be held, so the
    server ends any that does, and its locks with it."""
    if not sa.event.contains(model.meta.engine, "connect", limit_idle_transactions):
        sa.event.listen(model.meta.engine, "connect", limit_idle_transactions)


def limit_idle_transactions(dbapi_connection: Any, _: Any) -> None:
    with dbapi_connection.cursor() as cursor:
        cursor.execute("SET idle_in_transaction_session_timeout = %s",
                       (int(hold_limit() * 1000),))
    dbapi_connection.commit()  # a SET in a transaction rolled back would not hold


BEAT_EXIT_SECONDS = 10.0


def run_worker(flask_app: Any, concurrency: int | None, beat: bool,
               loglevel: str, pool: str | None = None) -> None:
    """Start a Celery worker consuming the webhooks queue (blocks)."""
    use_flask_app(flask_app)
    _end_abandoned_transactions()
    metrics.prepare_worker()  # before the pool forks and anything imports prometheus_client
    metrics.serve()
    celery.steps["consumer"].add(OutboxListener)
    schedule = os.path.join(tempfile.gettempdir(),
                            f"ckanext-webhooks-beat-{os.getpid()}")
    argv = ["worker", f"--loglevel={loglevel}", "-Q", queue_name(),
            "--without-gossip", "--without-mingle",
            f"--hostname=webhooks-{os.getpid()}@%h"]
    if concurrency:
        argv.append(f"--concurrency={concurrency}")
    if pool:
        argv.append(f"--pool={pool}")
    if beat:
        argv += ["--beat", f"--schedule={schedule}"]
    try:
        celery.worker_main(argv)
    finally:
        metrics.cleanup()
        # The embedded beat, a process of its own, writes its schedule as it
        # exits: its files are removed once it has (or its last write fails).
        deadline = time.monotonic() + BEAT_EXIT_SECONDS
        for child in active_children():
            child.join(max(0.0, deadline - time.monotonic()))
        for leftover in glob.glob(glob.escape(schedule) + "*"):  # beat's shelve files
            try:
                os.unlink(leftover)
            except OSError:
                pass
