"""Fan-out: from a committed event to one queued delivery per hook, each for
its own reader.

For every event, the hooks that may hear it are grouped by audience (their
reader: anonymous, or the user each is bound to; see :mod:`audience`). For
each audience, CKAN's own authorization decides whether the reader could see
the dataset before the change and can see it after (the states captured with
the event), and the entity is rendered once, with ``package_show`` /
``resource_show`` in that reader's context: every hook of the audience shares
that rendering (``webhooks_rendering``). Then one ``INSERT ... SELECT`` queues
the deliveries, per hook:

* seen before and after: the event as it is (``dataset/update``);
* seen before, not after (made private, deleted, purged, moved to another
  organization, moved out of the hook's filter): a ``dataset/delete`` with
  only ``id`` and ``name`` and a ``reason``;
* seen after, not before: a ``dataset/create`` with the reader's rendering.

The same statement stores the renderings and, for the worker process that
fans out, claims the first batch of deliveries (:class:`FirstClaim`), which
that process sends right after the commit.

Fail closed: if rendering raises for a reader, that audience gets nothing now;
it is tried again on the retry schedule, then given up and logged. Each event
fans out in a savepoint of its own, so a failing event delays no other; one
that keeps failing is set aside after ``MAX_FANOUT_ATTEMPTS``.
"""
from __future__ import annotations

import json
import logging
import random
import time
from typing import Optional

import sqlalchemy as sa

from ckan import model

from . import audience, prepare, settings, topics
from .capture import package_groups
from .delivery_queue import CLAIMED_COLUMNS, FirstClaim, jobs_from_rows
from .ids import fingerprint
from .model import NOTIFY_CHANNEL, WebhookEvent, utcnow

log = logging.getLogger(__name__)

FANOUT_EVENTS = 100  # events a fan-out task takes at a time
MAX_FANOUT_ATTEMPTS = 5
# Renderings due again are looked for at most this often per process, not
# on every fan-out (their retries are seconds apart; the sweep asks too).
RENDERING_LOOK_SECONDS = 1.0
_renderings_looked_at = -RENDERING_LOOK_SECONDS
# Whatever the dataset event, a reader may get any of the three: an update,
# or a create/delete when the dataset entered or left their view.
DATASET_PATTERNS = [topics.DATASET_CREATE, topics.DATASET_UPDATE, topics.DATASET_DELETE,
                    "dataset/*", topics.WILDCARD]
ACTIVE = "active"


def fan_out(limit: int = FANOUT_EVENTS, commit: bool = True,
            claim: Optional[FirstClaim] = None) -> tuple[int, int]:
    """Fan out committed events no worker has taken yet, then renderings whose
    retry is due. Returns (events fanned out, deliveries queued).

    ``claim``: the first deliveries the caller sends, claimed by the
    statements that queue them. ``commit=False`` leaves the transaction open
    for the caller to commit before it sends them: one durable commit on the
    way from event to receipt instead of two."""
    session = model.Session
    # Taken and marked fanned out in one statement; an event whose fan-out
    # fails is marked back below (its savepoint undid only its deliveries).
    events = sorted(session.scalars(
        sa.select(WebhookEvent).from_statement(sa.text("""
            UPDATE webhooks_event SET fanned_out = :now
             WHERE id IN (SELECT id FROM webhooks_event WHERE fanned_out IS NULL
                           ORDER BY created LIMIT :limit FOR UPDATE SKIP LOCKED)
            RETURNING *
        """)).execution_options(populate_existing=True),
        {"now": utcnow(), "limit": limit}).all(), key=lambda event: event.created)
    queued = 0
    for event in events:
        try:
            with session.begin_nested():
                queued += _fan_out_event(event, claim=claim)
            prepare.keep_event(event)  # its deliveries are prepared right after
        except Exception:  # noqa: BLE001 - this event only; the others go on
            prepare.forget(event.id)
            if claim is not None:
                claim.forget(event.id)
            event.fanout_attempts += 1
            log.exception("fan-out of event %s failed (attempt %d)", event.id,
                          event.fanout_attempts)
            if event.fanout_attempts >= MAX_FANOUT_ATTEMPTS:
                log.error("event %s set aside after %d failed fan-outs", event.id,
                          event.fanout_attempts)
                event.set_aside = event.fanned_out = utcnow()
            else:
                event.fanned_out = None
    global _renderings_looked_at
    if time.monotonic() >= _renderings_looked_at + RENDERING_LOOK_SECONDS:
        _renderings_looked_at = time.monotonic()
        queued += _retry_renderings(limit)
    if commit:
        session.commit()
    return len(events), queued


