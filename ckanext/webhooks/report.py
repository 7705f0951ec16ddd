"""What site admins look at: hooks filtered and sorted, totals, hourly
activity from the delivery log, and the failed deliveries worth replaying.
Shared by the sysadmin actions (the dashboard) and the ``ckan webhooks`` CLI."""
from __future__ import annotations

import datetime as dt
from typing import Any, Optional

import sqlalchemy as sa

from ckan import model

from .model import Webhook

STATES = ("healthy", "failing", "paused")
_SUCCESS_RATE = sa.case((Webhook.delivery_count > 0,
                         sa.cast(Webhook.success_count, sa.Float) / Webhook.delivery_count),
                        else_=None)
SORTS = {
    "created": Webhook.created,
    "topic": Webhook.topics,
    "host": Webhook.host,
    "deliveries": Webhook.delivery_count,
    "success_rate": _SUCCESS_RATE,
    "last_delivery": Webhook.last_delivery,
    "last_status": Webhook.last_status,
    "consecutive_failures": Webhook.consecutive_failures,
}


def hooks(topic: Optional[str] = None, host: Optional[str] = None,
          state: Optional[str] = None, sort: str = "created",
          descending: bool = False) -> sa.orm.Query:
    """Hooks matching the filters, in a stable order (ties broken by id)."""
    query = model.Session.query(Webhook)
    if topic:
        query = query.filter(Webhook.topics.any(topic))
    if host:
        query = query.filter(Webhook.host == host.lower())
    if state == "healthy":
        query = query.filter(Webhook.active, Webhook.failing_since.is_(None))
    elif state == "failing":
        query = query.filter(Webhook.active, Webhook.failing_since.isnot(None))
    elif state == "paused":
        query = query.filter(sa.not_(Webhook.active))
    column = SORTS[sort]
    order = column.desc().nulls_last() if descending else column.asc().nulls_first()
    return query.order_by(order, Webhook.id)


def totals() -> dict[str, Any]:
    """Hooks, their health, the queue and the last day's attempts, in numbers."""
    row = model.Session.execute(sa.text("""
        SELECT (SELECT count(*) FROM webhooks) AS hooks,
               (SELECT count(*) FROM webhooks WHERE active AND failing_since IS NOT NULL)
                   AS failing,
               (SELECT count(*) FROM webhooks WHERE NOT active) AS paused,
               (SELECT count(*) FROM webhooks_delivery) AS pending,
               (SELECT count(*) FROM webhooks_event WHERE fanned_out IS NULL) AS events_waiting,
               (SELECT count(*) FROM webhooks_event WHERE set_aside IS NOT NULL)
                   AS events_set_aside,
               (SELECT count(*) FROM webhooks_rendering WHERE data IS NULL)
                   AS renderings_failing,
               (SELECT count(*) FROM webhooks_attempt WHERE at > now() - interval '1 day')
                   AS attempts_24h,
               (SELECT count(*) FROM webhooks_attempt WHERE at > now() - interval '1 day'
                   AND status BETWEEN 200 AND 299) AS successes_24h
    """)).mappings().one()
    by_topic = dict(model.Session.execute(sa.text(
        "SELECT t, count(*) FROM webhooks, unnest(topics) t GROUP BY t ORDER BY t")).all())
    out = dict(row, by_topic=by_topic)
    out["success_rate_24h"] = round(row["successes_24h"] / row["attempts_24h"], 4) \
        if row["attempts_24h"] else None
    return out


def hourly_activity(days: int = 7) -> list[dict[str, Any]]:
    """Attempts and successes per hour over the last ``days`` days, oldest
    first, every hour present (zeros included); pings are not deliveries."""
    rows = model.Session.execute(sa.text("""
        WITH hours AS (
            SELECT generate_series(date_trunc('hour', now(), 'UTC')
                                       - make_interval(hours => :hours - 1),
                                   date_trunc('hour', now(), 'UTC'),
                                   interval '1 hour') AS hour)
        SELECT hours.hour, count(a.id) AS attempts,
               count(a.id) FILTER (WHERE a.status BETWEEN 200 AND 299) AS successes
          FROM hours
          LEFT JOIN webhooks_attempt a
            ON a.at >= hours.hour AND a.at < hours.hour + interval '1 hour'
           AND a.topic <> 'ping'
         GROUP BY hours.hour ORDER BY hours.hour
    """), {"hours": days * 24}).all()
    return [{"hour": hour.astimezone(dt.timezone.utc).isoformat(),
             "attempts": attempts, "successes": successes}
            for hour, attempts, successes in rows]


def failed_deliveries(since: dt.datetime, hook_id: Optional[str] = None
                      ) -> list[tuple[str, str]]:
    """(hook id, event id) of every delivery that failed since a time (UTC
    unless it says otherwise) and has not succeeded since, whose event is
    still stored."""
    if since.tzinfo is None:
        since = since.replace(tzinfo=dt.timezone.utc)
    return [tuple(row) for row in model.Session.execute(sa.text("""
        SELECT DISTINCT a.hook_id, a.event_id FROM webhooks_attempt a
          JOIN webhooks_event e ON e.id = a.event_id
          JOIN webhooks h ON h.id = a.hook_id
         WHERE a.at >= :since AND a.topic <> 'ping'
           AND (CAST(:hook_id AS text) IS NULL OR a.hook_id = :hook_id)
           AND (a.status IS NULL OR a.status NOT BETWEEN 200 AND 299)
           AND NOT EXISTS (SELECT 1 FROM webhooks_attempt ok
                            WHERE ok.hook_id = a.hook_id AND ok.event_id = a.event_id
                              AND ok.status BETWEEN 200 AND 299)
    """), {"since": since, "hook_id": hook_id}).all()]
