"""Waiting on a state, not on the clock: poll a predicate until it holds."""
from __future__ import annotations

import time
from collections.abc import Iterable


def until(predicate, timeout: float, what="condition", interval: float = 0.2):
    """Poll ``predicate`` until it returns something true, and return that;
    fail after ``timeout`` seconds, naming ``what`` (a text, or a callable
    giving one at the failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, \
            f"not within {timeout}s: {what() if callable(what) else what}"
        time.sleep(interval)


def settled(packages: Iterable[str] = (), events: Iterable[str] = (),
            timeout: float = 30.0) -> list[str]:
    """Wait until the events of the datasets ``packages`` and the events
    ``events`` are settled, and return their ids: each fanned out, no
    rendering of it due again, and no delivery of it left in the queue (each
    was sent and its outcome recorded, or withheld, or given up).

    This is the positive evidence behind "nothing more arrives": fan-out
    queues every delivery of an event at once, a receiver records a request
    before it answers, and a worker deletes the delivery only after the
    answer. So once an event is settled, what a receiver has of it is all it
    will ever get, and the attempt log holds every attempt (short of a
    redelivery or recovery asked for later)."""
    import sqlalchemy as sa
    from ckan import model

    packages, events = list(packages), list(events)
    assert packages or events, "settled() of nothing"
    state: dict = {}

    def done() -> list[str]:
        with model.meta.engine.connect() as conn:
            rows = conn.execute(sa.text("""
                SELECT e.id, e.fanned_out IS NOT NULL AS fanned_out,
                       EXISTS (SELECT 1 FROM webhooks_rendering r
                                WHERE r.event_id = e.id AND r.due IS NOT NULL)
                           AS rendering_due,
                       (SELECT count(*) FROM webhooks_delivery d WHERE d.event_id = e.id)
                           AS queued
                  FROM webhooks_event e
                 WHERE e.package_id = ANY(:packages) OR e.id = ANY(:events)
            """), {"packages": packages, "events": events}).all()
        state["missing"] = set(events) - {row.id for row in rows}
        state["open"] = [tuple(row) for row in rows
                         if not row.fanned_out or row.rendering_due or row.queued]
        ids = [row.id for row in rows]
        return ids if ids and not state["missing"] and not state["open"] else []

    return until(done, timeout, lambda: (
        f"events settled (unknown: {sorted(state.get('missing', ()))}; not settled, as "
        f"(id, fanned out, rendering due, deliveries queued): {state.get('open')})"))


def attempt_log(hook_id: str) -> list[tuple]:
    """What the attempt log holds for one hook, oldest first: (event id,
    status, error) per attempt, the evidence a test reads its outcome from."""
    import sqlalchemy as sa
    from ckan import model

    with model.meta.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(
            "SELECT event_id, status, error FROM webhooks_attempt WHERE hook_id = :h "
            "ORDER BY id"), {"h": hook_id})]