def pending_events(min_age: float) -> bool:
    """Are there committed events older than ``min_age`` seconds not fanned out,
    or renderings due again?"""
    return bool(model.Session.execute(sa.text("""
        SELECT 1 FROM webhooks_event
         WHERE fanned_out IS NULL AND created <= now() - make_interval(secs => :age)
        UNION ALL
        SELECT 1 FROM webhooks_rendering WHERE due <= now()
        LIMIT 1
    """), {"age": min_age}).first())


def recover(hook_id: str, since, until) -> int:
    """Queue again for one hook every event of the window it would hear now:
    its topics, its filters and its reader's view as judged now, each with
    its original id, due in the order the events happened. A rendering made
    at fan-out for the hook's reader is reused; if its reader had none (no
    hook of theirs heard it then), the entity is rendered as they see it now.
    Events a delivery of which is still pending for the hook are left to it.
    Returns the deliveries queued."""
    session = model.Session
    events = session.scalars(
        sa.select(WebhookEvent).where(
            WebhookEvent.created >= since, WebhookEvent.created <= until,
            WebhookEvent.fanned_out.isnot(None), WebhookEvent.set_aside.is_(None))
        .order_by(WebhookEvent.created, WebhookEvent.id)).all()
    queued = 0
    for order, event in enumerate(events):
        with session.begin_nested():
            queued += _fan_out_event(event, hook_id=hook_id, delay=order * 0.001)
    session.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
    session.commit()
    return queued


# --- one event ----------------------------------------------------------------

