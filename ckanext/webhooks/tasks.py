"""Celery tasks. Thin on purpose: the work is in :mod:`dispatcher`, the
durable state in the database, so a task can be lost or run twice."""
from __future__ import annotations

import logging
import math
from typing import Optional

from . import dispatcher
from .celery_app import DRAIN, FANOUT, PRUNE, SWEEP, celery, send_drain, send_fanout

log = logging.getLogger(__name__)


def _helpers_for(due: int) -> int:
    """How many more drain tasks to ask for, so other worker processes help."""
    batches = math.ceil(due / max(1, dispatcher.batch_size()))
    return max(0, min(batches, 8) - 1)


def _ask(count: int, event_id: Optional[str] = None) -> None:
    if count:
        try:
            send_drain(count, event_id)
        except Exception as error:  # noqa: BLE001 - the sweep will ask again
            log.warning("could not queue drain tasks: %s", error)


@celery.task(name=FANOUT)
def fanout(event_ids: list[str], token: Optional[str] = None) -> int:
    queued = dispatcher.fan_out(event_ids, token)
    if queued:
        _ask(_helpers_for(queued))
        _, more = dispatcher.drain()
        if more:
            _ask(1)
    return queued


@celery.task(name=DRAIN)
def drain(event_id: Optional[str] = None) -> int:
    done, more = dispatcher.drain(event_id)
    if more:
        _ask(1, event_id)
    return done


@celery.task(name=SWEEP)
def sweep() -> None:
    event_ids, token = dispatcher.unpublished_events()
    if event_ids:
        log.info("sweep: publishing %d event(s) that missed the broker", len(event_ids))
        send_fanout(event_ids, token)
    due = dispatcher.due_count()
    if due:
        _ask(_helpers_for(due) + 1)


@celery.task(name=PRUNE)
def prune() -> dict:
    return dispatcher.prune()
