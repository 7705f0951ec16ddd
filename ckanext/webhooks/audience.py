"""Audiences: whose view of the portal a hook gets.

A hook's reader is anonymous, or the user it was bound to on purpose (an API
token, or the extension's own CSRF-checked form). A hook bound through an API
token hears as anonymous once that token is revoked, and hears nothing once
its user is no longer active. An audience key is ``''`` for anonymous, else
the user's id; every hook of one audience shares one rendering per event.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import time
from typing import Any, Iterator, Optional

import sqlalchemy as sa
from sqlalchemy import orm

from ckan import model
from ckan.plugins import toolkit

log = logging.getLogger(__name__)

# The audience key of a hook row ``w``, in SQL.
AUDIENCE_SQL = """(CASE WHEN w.user_id IS NULL THEN ''
      WHEN w.token_id IS NOT NULL
       AND NOT EXISTS (SELECT 1 FROM api_token t WHERE t.id = w.token_id) THEN ''
      ELSE w.user_id END)"""
# Hooks whose reader still exists: a deleted or blocked user's hooks hear nothing.
READER_ACTIVE_SQL = """(w.user_id IS NULL OR EXISTS (
      SELECT 1 FROM "user" u WHERE u.id = w.user_id AND u.state = 'active'))"""
ANONYMOUS = ""


class RenderingFailed(Exception):
    """The reader may see the entity, but rendering it for them raised."""


def reader_names(audiences) -> dict[str, Optional[str]]:
    """Audience key -> the user name whose permissions apply ('' = anonymous),
    or None when that user is gone or no longer active."""
    names: dict[str, Optional[str]] = {ANONYMOUS: ANONYMOUS}
    wanted = [a for a in set(audiences) if a != ANONYMOUS]
    if wanted:
        rows = model.Session.execute(sa.text(
            'SELECT id, name FROM "user" WHERE id = ANY(:ids) AND state = \'active\''),
            {"ids": wanted}).all()
        found = {row.id: row.name for row in rows}
        names.update({a: found.get(a) for a in wanted})
    return names


def _context(reader: str) -> dict[str, Any]:
    # Never ignore_auth, never the site user: the reader's own view, with
    # every IAuthFunctions override and IPackageController hook of the portal.
    return {"user": reader, "model": model, "session": model.Session, "use_cache": False}


@contextlib.contextmanager
def as_of(package_id: str, state: Optional[dict]) -> Iterator[None]:
    """Make CKAN's authorization see the dataset as it was (``state``: its
    state, private flag and organization) without writing anything: the ORM
    object is changed in memory with autoflush off, and reloaded afterwards.
    A purged dataset is put back, in memory only, for the duration."""
    session = model.Session
    if state is None:
        yield
        return
    with session.no_autoflush:
        package = session.get(model.Package, package_id)
        stand_in = package is None
        if stand_in:
            package = model.Package(id=package_id, name=state.get("name") or package_id,
                                    type="dataset")
            orm.make_transient_to_detached(package)
            session.add(package)
        keys = ("state", "private", "owner_org")
        for key in keys:
            setattr(package, key, state.get(key))
        try:
            if "collaborators" in state:
                with _collaborators_as_of(package_id, state["collaborators"], stand_in):
                    yield
            else:
                yield
        finally:
            if stand_in:
                session.expunge(package)
            else:
                session.expire(package, list(keys))


@contextlib.contextmanager
def _collaborators_as_of(package_id: str, collaborators: list,
                         purged: bool) -> Iterator[None]:
    """The dataset's collaborators as they were (CKAN reads them with queries),
    in a savepoint that is always rolled back (with the row of a purged
    dataset, which their rows refer to)."""
    connection = model.Session.connection()
    savepoint = connection.begin_nested()
    try:
        if purged:  # named by its id: its old name may be taken by now
            connection.execute(sa.text(
                "INSERT INTO package (id, name, type) VALUES (:id, :id, 'dataset')"),
                {"id": package_id})
        connection.execute(sa.text("DELETE FROM package_member WHERE package_id = :id"),
                           {"id": package_id})
        if collaborators:
            connection.execute(sa.text("""
                INSERT INTO package_member (package_id, user_id, capacity, modified)
                VALUES (:package_id, :user_id, :capacity, now())
            """), [{"package_id": package_id, "user_id": user_id, "capacity": capacity}
                   for user_id, capacity in collaborators])
        yield
    finally:
        savepoint.rollback()


def may_read(reader: str, action: str, object_id: str, package_id: Optional[str] = None,
             state: Optional[dict] = None) -> bool:
    """Would CKAN authorize ``action`` (``package_show`` or ``resource_show``)
    of ``object_id`` for ``reader``, with the dataset as ``state`` describes it
    (None: as it is now)?"""
    try:
        with as_of(package_id or object_id, state):
            toolkit.check_access(action, _context(reader), {"id": object_id})
        return True
    except (toolkit.NotAuthorized, toolkit.ObjectNotFound):
        return False


# Judgements of "may this reader see this now", per event, reused for a
# second: the fan-out's own judgement serves the delivery right after it, and
# consecutive batches of one event share one, instead of asking CKAN once per
# batch and audience. Per process; a second of staleness is the bound.
JUDGEMENT_TTL = 1.0
_judgements: "collections.OrderedDict[tuple, tuple[bool, float]]" = collections.OrderedDict()


def remember(event_id: str, key: str, action: str, object_id: str, allowed: bool) -> None:
    """Keep a judgement made now (by :func:`may_read` with the dataset as it is)."""
    cache_key = (event_id, key, action, object_id)
    _judgements[cache_key] = (allowed, time.monotonic() + JUDGEMENT_TTL)
    _judgements.move_to_end(cache_key)
    while len(_judgements) > 4096:
        _judgements.popitem(last=False)


def may_still_read(reader: str, key: str, event_id: str, action: str, object_id: str,
                   package_id: Optional[str]) -> bool:
    """:func:`may_read` now, or as judged for the same event at most
    ``JUDGEMENT_TTL`` ago."""
    cached = _judgements.get((event_id, key, action, object_id))
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]
    allowed = may_read(reader, action, object_id, package_id)
    remember(event_id, key, action, object_id, allowed)
    return allowed


def render(action: str, object_id: str, reader: str) -> dict:
    """``action`` as ``reader`` calls it through the API. Raises RenderingFailed."""
    try:
        return toolkit.get_action(action)(_context(reader), {"id": object_id})
    except Exception as error:  # noqa: BLE001 - fail closed: the reader gets nothing
        raise RenderingFailed(f"{type(error).__name__}: {error}"[:500]) from error
