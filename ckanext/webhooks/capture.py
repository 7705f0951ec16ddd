"""Event capture: CKAN's domain object notifications become outbox rows.

``IDomainObjectModification.notify`` runs in ``before_commit``, inside the
writer's transaction. Each event is written there to ``webhooks_event`` (the
outbox), in a SAVEPOINT so that a webhooks failure can never abort the user's
save. A trigger on that table makes PostgreSQL notify the workers when, and
only when, the transaction commits; the web process never talks to the
broker. A rolled back change leaves no event, and a committed one always has
its row, whatever the broker's state: the workers' sweep picks up anything a
notification missed.

CKAN reports a package ``new`` and also ``changed`` in one commit, reports a
resource's package as ``changed``, and announces soft deletes as ``changed``
with ``state='deleted'``. The state an entity had before the transaction is
remembered here (CKAN deletes its own ``_object_cache`` on commit) so that each
topic fires once per entity per commit and deletes, drafts and restores map to
the right topic.
"""
from __future__ import annotations

import datetime as dt
import decimal
import json
import logging
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy import orm

from ckan import model

from . import ids
from .model import utcnow

log = logging.getLogger(__name__)

# Keys of Session.info, our own per-transaction state.
SEEN = "ckanext.webhooks.seen"            # {(kind, id)}: entities already decided
OLD_STATE = "ckanext.webhooks.old_state"  # {id: state before this transaction}

ACTIVE, DELETED, DRAFT = "active", "deleted", "draft"


def record(entity: Any, operation: Any) -> None:
    """Record the event ``entity``/``operation`` maps to, if any.

    Never raises: webhooks must not break a CKAN write.
    """
    try:
        _record(entity, operation)
    except Exception:  # noqa: BLE001 - the user's save matters more
        log.exception("ckanext-webhooks could not capture an event; the change "
                      "itself is saved")


def _record(entity: Any, operation: Any) -> None:
    if isinstance(entity, model.Package):
        kind = "dataset"
    elif isinstance(entity, model.Resource):
        kind = "resource"
    else:
        return
    session = orm.object_session(entity)
    if session is None:
        return
    seen = session.info.setdefault(SEEN, set())
    key = (kind, entity.id)
    if key in seen:  # 'new' comes before 'changed': the first decision stands
        return
    seen.add(key)

    old_states = session.info.get(OLD_STATE, {})
    if kind == "dataset":
        package = entity
        topic = _dataset_topic(entity, operation, old_states)
    else:
        package = entity.package
        topic = _resource_topic(entity, operation, old_states, session)
    if topic is None:
        return

    snapshot = _columns(entity)
    if package is not None:
        snapshot["_package"] = {"private": bool(package.private),
                                "owner_org": package.owner_org,
                                "state": old_states.get(package.id, package.state)}
    _insert_in_savepoint(session, topic, entity.id,
                         entity.id if kind == "dataset" else entity.package_id,
                         snapshot=snapshot, data=None)


_INSERT = (
    "SAVEPOINT ckanext_webhooks_outbox; "
    "INSERT INTO webhooks_event (id, topic, object_id, package_id, created, snapshot, data) "
    "VALUES (%(id)s, %(topic)s, %(object_id)s, %(package_id)s, %(created)s, "
    "CAST(%(snapshot)s AS jsonb), CAST(%(data)s AS jsonb)); "
    "RELEASE SAVEPOINT ckanext_webhooks_outbox")


def emit_event(topic: str, object_id: str, data: dict, package_id: Optional[str]) -> str:
    """An event of a plugin's own topic, in the current transaction."""
    return _insert_in_savepoint(model.Session(), topic, object_id, package_id,
                                snapshot=None, data=data)


def _insert_in_savepoint(session, topic: str, object_id: str, package_id: Optional[str],
                         snapshot: Optional[dict], data: Optional[dict]) -> str:
    """Write an event inside a SAVEPOINT, in one round trip; returns its id.

    If the insert fails (say the migration was not run), the savepoint is
    rolled back and the user's transaction goes on without the event. It is
    taken on the DB-API cursor, not the Session: a Session savepoint would fire
    before_commit, and with it CKAN's notifications, once more.
    """
    row = {"id": ids.new_event_id(), "topic": topic, "object_id": object_id,
           "package_id": package_id, "created": utcnow(),
           "snapshot": None if snapshot is None else json.dumps(snapshot),
           "data": None if data is None else json.dumps(data, default=str)}
    connection = session.connection()
    try:
        connection.exec_driver_sql(_INSERT, row)
    except Exception:
        connection.exec_driver_sql("ROLLBACK TO SAVEPOINT ckanext_webhooks_outbox")
        raise
    return row["id"]


def _transition(old: Optional[str], new: Optional[str], operation: str
                ) -> Optional[str]:
    """'create', 'update', 'delete' or None for an entity's state change."""
    if operation == model.DomainObjectOperation.new:
        return "create" if new == ACTIVE else None
    if operation == model.DomainObjectOperation.deleted:  # purge
        return "delete" if old != DELETED and old != DRAFT else None
    if new == DELETED:
        return "delete" if old != DELETED else None
    if new == ACTIVE:
        return "update" if old == ACTIVE else "create"  # draft/deleted -> active
    return None  # drafts and unknown states are not announced


def _dataset_topic(package, operation, old_states) -> Optional[str]:
    change = _transition(old_states.get(package.id, package.state),
                         package.state, operation)
    return f"dataset/{change}" if change else None


def _resource_topic(resource, operation, old_states, session) -> Optional[str]:
    package = resource.package
    if package is None or package in session.deleted or package.state != ACTIVE:
        # Drafts send nothing; a purged or deleted dataset's resources go with
        # its own dataset/delete event.
        return None
    change = _transition(old_states.get(resource.id, resource.state),
                         resource.state, operation)
    if change == "create" and old_states.get(package.id, ACTIVE) != ACTIVE:
        return None  # a draft dataset becoming active: its dataset/create covers it
    return f"resource/{change}" if change else None


def _columns(entity: Any) -> dict[str, Any]:
    """The entity's own columns, JSON-safe: what is known of it without a query."""
    out = {}
    for column in entity.__table__.columns:
        value = getattr(entity, column.key, None)
        if isinstance(value, (dt.datetime, dt.date)):
            value = value.isoformat()
        elif isinstance(value, decimal.Decimal):
            value = float(value)
        out[column.key] = value
    return out


# --- SQLAlchemy listeners --------------------------------------------------

def _remember_old_states(session, flush_context, instances) -> None:
    """Keep the state each package/resource had when the transaction began."""
    old_states = session.info.setdefault(OLD_STATE, {})
    for obj in session.dirty:
        if isinstance(obj, (model.Package, model.Resource)) and obj.id not in old_states:
            history = sa.inspect(obj).attrs.state.history
            before = history.deleted or history.unchanged
            if before:
                old_states[obj.id] = before[0]


def _forget(session, *args) -> None:
    """CKAN deletes its _object_cache at the end of a transaction; so do we."""
    session.info.pop(SEEN, None)
    session.info.pop(OLD_STATE, None)


_installed = False


def install_listeners() -> None:
    """Register the session listeners once per process."""
    global _installed
    if _installed:
        return
    sa_event.listen(orm.Session, "before_flush", _remember_old_states)
    sa_event.listen(orm.Session, "after_commit", _forget)
    sa_event.listen(orm.Session, "after_rollback", _forget)
    _installed = True
