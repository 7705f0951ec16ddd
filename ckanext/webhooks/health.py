"""Is delivery working? What ``ckan webhooks health`` checks (and the
metrics report): workers alive by their heartbeats, one of them listening,
and no event or due delivery waiting longer than a bound."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from ckan import model

from . import settings


def state() -> dict[str, Any]:
    """Workers alive, the listener, and the oldest waits, in seconds."""
    alive_within = 3 * settings.heartbeat_seconds()
    row = model.Session.execute(sa.text("""
        SELECT (SELECT count(*) FROM webhooks_worker
                 WHERE beat > now() - make_interval(secs => :alive)) AS workers,
               (SELECT count(*) FROM webhooks_worker
                 WHERE listener AND beat > now() - make_interval(secs => :alive)) AS listeners,
               (SELECT extract(epoch FROM now() - max(beat)) FROM webhooks_worker)
                   AS last_beat_age,
               (SELECT extract(epoch FROM now() - min(created)) FROM webhooks_event
                 WHERE fanned_out IS NULL) AS oldest_event_age,
               (SELECT extract(epoch FROM now() - min(due)) FROM webhooks_delivery
                 WHERE due <= now()) AS oldest_due_age,
               (SELECT count(*) FROM webhooks_delivery WHERE due <= now()) AS due
    """), {"alive": alive_within}).mappings().one()
    model.Session.rollback()
    ages = ("last_beat_age", "oldest_event_age", "oldest_due_age")
    return {**{key: None if row[key] is None else float(row[key]) for key in ages},
            "workers": row["workers"], "listeners": row["listeners"], "due": row["due"],
            "alive_within": alive_within}


def problems(max_lag: float) -> list[str]:
    """Each reason delivery is not healthy, in one short phrase; [] when it is."""
    now = state()
    found = []
    if not now["workers"]:
        last = now["last_beat_age"]
        found.append("no worker alive (" + (f"last heartbeat {last:.0f} s ago" if last is not None
                                            else "none ever seen") + ")")
    elif not now["listeners"]:
        found.append("no worker listens for new events")
    if now["oldest_event_age"] is not None and now["oldest_event_age"] > max_lag:
        found.append(f"an event has waited {now['oldest_event_age']:.0f} s for its fan-out "
                     f"(bound {max_lag:g} s)")
    if now["oldest_due_age"] is not None and now["oldest_due_age"] > max_lag:
        found.append(f"a due delivery has waited {now['oldest_due_age']:.0f} s "
                     f"({now['due']} due; bound {max_lag:g} s)")
    return found
