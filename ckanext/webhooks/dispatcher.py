"""The delivery loop: claim due deliveries, prepare them, send them, record
their outcomes. The queue is :mod:`delivery_queue`, the decision of what each
delivery sends :mod:`prepare`, the HTTP client :mod:`sender`; the Celery tasks
in :mod:`tasks` call :func:`drain`.
"""
from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from typing import Optional

import sqlalchemy as sa

from ckan import model

from . import metrics, settings
from .delivery_queue import (FirstClaim, Job, claim, connection_lost, hand_back, leases,
                             record, rollback_quietly)
from .fanout import fan_out
from .ids import fingerprint
from .prepare import prepare_batch
from .sender import Outcome, Request, Sender
from .shutdown import stopping

log = logging.getLogger(__name__)

# --- per-process state ------------------------------------------------------

_sender: Optional[Sender] = None
_state_lock = threading.Lock()


def _process_sender() -> Sender:
    global _sender
    with _state_lock:
        if _sender is None:
            # Timeouts, DNS, the healthy pool and the slow lane: see Sender.from_config.
            _sender = Sender.from_config()
    return _sender


MAX_BATCHES_IN_FLIGHT = 4
# More, while the sender has free slots for healthy receivers: batches held
# by slow receivers must not keep new work from the healthy ones.
MAX_BATCHES_WITH_FREE_SLOTS = 16
POLL_SECONDS = 0.25  # how often a drain with batches in flight looks for new work


def first_claim() -> FirstClaim:
    """The claim a fan-out makes for this process's first batch (see :func:`drain`)."""
    return FirstClaim(settings.batch_size(), sorted(_process_sender().saturated_slow_hosts()))


def drain(budget: float = 30.0, first: Optional[FirstClaim] = None) -> tuple[int, bool]:
    """Deliver due work until none is left or ``budget`` seconds have passed;
    ``first``: a batch already claimed (by the fan-out), sent first.

    Several batches are on the wire at once and each is recorded as soon as
    it completes, so a receiver that keeps one batch waiting for its timeout
    does not hold up the batches after it. Once the worker is asked to stop
    (:func:`stopping`) nothing more is claimed, and the batches on the wire
    are finished and recorded before it returns.
    Returns (attempts made, whether due work may remain).
    """
    started = time.monotonic()
    total, in_flight, exhausted, database_away = 0, [], False, False
    # Right after a fan-out: no new events to look for yet and, when its
    # first claim took all it queued, other work waits until that batch is
    # answered or a poll has passed (its requests go out first, unhindered).
    look_for_events, look_now = first is None, True
    try:
        if first is not None and first.jobs:
            model.Session.commit()  # the fan-out and its claim, before anything is sent
            _send_first(first, in_flight)
            look_now = first.room() <= 0
        while True:
            if exhausted and not in_flight:
                # The last claim took all that was due: asking again now
                # would cost a round trip for nothing (new events come with
                # a fan-out task of their own, retries with the sweep).
                return total, database_away
            if not look_now:
                look_now = True
            elif not (database_away or stopping()) and time.monotonic() - started < budget:
                try:
                    exhausted = _take_more(in_flight, look_for_events)
                    look_for_events = True
                except sa.exc.DBAPIError as error:
                    # The database is away (a restart, a fail-over): the
                    # batches on the wire are still finished and recorded
                    # (record waits for it), then a later drain goes on.
                    if not in_flight or not connection_lost(error):
                        raise
                    rollback_quietly()
                    log.warning("could not look for more work: the database is away (%s); "
                                "finishing the %d batch(es) on the wire first",
                                type(error.orig).__name__, len(in_flight))
                    exhausted = database_away = True
            if not in_flight:
                if stopping() and not exhausted:
                    log.info("stopping: %d attempt(s) made and recorded, the rest "
                             "left to other workers", total)
                return total, not exhausted or database_away
            futures = [f for _, _, f in in_flight if f is not None]
            if futures:
                concurrent.futures.wait(futures, timeout=POLL_SECONDS,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
            for batch in [b for b in in_flight if b[2] is None or b[2].done()]:
                _finish(*batch)
                in_flight.remove(batch)
                leases.release(batch[0][0].claim_token)
                total += len(batch[0])
    except BaseException as error:
        if in_flight and not isinstance(error, Exception):
            # Made to stop at once (a second SIGTERM): what is not recorded
            # goes back to the queue now rather than when its lease runs out.
            try:
                hand_back([b[0][0].claim_token for b in in_flight])
                log.info("stopping at once: %d batch(es) handed back", len(in_flight))
            except Exception as hand_back_error:  # noqa: BLE001 - their leases run out
                log.warning("could not hand back unrecorded work: %s", hand_back_error)
        raise
    finally:  # whatever is left unrecorded is not renewed: its lease runs out
        leases.release(*(b[0][0].claim_token for b in in_flight))


def _take_more(in_flight: list, look_for_events: bool = True) -> bool:
    """Claim, prepare and hand to the sender more batches while there is room;
    returns whether the queue had no more for this process."""
    if in_flight and look_for_events:
        # While batches wait on slow receivers, new events and newly due
        # work go out beside them, not after them: the fan-out claims its
        # first batch (as a fan-out task's does) even when the healthy pool
        # has no free slot, so a proven receiver's deliveries are not left
        # unclaimed while the pool is busy probing receivers not heard from
        # yet; within the bound on batches held, as every claim.
        first = first_claim() if len(in_flight) < MAX_BATCHES_WITH_FREE_SLOTS else None
        fan_out(claim=first)  # commits
        if first is not None and first.jobs:
            _send_first(first, in_flight)
    while len(in_flight) < MAX_BATCHES_IN_FLIGHT or (
            len(in_flight) < MAX_BATCHES_WITH_FREE_SLOTS
            and _process_sender().free_capacity() > 0):
        # Work for receivers whose slow lane is full here is left to
        # processes with room (and handed back if it waits).
        sender = _process_sender()
        if metrics.enabled():
            metrics.hosts_backed_off(len(sender.slow_hosts()))
        jobs, more = claim(settings.batch_size(), sender.saturated_slow_hosts())
        if jobs:
            in_flight.append(_send(jobs, prepare_batch(jobs)))
        if not more:
            return True
    return False


def _send_first(first: FirstClaim, in_flight: list) -> None:
    """Hand a fan-out's committed first claim to the sender, its lease renewed."""
    jobs = first.hold()
    in_flight.append(_send(jobs, prepare_batch(jobs)))


def _send(jobs: list[Job], sendable: list[Job]):
    """Hand the sendable jobs to the sender: it resolves and checks each address,
    and signs each request right before writing it. A job that cannot even be
    handed over has that as its outcome (``internal_error``, retried)."""
    requests, handed = [], []
    for job in sendable:
        try:
            requests.append(Request(job.hook.address, job.body.encode("utf-8"), job.event_id,
                                    job.hook.signing_secrets))
            handed.append(job)
        except Exception:  # noqa: BLE001 - this delivery's outcome, not the batch's
            log.exception("could not hand event %s for %s to the sender", job.event_id,
                          fingerprint(job.hook_id))
            job.outcome = Outcome(None, "internal_error", 0.0, sent=False)
    future = _process_sender().submit(requests) if requests else None
    return jobs, handed, future


def _finish(jobs: list[Job], sendable: list[Job], future) -> None:
    if future is not None:
        for job, outcome in zip(sendable, future.result()):
            job.outcome = outcome
    record(jobs)
