"""Fan-out, delivery queue and pruning, on top of the database.

The Celery tasks in :mod:`tasks` are thin: they call these functions. The
database is the source of truth:

* :func:`fan_out` takes outbox events under a row lock (``FOR UPDATE SKIP
  LOCKED``, so one worker does each), takes the entity's API view once, and
  queues one ``webhooks_delivery`` row per subscribed hook with a single
  ``INSERT ... SELECT``, in one transaction.
* :func:`drain` claims due rows (``FOR UPDATE SKIP LOCKED``; the claim moves
  ``due`` forward by a lease, so work held by a dead worker comes back by
  itself), sends them concurrently, and records the outcomes in bulk: rows
  delivered or given up are deleted, failed ones get their next ``due`` from
  the retry schedule, hooks get their statistics, and hooks that answer 410
  or too many 4xx are deleted.
"""
from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Optional

import sqlalchemy as sa

from ckan import model
from ckan.plugins import PluginImplementations, toolkit

from . import guard, payload, signing
from .delivery import Outcome, Sender
from .ids import fingerprint
from .interfaces import IWebhooks
from .model import WebhookEvent, utcnow

log = logging.getLogger(__name__)
# The channel the outbox trigger (migration 01) notifies and workers LISTEN on.
NOTIFY_CHANNEL = "ckanext_webhooks_events"


def _cfg(key: str, default: Any) -> Any:
    value = toolkit.config.get(f"ckanext.webhooks.{key}")
    return default if value in (None, "") else value


def retry_schedule() -> list[float]:
    raw = _cfg("retry_schedule", "0 5 300 1800 7200 18000 36000 50400 72000 86400")
    if isinstance(raw, str):
        raw = raw.split()
    return [float(x) for x in raw]


def batch_size() -> int:
    return int(_cfg("batch_size", 500))


def concurrency() -> int:
    return int(_cfg("concurrency", 64))


def lease_seconds() -> float:
    """Long enough for a whole batch to time out, round by round."""
    rounds = math.ceil(batch_size() / max(1, concurrency()))
    return float(_cfg("lease_seconds", 0)) or (
        float(_cfg("timeout", 15)) * rounds + 10)


# --- per-process state ------------------------------------------------------

_sender: Optional[Sender] = None
_state_lock = threading.Lock()
_envelopes: "collections.OrderedDict[str, tuple[Any, str]]" = collections.OrderedDict()


def _process_sender() -> Sender:
    global _sender
    with _state_lock:
        if _sender is None:
            _sender = Sender(
                connect_timeout=float(_cfg("connect_timeout", 5)),
                total_timeout=float(_cfg("timeout", 15)),
                max_bytes=int(_cfg("max_response_bytes", 20480)),
                concurrency=concurrency(),
                per_host=int(_cfg("connections_per_host", 16)),
            )
    return _sender


# --- fan-out ----------------------------------------------------------------

FANOUT_EVENTS = 100  # events a fan-out task takes at a time


def fan_out(limit: int = FANOUT_EVENTS) -> tuple[int, int]:
    """Fan out committed events no worker has taken yet.

    Returns (events fanned out, deliveries queued).

    Each event is taken under a row lock (``FOR UPDATE SKIP LOCKED``: other
    workers skip it, and a worker that dies lets it go), its entity view is
    taken, and its deliveries are queued and the event marked fanned out in
    the same transaction.
    """
    session = model.Session
    events = session.scalars(
        sa.select(WebhookEvent).where(WebhookEvent.fanned_out.is_(None))
        .order_by(WebhookEvent.created).limit(limit).with_for_update(skip_locked=True)).all()
    queued = 0
    for event in events:
        # The entity's API view, taken now, right after the commit, and kept:
        # every delivery and retry of this event sends exactly this. (Events of
        # a plugin's own topic came with their data.)
        if event.data is None:
            event.data = _entity_view(event)
        event.fanned_out = utcnow()
        session.flush()
        known = (event.snapshot or {}).get("_package") or {}
        # Hooks filtered by group hear of the dataset's groups as they are now.
        result = session.execute(sa.text("""
            INSERT INTO webhooks_delivery (event_id, hook_id, attempts, due)
            SELECT :event_id, id, 0, now() FROM webhooks
             WHERE topic = :topic
               AND (dataset_id IS NULL OR dataset_id = :package_id)
               AND (organization_id IS NULL OR organization_id = :owner_org)
               AND (group_id IS NULL OR group_id IN (
                    SELECT group_id FROM member
                     WHERE table_name = 'package' AND table_id = :package_id
                       AND state = 'active'))
            ON CONFLICT DO NOTHING
        """), {"event_id": event.id, "topic": event.topic, "package_id": event.package_id,
               "owner_org": known.get("owner_org")})
        queued += result.rowcount
        _remember_envelope(event)
        log.debug("event %s (%s) fanned out to %d hook(s)", event.id, event.topic,
                  result.rowcount)
    session.commit()
    return len(events), queued


