"""Periodic maintenance: pause hooks that have only failed for days, delete
hooks paused by a rule and not resumed within the grace period, and delete
attempts and fanned-out events older than the retention period."""
from __future__ import annotations

import logging

import sqlalchemy as sa

from ckan import model

from . import settings
from .delivery_queue import host_of, pause
from .ids import fingerprint

log = logging.getLogger(__name__)


RETENTION_BATCH = 5000  # rows per transaction: short locks, bounded WAL per commit


def _delete_in_batches(statement: str, days: float, what: str) -> int:
    """Run a bounded DELETE (``LIMIT :batch``) until it deletes less than a
    batch, committing each: no long transaction, no lock held for long."""
    total = batches = 0
    while True:
        deleted = model.Session.execute(sa.text(statement), {
            "secs": days * 86400, "batch": RETENTION_BATCH}).rowcount
        model.Session.commit()
        total, batches = total + deleted, batches + 1
        if deleted < RETENTION_BATCH:
            if total:
                log.info("retention: deleted %d %s in %d transaction(s)", total, what, batches)
            return total


def prune() -> dict[str, int]:
    """Pause hooks that have only failed for ``stale_after_days``, delete hooks
    a rule paused more than ``pause_grace_days`` ago, and delete old attempts
    and fanned-out events; returns what was done."""
    session = model.Session
    stale_days = settings.stale_after_days()
    stale = session.execute(sa.text("""
        SELECT id FROM webhooks
         WHERE active AND failing_since < now() - make_interval(secs => :secs)
         ORDER BY id COLLATE "C"
    """), {"secs": stale_days * 86400}).scalars().all()
    for hook_id in stale:
        pause(hook_id, f"only failures for {stale_days:g} days")
        session.commit()
    grace = settings.pause_grace_days()
    expired = session.execute(sa.text("""
        DELETE FROM webhooks
         WHERE id IN (SELECT id FROM webhooks
                       WHERE NOT active AND pause_reason IS NOT NULL
                         AND paused_at < now() - make_interval(secs => :secs)
                       ORDER BY id COLLATE "C" FOR UPDATE)
        RETURNING id, topics, address, pause_reason
    """), {"secs": grace * 86400}).all()
    for row in expired:
        log.info("pruned webhook %s (%s, %s): paused %g days ago (%s) and not resumed",
                 fingerprint(row.id), " ".join(row.topics), host_of(row.address), grace,
                 row.pause_reason)
    session.execute(sa.text(  # workers gone for a day: no longer worth a row
        "DELETE FROM webhooks_worker WHERE beat < now() - interval '1 day'"))
    session.commit()
    attempts = _delete_in_batches("""
        DELETE FROM webhooks_attempt WHERE id IN (
            SELECT id FROM webhooks_attempt
             WHERE at < now() - make_interval(secs => :secs) LIMIT :batch)
    """, settings.log_retention_days(), "attempts")
    events = _delete_in_batches("""
        DELETE FROM webhooks_event WHERE id IN (
            SELECT e.id FROM webhooks_event e
             WHERE e.fanned_out < now() - make_interval(secs => :secs)
               AND NOT EXISTS (SELECT 1 FROM webhooks_delivery d WHERE d.event_id = e.id)
             LIMIT :batch)
    """, settings.event_retention_days(), "events")
    return {"paused_stale_hooks": len(stale), "deleted_paused_hooks": len(expired),
            "old_events": events, "old_attempts": attempts}
