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
OLD_STATE = "ckanext.webhooks.old_state"  # {id: {state, ...} before this transaction}
OLD_GROUPS = "ckanext.webhooks.old_groups"  # {package id: [group ids] before this transaction}
OLD_COLLABORATORS = "ckanext.webhooks.old_collaborators"  # {package id: [[user, capacity]]}

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
        # The dataset as it was before this transaction and as it is after it:
        # fan-out judges each reader's view of both, so that a change that
        # hides or shows the dataset reaches each reader as a delete or a create.
        purged = kind == "dataset" and operation == model.DomainObjectOperation.deleted
        new = kind == "dataset" and operation == model.DomainObjectOperation.new
        before = None if new else dict(old_states.get(package.id) or _visibility(package))
        groups_before = session.info.get(OLD_GROUPS, {}).get(package.id)
        if before is not None and groups_before is not None:
            before["groups"] = groups_before
        collaborators_before = session.info.get(OLD_COLLABORATORS, {}).get(package.id)
        if before is not None and collaborators_before is not None:
            before["collaborators"] = collaborators_before
        snapshot["_before"] = before
        snapshot["_after"] = {**_visibility(package), "state": "purged"} if purged \
            else _visibility(package)
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


def record_bulk_change(dataset_ids: list[str], org_id: Optional[str],
                       change: dict[str, Any]) -> None:
    """Events for an organization's bulk update written by one SQL ``UPDATE``
    that ``IDomainObjectModification`` never sees (CKAN 2.11's
    ``bulk_update_*``): call it before the update, in its transaction."""
    session = model.Session()
    rows = session.execute(sa.select(
        model.Package.id, model.Package.name, model.Package.state, model.Package.private,
        model.Package.owner_org).where(model.Package.id.in_(dataset_ids or []),
                                       model.Package.owner_org == org_id)).all()
    for row in rows:
        before = {"state": row.state, "private": bool(row.private),
                  "owner_org": row.owner_org, "name": row.name}
        after = {**before, **change}
        if after == before:
            continue
        change_kind = _transition(before["state"], after["state"],
                                  model.DomainObjectOperation.changed)
        if change_kind is None:
            continue
        _insert_in_savepoint(session, f"dataset/{change_kind}", row.id, row.id,
                             snapshot={"id": row.id, "name": row.name,
                                       "_before": before, "_after": after}, data=None)


def _visibility(package) -> dict[str, Any]:
    """What decides who may read a dataset, and its name (what a reader who
    loses sight of it is told)."""
    return {"state": package.state, "private": bool(package.private),
            "owner_org": package.owner_org, "name": package.name}


def _old_state(old_states, entity) -> Optional[str]:
    return (old_states.get(entity.id) or {}).get("state", entity.state)


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
    change = _transition(_old_state(old_states, package), package.state, operation)
    return f"dataset/{change}" if change else None


def _resource_topic(resource, operation, old_states, session) -> Optional[str]:
    package = resource.package
    if package is None or package in session.deleted or package.state != ACTIVE:
        # Drafts send nothing; a purged or deleted dataset's resources go with
        # its own dataset/delete event.
        return None
    change = _transition(_old_state(old_states, resource), resource.state, operation)
    if change == "create" and (old_states.get(package.id) or {}).get("state", ACTIVE) != ACTIVE:
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
    """Keep what each package/resource was when the transaction began (its
    state; a package's visibility and name; a package's groups when its
    memberships change)."""
    old_states = session.info.setdefault(OLD_STATE, {})
    for obj in session.dirty:
        if obj.__class__ is model.Package and obj.id not in old_states:
            old_states[obj.id] = {key: _value_before(obj, key)
                                  for key in ("state", "private", "owner_org", "name")}
            old_states[obj.id]["private"] = bool(old_states[obj.id]["private"])
        elif obj.__class__ is model.Resource and obj.id not in old_states:
            old_states[obj.id] = {"state": _value_before(obj, "state")}
    for obj in (*session.new, *session.dirty, *session.deleted):
        if obj.__class__ is model.Member and obj.table_name == "package" and obj.table_id:
            groups = session.info.setdefault(OLD_GROUPS, {})
            if obj.table_id not in groups:  # before this flush writes the change
                groups[obj.table_id] = package_groups(session.connection(), obj.table_id)
        elif obj.__class__ is model.PackageMember and obj.package_id:
            # package_delete removes the collaborators with the dataset: who
            # could read it just before is judged with them.
            collaborators = session.info.setdefault(OLD_COLLABORATORS, {})
            if obj.package_id not in collaborators:
                collaborators[obj.package_id] = [list(row) for row in session.connection(
                ).execute(sa.text("SELECT user_id, capacity FROM package_member "
                                  "WHERE package_id = :id"), {"id": obj.package_id})]


def package_groups(connection, package_id: str) -> list[str]:
    """The groups (organizations included) a dataset is an active member of."""
    return list(connection.execute(sa.text(
        "SELECT group_id FROM member WHERE table_name = 'package' AND table_id = :id "
        "AND state = 'active'"), {"id": package_id}).scalars())


def _value_before(obj, key: str) -> Any:
    history = sa.inspect(obj).attrs[key].history
    before = history.deleted or history.unchanged
    return before[0] if before else getattr(obj, key)


def _forget(session, *args) -> None:
    """CKAN deletes its _object_cache at the end of a transaction; so do we."""
    session.info.pop(SEEN, None)
    session.info.pop(OLD_STATE, None)
    session.info.pop(OLD_GROUPS, None)
    session.info.pop(OLD_COLLABORATORS, None)


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