def pending_events(min_age: float) -> bool:
    """Are there committed events older than ``min_age`` seconds not fanned out?"""
    return bool(model.Session.execute(sa.text("""
        SELECT 1 FROM webhooks_event
         WHERE fanned_out IS NULL AND created <= now() - make_interval(secs => :age)
         LIMIT 1
    """), {"age": min_age}).first())


def _entity_view(event: WebhookEvent) -> dict:
    try:
        return payload.entity_data(event)
    except Exception:  # noqa: BLE001 - deliver what we know rather than nothing
        log.exception("could not build the payload of %s; sending the snapshot", event.id)
        return {k: v for k, v in (event.snapshot or {}).items() if k != "_package"}


# --- delivery queue ---------------------------------------------------------

@dataclass
class _Job:
    event_id: str
    hook_id: str
    attempts: int
    hook: "_HookRow"
    target: Optional[guard.Target] = None
    body: str = ""
    headers: Optional[dict] = None
    outcome: Optional[Outcome] = None
    drop: Optional[str] = None  # why nothing is sent (and nothing retried)
    topic: str = ""


class _HookRow(NamedTuple):
    """What a delivery needs of its hook, read with the claim."""
    id: str
    address: str
    secret: Optional[str]
    user_id: Optional[str]


def claim(limit: int) -> list[_Job]:
    """Lease up to ``limit`` due deliveries, with their hooks, in one statement."""
    session = model.Session
    rows = session.execute(sa.text("""
        UPDATE webhooks_delivery d
           SET due = now() + make_interval(secs => :lease), attempts = d.attempts + 1
          FROM (SELECT event_id, hook_id FROM webhooks_delivery
                 WHERE due <= now()
                 ORDER BY due LIMIT :limit FOR UPDATE SKIP LOCKED) c, webhooks h
         WHERE d.event_id = c.event_id AND d.hook_id = c.hook_id AND h.id = d.hook_id
        RETURNING d.event_id, d.hook_id, d.attempts, h.address, h.secret, h.user_id
    """), {"lease": lease_seconds(), "limit": limit}).all()
    session.commit()
    return [_Job(r.event_id, r.hook_id, r.attempts,
                 _HookRow(r.hook_id, r.address, r.secret, r.user_id)) for r in rows]


MAX_BATCHES_IN_FLIGHT = 4


def drain(budget: float = 30.0) -> tuple[int, bool]:
    """Deliver due work until none is left or ``budget`` seconds have passed.

    Several batches are on the wire at once and each is recorded as soon as
    it completes, so a receiver that keeps one batch waiting for its timeout
    does not hold up the batches after it.
    Returns (attempts made, whether due work may remain).
    """
    started = time.monotonic()
    total, in_flight, exhausted = 0, [], False
    while True:
        while (not exhausted and len(in_flight) < MAX_BATCHES_IN_FLIGHT
               and time.monotonic() - started < budget):
            jobs = claim(batch_size())
            if not jobs:
                exhausted = True
                break
            in_flight.append(_send(jobs, _prepare(jobs)))
            total += len(jobs)
        if not in_flight:
            return total, not exhausted
        futures = [f for _, _, f in in_flight if f is not None]
        if futures:
            concurrent.futures.wait(futures, return_when=concurrent.futures.FIRST_COMPLETED)
        for batch in [b for b in in_flight if b[2] is None or b[2].done()]:
            in_flight.remove(batch)
            _finish(*batch)