def _fan_out_event(event: WebhookEvent, only: Optional[str] = None,
                   hook_id: Optional[str] = None, delay: float = 0.0,
                   claim: Optional[FirstClaim] = None) -> int:
    """Queue the deliveries of one event (of one audience only, on a retry;
    to one hook only, due ``delay`` seconds from now, on a recovery), and
    claim as many of them as ``claim`` has room for."""
    kind = topics.object_type(event.topic) if event.topic in topics.TOPICS else None
    if kind is None:
        return _fan_out_plugin_event(event, hook_id, delay)
    snapshot = event.snapshot or {}
    before, after = snapshot.get("_before"), snapshot.get("_after") or {}
    where = {"patterns": topics.patterns_for(event.topic) if kind == "resource"
             else DATASET_PATTERNS, "pkg": event.package_id,
             "org_before": (before or {}).get("owner_org"), "org_after": after.get("owner_org"),
             "groups_before": (before or {}).get("groups"), "only": only,
             "hook": hook_id, "event_created": event.created}
    rows = model.Session.execute(sa.text(_AUDIENCES), where).all()
    first = rows[0]
    now = {"state": first.state, "private": first.private, "owner_org": first.owner_org} \
        if first.found else None
    where["groups_after"] = list(first.groups)
    if where["groups_before"] is None:
        where["groups_before"] = where["groups_after"]
    audiences = [row for row in rows if row.audience is not None]
    names = audience.reader_names(a.audience for a in audiences)
    # A resource deleted since has nothing to render (its resource/delete follows).
    gone = kind == "resource" and not _resource_active(event.object_id)
    decisions = []
    for row in audiences:
        decision = _decide(event, kind, row.audience, names[row.audience], row.topics,
                           before, after, now, reuse=hook_id is not None, gone=gone)
        if decision is not None:
            decisions.append(decision)
    if not decisions:
        return 0
    # Each hook's reader gets at most one delivery of the event: the topic the
    # change is for them (an update, or a create/delete when it entered or
    # left their view), if the hook subscribes to that topic.
    rows = model.Session.execute(sa.text(f"""
        WITH dec AS (SELECT * FROM jsonb_to_recordset(CAST(:decisions AS jsonb))
                       AS dec(audience text, vb bool, va bool, data jsonb)),
             -- Each audience's rendering, which all its hooks' deliveries send.
             r AS (INSERT INTO webhooks_rendering (event_id, audience, data, attempts, due,
                                                   error)
                   SELECT :event_id, audience, data, 0, NULL, NULL FROM dec
                    WHERE data IS NOT NULL
                   ON CONFLICT (event_id, audience) DO UPDATE
                      SET data = EXCLUDED.data, due = NULL, error = NULL),
             x AS (SELECT h.id, h.topics, h.host, h.audience, dec.vb, dec.va,
                          dec.vb AND h.mb AS ib, dec.va AND h.ma AS ia
                     FROM ({_HOOKS}) h JOIN dec ON dec.audience = h.audience),
             t AS (SELECT x.*, CASE
                     WHEN :kind = 'resource' THEN
                          CASE WHEN (CASE WHEN :event_topic = 'resource/delete' THEN ib
                                          ELSE ia END) THEN :event_topic END
                     WHEN ib AND ia THEN
                          CASE WHEN :event_topic = 'dataset/update' THEN 'dataset/update' END
                     WHEN ib THEN 'dataset/delete'
                     WHEN ia THEN 'dataset/create' END AS delivered
                     FROM x),
             q AS (SELECT t.*, (host = ANY(CAST(:skip AS text[]))) IS NOT TRUE AS claimable
                     FROM t
                    WHERE delivered IS NOT NULL
                      AND topics && ARRAY[delivered, split_part(delivered, '/', 1) || '/*', '*']),
             c AS (SELECT q.*, claimable AND row_number() OVER (ORDER BY claimable DESC)
                                             <= :claim_room AS claimed
                     FROM q),
             inserted AS (
        INSERT INTO webhooks_delivery (event_id, hook_id, attempts, due, audience, topic,
                                       reason, claim_token)
        SELECT :event_id, id, CASE WHEN claimed THEN 1 ELSE 0 END,
               now() + make_interval(secs => CASE WHEN claimed THEN :lease ELSE :delay END),
               audience, delivered,
               CASE WHEN delivered = 'dataset/delete' THEN
                      CASE WHEN :after_state = 'deleted' THEN 'deleted'
                           WHEN :after_state = 'purged' THEN 'purged'
                           WHEN va THEN 'filtered_out' ELSE 'hidden' END
                    WHEN delivered = 'dataset/create' THEN
                      CASE WHEN :before_state = 'deleted' THEN 'restored'
                           WHEN :before_state IS DISTINCT FROM 'active' THEN 'created'
                           WHEN vb THEN 'filtered_in' ELSE 'visible' END END,
               CASE WHEN claimed THEN CAST(:token AS text) END
          FROM c
        ON CONFLICT DO NOTHING
        RETURNING *)
        SELECT {CLAIMED_COLUMNS}, (SELECT count(*) FROM inserted) AS queued
          FROM (SELECT 1) one
          LEFT JOIN (inserted d JOIN webhooks w
                     ON w.id = d.hook_id AND d.claim_token IS NOT NULL) ON true
    """), {**where, "decisions": json.dumps(decisions, default=str), "event_id": event.id,
           "kind": kind, "event_topic": event.topic, "delay": delay,
           "after_state": after.get("state"),
           "before_state": (before or {}).get("state"),
           "skip": claim.skip_hosts if claim else [],
           "claim_room": claim.room() if claim else 0,
           "token": claim.token if claim else None,
           "lease": claim.lease if claim else 0.0}).all()
    if claim is not None:
        claim.jobs += jobs_from_rows([row for row in rows if row.event_id is not None],
                                     claim.token)
    return rows[0].queued


# The hooks that may hear an event: created before it happened (a hook made
# while the event waited for its fan-out was not there when it happened),
# active, a topic that may match, reader still active, and the hook's filters
# match the dataset as it was before or as it is after.
_FILTER = """((w.dataset_id IS NULL OR w.dataset_id = :pkg)
      AND (w.organization_id IS NULL OR w.organization_id = CAST(:org_{when} AS text))
      AND (w.group_id IS NULL OR w.group_id = ANY({groups})))"""


def _hooks_sql(groups_before: str, groups_after: str) -> str:
    """The hooks that may hear an event, with the dataset's groups before and
    after the change given by these SQL expressions."""
    before = _FILTER.format(when="before", groups=groups_before)
    after = _FILTER.format(when="after", groups=groups_after)
    return f"""
    SELECT w.id, w.topics, w.host, {audience.AUDIENCE_SQL} AS audience,
           {before} AS mb, {after} AS ma
      FROM webhooks w
     WHERE w.topics && CAST(:patterns AS text[]) AND w.created <= :event_created
       AND (w.active OR w.id = CAST(:hook AS text)) AND {audience.READER_ACTIVE_SQL}
       AND ({before} OR {after})
       AND (CAST(:only AS text) IS NULL OR {audience.AUDIENCE_SQL} = :only)
       AND (CAST(:hook AS text) IS NULL OR w.id = :hook)"""


