"""Celery tasks. Thin on purpose: the work is in :mod:`fanout`,
:mod:`dispatcher` and :mod:`maintenance`, the
durable state in the database, so a task can be lost or run twice: the
messages carry no data, they only say "there is work"."""
from __future__ import annotations

import logging
import math

from ckan import model

from . import dispatcher, maintenance, settings
from .celery_app import DRAIN, FANOUT, PRUNE, SWEEP, celery, send_drain, send_fanout
from .delivery_queue import due_count
from .fanout import FANOUT_EVENTS, fan_out, pending_events
from .shutdown import sigterm_deferred

log = logging.getLogger(__name__)


def _helpers_for(due: int) -> int:
    """How many more drain tasks to ask for, so other worker processes help."""
    batches = math.ceil(due / max(1, settings.batch_size()))
    return max(0, min(batches, 8) - 1)


def _ask(count: int) -> None:
    if count:
        try:
            send_drain(count)
        except Exception as error:  # noqa: BLE001 - the sweep will ask again
            log.warning("could not queue drain tasks: %s", error)


@celery.task(name=FANOUT)
def fanout() -> int:
    with sigterm_deferred():  # SIGTERM: what is on the wire is recorded first
        return _fanout()


def _fanout() -> int:
    # The first batch is claimed as it is queued, and committed with it just
    # before it is sent; work other processes are asked to help with must be
    # committed before asking.
    first = dispatcher.first_claim()
    events, queued = fan_out(commit=False, claim=first)
    if events == FANOUT_EVENTS or _helpers_for(queued):
        model.Session.commit()
    if events == FANOUT_EVENTS:  # more may be waiting
        try:
            send_fanout()
        except Exception as error:  # noqa: BLE001 - the sweep will ask again
            log.warning("could not queue a fan-out task: %s", error)
    if queued:
        _ask(_helpers_for(queued))
    # Also what a redelivery (queued without a new event) is waiting for.
    done, more = dispatcher.drain(first=first)
    model.Session.commit()  # the fan-out, if the drain claimed nothing (stopping)
    if events or done:
        log.info("fanned out %d event(s): %d deliveries queued, %d attempted here",
                 events, queued, done)
    if more:
        _ask(1)
    return queued


@celery.task(name=DRAIN)
def drain() -> int:
    with sigterm_deferred():  # SIGTERM: what is on the wire is recorded first
        done, more = dispatcher.drain()
        if done:
            log.info("delivery attempts made: %d", done)
        if more:  # another worker (or this one's next process) goes on
            _ask(1)
        return done


@celery.task(name=SWEEP)
def sweep() -> None:
    if pending_events(min_age=1.0):
        log.info("sweep: events wait for a fan-out no notification asked for")
        send_fanout()
    due = due_count()
    if due:
        _ask(_helpers_for(due) + 1)


@celery.task(name=PRUNE)
def prune() -> dict:
    return maintenance.prune()