def _prepare(jobs: list[_Job]) -> list[_Job]:
    """Decide, for each claimed job, whether and what to send; returns the sendable."""
    session = model.Session
    readers: dict = {}
    visible: dict = {}
    hosts: dict = {}
    allowed = guard.allowed_networks()
    extensions = list(PluginImplementations(IWebhooks))
    sendable = []
    for job in jobs:
        hook = job.hook
        event, envelope = _envelope(job.event_id)
        if event is None:
            job.drop = "gone"
            continue
        job.topic = event.topic
        reader = payload.reader_name(hook.user_id, readers)
        if reader is None:
            job.drop = "reader_gone"
            continue
        key = (job.event_id, reader)
        if key not in visible:
            visible[key] = payload.can_read(event, reader)
        if not visible[key]:
            job.drop = "not_visible"
            continue
        try:  # checked again at every attempt: DNS answers change
            target = guard.resolve(hook.address, allowed, hosts)
        except guard.Refused:
            job.outcome = Outcome(None, "refused_address", 0.0)
            continue
        job.target = target
        job.body = payload.body_for(envelope, hook.id)
        if extensions:
            job.body = _through_plugins(extensions, job.body, hook)
            if job.body is None:
                job.drop = "vetoed"
                continue
        job.headers = signing.headers(job.event_id, job.body, hook.secret)
        sendable.append(job)
    session.rollback()  # end the read transaction before the slow part
    return sendable


def _through_plugins(extensions, body: str, hook) -> Optional[str]:
    """Let IWebhooks plugins veto or change one delivery; None means vetoed."""
    data = json.loads(body)
    info = {"id": hook.id, "address": hook.address, "user_id": hook.user_id,
            "topic": data["topic"]}
    for plugin in extensions:
        if plugin.webhooks_veto(data, info):
            return None
        data = plugin.webhooks_payload(data, info)
    return json.dumps(data, separators=(",", ":"), default=str)


def _send(jobs: list[_Job], sendable: list[_Job]):
    future = _process_sender().submit(
        (job.target, job.body.encode("utf-8"), job.headers) for job in sendable) \
        if sendable else None
    return jobs, sendable, future


def _finish(jobs: list[_Job], sendable: list[_Job], future) -> None:
    if future is not None:
        for job, outcome in zip(sendable, future.result()):
            job.outcome = outcome
    _record(jobs)


def _envelope(event_id: str) -> tuple[Any, str]:
    cached = _envelopes.get(event_id)
    if cached is not None:
        _envelopes.move_to_end(event_id)
        return cached
    event = model.Session.get(WebhookEvent, event_id)
    if event is None:
        return None, ""
    return _remember_envelope(event)


def _remember_envelope(event: WebhookEvent) -> tuple[Any, str]:
    data_json = json.dumps(event.data if event.data is not None else {},
                           separators=(",", ":"), default=str)
    cached = (_DetachedEvent(event), payload.event_envelope(event, data_json))
    _envelopes[event.id] = cached
    while len(_envelopes) > 64:
        _envelopes.popitem(last=False)
    return cached


class _DetachedEvent:
    """The fields of an event that deliveries need, safe to keep in a cache."""

    def __init__(self, event: WebhookEvent) -> None:
        self.id = event.id
        self.topic = event.topic
        self.object_id = event.object_id
        self.package_id = event.package_id
        self.created = event.created
        self.snapshot = event.snapshot


# --- recording outcomes -----------------------------------------------------

_RETRYABLE_4XX = {408, 425, 429}


def _classify(outcome: Outcome) -> str:
    """'ok', 'gone' (410), 'client' (other 4xx: not retried), or 'retry'."""
    if outcome.ok:
        return "ok"
    if outcome.status == 410:
        return "gone"
    if outcome.status is not None and 400 <= outcome.status < 500 \
            and outcome.status not in _RETRYABLE_4XX:
        return "client"
    if outcome.error == "refused_address":
        return "client"
    return "retry"