# The groups as parameters; or read with the hooks: the groups after the
# change are those of the dataset now (``now``, see :data:`_AUDIENCES`).
_HOOKS = _hooks_sql("CAST(:groups_before AS text[])", "CAST(:groups_after AS text[])")
_GROUPS_NOW = "CAST((SELECT groups FROM now) AS text[])"
# The dataset as it is now (its visibility, None when purged, and its
# groups), and each audience of the hooks that may hear the event with the
# topics they subscribe to: one round trip.
_AUDIENCES = f"""
    WITH now AS (
        SELECT p.id IS NOT NULL AS found, p.state, p.private, p.owner_org,
               ARRAY(SELECT m.group_id FROM member m
                      WHERE m.table_name = 'package' AND m.table_id = :pkg
                        AND m.state = 'active') AS groups
          FROM (SELECT 1) one LEFT JOIN package p ON p.id = :pkg)
    SELECT now.found, now.state, now.private, now.owner_org, now.groups, a.audience, a.topics
      FROM now LEFT JOIN (
           SELECT audience, array_agg(DISTINCT t) AS topics
             FROM ({_hooks_sql(f"coalesce(CAST(:groups_before AS text[]), {_GROUPS_NOW})",
                               _GROUPS_NOW)}) h, unnest(h.topics) t
            GROUP BY audience) a ON true"""


def _decide(event, kind: str, key: str, reader: Optional[str], hook_topics: list[str],
            before: Optional[dict], after: dict, now: Optional[dict],
            reuse: bool = False, gone: bool = False) -> Optional[dict]:
    """Could ``reader`` see the entity before (vb) and after (va) the change?
    Renders it for them when a hook of theirs needs the body (``data``, stored
    with the deliveries). None: nothing for this audience now (withheld, or
    rendering failed and will be retried).

    ``before``/``after``: the dataset's visibility captured with the event;
    ``now``: as it is in the database (None: purged). Each distinct state is
    judged once per reader, by CKAN's own authorization.
    """
    if reader is None:
        return None
    package_id = event.package_id
    if kind == "dataset":
        action, object_id = "package_show", package_id
        judge_before = judge_after = True
        needs_body = any(topics.matches(pattern, topic) for pattern in hook_topics
                         for topic in (topics.DATASET_CREATE, topics.DATASET_UPDATE))
    else:
        action, object_id = "resource_show", event.object_id
        judge_before = event.topic == topics.RESOURCE_DELETE
        judge_after = needs_body = not judge_before
    judged: dict = {}

    def visible(state: Optional[dict]) -> bool:
        if state is None or state.get("state") != ACTIVE:
            return False
        seen = _visibility_key(state)
        if seen not in judged:
            as_of = None if now is not None and seen == _visibility_key(now) else state
            judged[seen] = audience.may_read(reader, action, object_id, package_id,
                                             state=as_of)
            if as_of is None:  # as it is now: what the delivery checks again
                audience.remember(event.id, key, action, object_id, judged[seen])
        return judged[seen]

    vb = judge_before and visible(before)
    va = judge_after and visible(after)
    if va and needs_body:
        # The change as captured is visible to the reader; is it still, now
        # that it is rendered? If not, a later event tells them (never widen).
        if gone or not visible(now):
            return None
        if reuse and _has_rendering(event.id, key):  # a recovery: what they were sent
            return {"audience": key, "vb": bool(vb), "va": bool(va)}
        try:
            with model.Session.begin_nested():
                data = audience.render(action, object_id, reader)
        except audience.RenderingFailed as failure:
            _rendering_failed(event, key, str(failure))
            return None
        prepare.keep_rendering(event.id, key, data)
        return {"audience": key, "vb": bool(vb), "va": bool(va), "data": data}
    return {"audience": key, "vb": bool(vb), "va": bool(va)}


def _resource_active(resource_id: str) -> bool:
    return model.Session.execute(sa.text(
        "SELECT state = 'active' FROM resource WHERE id = :id"), {"id": resource_id}
    ).scalar() is True


def _has_rendering(event_id: str, key: str) -> bool:
    return model.Session.execute(sa.text(
        "SELECT 1 FROM webhooks_rendering WHERE event_id = :e AND audience = :a "
        "AND data IS NOT NULL"), {"e": event_id, "a": key}).first() is not None


def _visibility_key(state: dict) -> tuple:
    return (state.get("state"), bool(state.get("private")), state.get("owner_org"))