def _record(jobs: list[_Job]) -> None:
    session = model.Session
    schedule = retry_schedule()
    finished, retries = [], []
    per_hook: dict[str, dict] = {}
    for job in jobs:
        if job.outcome is None:  # dropped: nothing was sent
            finished.append({"e": job.event_id, "h": job.hook_id})
            continue
        kind = _classify(job.outcome)
        stats = per_hook.setdefault(job.hook_id, {
            "id": job.hook_id, "n": 0, "ok": 0, "reset": False, "fail_tail": 0,
            "tail_4xx": 0, "status": None, "error": None, "gone": False})
        stats["n"] += 1
        stats["status"], stats["error"] = job.outcome.status, job.outcome.error
        if kind == "ok":
            stats.update(ok=stats["ok"] + 1, reset=True, fail_tail=0, tail_4xx=0)
        else:
            stats["fail_tail"] += 1
            stats["tail_4xx"] = stats["tail_4xx"] + 1 if kind == "client" else 0
            stats["gone"] = stats["gone"] or kind == "gone"
        if kind == "retry" and job.attempts < len(schedule):
            delay = schedule[job.attempts] * random.uniform(1.0, 1.2)
            if job.outcome.retry_after:
                delay = max(delay, min(job.outcome.retry_after, 86400.0))
            retries.append({"e": job.event_id, "h": job.hook_id, "delay": delay,
                            "status": job.outcome.status, "error": job.outcome.error})
        else:
            if kind == "retry":
                log.warning("giving up on event %s for %s after %d attempts",
                            job.event_id, fingerprint(job.hook_id), job.attempts)
            finished.append({"e": job.event_id, "h": job.hook_id})

    attempts = [attempt_row(job.hook_id, job.event_id, job.topic, job.attempts, job.outcome)
                for job in jobs if job.outcome is not None]
    if attempts:
        log_attempts(attempts)
    if finished:
        session.execute(sa.text("""
            DELETE FROM webhooks_delivery d USING jsonb_to_recordset(CAST(:rows AS jsonb))
                AS v(e text, h text)
             WHERE d.event_id = v.e AND d.hook_id = v.h
        """), {"rows": json.dumps(finished)})
    if retries:
        session.execute(sa.text("""
            UPDATE webhooks_delivery d
               SET due = now() + make_interval(secs => v.delay),
                   last_status = v.status, last_error = v.error
              FROM jsonb_to_recordset(CAST(:rows AS jsonb))
                AS v(e text, h text, delay float8, status int, error text)
             WHERE d.event_id = v.e AND d.hook_id = v.h
        """), {"rows": json.dumps(retries)})
    doomed = []
    if per_hook:
        updated = session.execute(sa.text("""
            UPDATE webhooks w
               SET delivery_count = w.delivery_count + v.n,
                   success_count = w.success_count + v.ok,
                   last_delivery = now(), last_status = v.status, last_error = v.error,
                   consecutive_failures = CASE WHEN v.reset THEN v.fail_tail
                                               ELSE w.consecutive_failures + v.fail_tail END,
                   consecutive_4xx = CASE WHEN v.reset OR v.tail_4xx < v.fail_tail THEN v.tail_4xx
                                          ELSE w.consecutive_4xx + v.tail_4xx END,
                   failing_since = CASE WHEN v.fail_tail = 0 THEN NULL
                                        WHEN v.reset THEN now()
                                        ELSE coalesce(w.failing_since, now()) END
              FROM jsonb_to_recordset(CAST(:rows AS jsonb))
                AS v(id text, n int, ok int, reset bool, fail_tail int, tail_4xx int,
                     status int, error text, gone bool)
             WHERE w.id = v.id
            RETURNING w.id, w.consecutive_4xx, v.gone
        """), {"rows": json.dumps(list(per_hook.values()))}).all()
        limit = int(_cfg("max_consecutive_4xx", 5))
        for row in updated:
            if row.gone:
                doomed.append((row.id, "answered 410 Gone"))
            elif row.consecutive_4xx >= limit:
                doomed.append((row.id, f"answered 4xx {row.consecutive_4xx} times in a row"))
    for hook_id, reason in doomed:
        _delete_hook(hook_id, reason)
    session.commit()


def attempt_row(hook_id: str, event_id: str, topic: str, attempt: int,
                outcome: Outcome) -> dict:
    """One delivery log entry, as :func:`log_attempts` takes it."""
    body = outcome.body.decode("utf-8", "replace").replace("\x00", "\ufffd") \
        if outcome.body else None  # text PostgreSQL can store
    return {"h": hook_id, "e": event_id, "t": topic, "n": attempt, "s": outcome.status,
            "x": outcome.error, "d": int(outcome.duration * 1000), "r": body}


def log_attempts(rows: list[dict]) -> None:
    """Append attempts (see :func:`attempt_row`) to the delivery log, in the
    caller's transaction."""
    model.Session.execute(sa.text("""
        INSERT INTO webhooks_attempt (hook_id, event_id, topic, at, attempt, status, error,
                                      duration_ms, response)
        SELECT v.h, v.e, v.t, now(), v.n, v.s, v.x, v.d, v.r
          FROM jsonb_to_recordset(CAST(:rows AS jsonb))
            AS v(h text, e text, t text, n int, s int, x text, d int, r text)
         WHERE EXISTS (SELECT 1 FROM webhooks w WHERE w.id = v.h)
    """), {"rows": json.dumps(rows)})


def _delete_hook(hook_id: str, reason: str) -> None:
    row = model.Session.execute(sa.text(
        "DELETE FROM webhooks WHERE id = :id RETURNING topic, address"), {"id": hook_id}
    ).first()
    if row is not None:
        log.info("pruned webhook %s (%s, %s): %s", fingerprint(hook_id), row.topic,
                 _host(row.address), reason)


def _host(address: str) -> str:
    try:
        return guard.parse(address)[1]
    except guard.Refused:
        return "?"


# --- sweeping and pruning -----------------------------------------------------

def requeue(deliveries: Iterable[tuple[str, str]]) -> None:
    """Queue each (hook id, event id) delivery again, due now, and commit;
    PostgreSQL notifies the workers' listeners when the transaction commits."""
    for hook_id, event_id in deliveries:
        model.Session.execute(sa.text("""
            INSERT INTO webhooks_delivery (event_id, hook_id, attempts, due)
            VALUES (:event_id, :hook_id, 0, now())
            ON CONFLICT (event_id, hook_id) DO UPDATE SET due = now()
        """), {"event_id": event_id, "hook_id": hook_id})
    model.Session.execute(sa.text("SELECT pg_notify(:channel, '')"),
                          {"channel": NOTIFY_CHANNEL})
    model.Session.commit()


def due_count(cap: int = 100000) -> int:
    return model.Session.execute(sa.text(
        "SELECT count(*) FROM (SELECT 1 FROM webhooks_delivery WHERE due <= now() "
        "LIMIT :cap) t"), {"cap": cap}).scalar_one()


def prune() -> dict[str, int]:
    """Delete stale hooks and old fanned-out events; returns what was removed."""
    session = model.Session
    stale_days = float(_cfg("stale_after_days", 5))
    stale = session.execute(sa.text("""
        DELETE FROM webhooks
         WHERE failing_since < now() - make_interval(secs => :secs)
        RETURNING id, topic, address
    """), {"secs": stale_days * 86400}).all()
    for row in stale:
        log.info("pruned webhook %s (%s, %s): only failures for %g days",
                 fingerprint(row.id), row.topic, _host(row.address), stale_days)
    retention = float(_cfg("log_retention_days", 30))
    attempts = session.execute(sa.text("""
        DELETE FROM webhooks_attempt WHERE at < now() - make_interval(secs => :secs)
    """), {"secs": retention * 86400}).rowcount
    events = session.execute(sa.text("""
        DELETE FROM webhooks_event e
         WHERE fanned_out < now() - make_interval(secs => :secs)
           AND NOT EXISTS (SELECT 1 FROM webhooks_delivery d WHERE d.event_id = e.id)
    """), {"secs": retention * 86400}).rowcount
    session.commit()
    return {"stale_hooks": len(stale), "old_events": events, "old_attempts": attempts}