def _fan_out_plugin_event(event: WebhookEvent, hook_id: Optional[str] = None,
                          delay: float = 0.0) -> int:
    """A plugin's own topic: its data, to every hook of the topic (the plugin
    vetoes what must not be heard; a dataset's visibility is checked at delivery)."""
    known = (event.snapshot or {}).get("_after") or {}
    return model.Session.execute(sa.text(f"""
        INSERT INTO webhooks_delivery (event_id, hook_id, attempts, due, audience, topic)
        SELECT :event_id, w.id, 0, now() + make_interval(secs => :delay),
               {audience.AUDIENCE_SQL}, :topic FROM webhooks w
         WHERE w.topics && CAST(:patterns AS text[]) AND w.created <= :event_created
           AND (w.active OR w.id = CAST(:hook AS text)) AND {audience.READER_ACTIVE_SQL}
           AND (CAST(:hook AS text) IS NULL OR w.id = :hook)
           AND (w.dataset_id IS NULL OR w.dataset_id = :package_id)
           AND (w.organization_id IS NULL OR w.organization_id = :owner_org)
           AND (w.group_id IS NULL OR w.group_id = ANY(CAST(:groups AS text[])))
        ON CONFLICT DO NOTHING
    """), {"event_id": event.id, "topic": event.topic, "hook": hook_id, "delay": delay,
           "event_created": event.created,
           "patterns": topics.patterns_for(event.topic), "package_id": event.package_id,
           "owner_org": known.get("owner_org"), "groups": _groups(event.package_id)}
    ).rowcount


def _groups(package_id: Optional[str]) -> list[str]:
    if not package_id:
        return []
    return package_groups(model.Session, package_id)


# --- renderings ---------------------------------------------------------------

def _rendering_failed(event, key: str, error: str) -> None:
    """Note the failure; the audience is tried again on the retry schedule."""
    row = model.Session.execute(sa.text("""
        INSERT INTO webhooks_rendering (event_id, audience, attempts, error)
        VALUES (:e, :a, 1, :error)
        ON CONFLICT (event_id, audience) DO UPDATE
           SET attempts = webhooks_rendering.attempts + 1, error = :error
        RETURNING attempts
    """), {"e": event.id, "a": key, "error": error}).one()
    schedule = settings.retry_schedule()
    if row.attempts < len(schedule):
        delay = schedule[row.attempts] * random.uniform(1.0, 1.2)
        model.Session.execute(sa.text("""
            UPDATE webhooks_rendering SET due = now() + make_interval(secs => :delay)
             WHERE event_id = :e AND audience = :a
        """), {"e": event.id, "a": key, "delay": max(delay, 1.0)})
        log.warning("event %s could not be rendered for a reader (attempt %d, %s); "
                    "their hooks wait", event.id, row.attempts, error)
        return
    model.Session.execute(sa.text("""
        UPDATE webhooks_rendering SET due = NULL WHERE event_id = :e AND audience = :a
    """), {"e": event.id, "a": key})
    log.error("gave up rendering event %s for a reader after %d attempts (%s); "
              "hooks that get nothing: %s", event.id, row.attempts, error,
              ", ".join(_fingerprints(event, key)) or "none")


def _fingerprints(event, key: str) -> list[str]:
    rows = model.Session.execute(sa.text(f"""
        SELECT w.id FROM webhooks w WHERE {audience.AUDIENCE_SQL} = :a
           AND (w.dataset_id IS NULL OR w.dataset_id = :pkg) LIMIT 50
    """), {"a": key, "pkg": event.package_id}).scalars()
    return [fingerprint(hook_id) for hook_id in rows]


def _retry_renderings(limit: int) -> int:
    """Fan out again, for its audience only, each event whose rendering failed
    and is due to be tried again."""
    session = model.Session
    due = session.execute(sa.text("""
        SELECT event_id, audience FROM webhooks_rendering
         WHERE due <= now() ORDER BY due LIMIT :limit FOR UPDATE SKIP LOCKED
    """), {"limit": limit}).all()
    queued = 0
    for row in due:
        session.execute(sa.text("""
            UPDATE webhooks_rendering SET due = NULL
             WHERE event_id = :e AND audience = :a
        """), {"e": row.event_id, "a": row.audience})
        event = session.get(WebhookEvent, row.event_id)
        try:
            with session.begin_nested():
                queued += _fan_out_event(event, only=row.audience)
        except Exception:  # noqa: BLE001 - counted as a failed rendering
            log.exception("fan-out retry of event %s failed", row.event_id)
            _rendering_failed(event, row.audience, "fan-out failed")
    return queued

