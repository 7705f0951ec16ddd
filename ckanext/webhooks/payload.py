"""What a delivery says, and who may hear it.

The entity is taken once per event, when the event is fanned out (right
after the commit, in the worker, not in the writer's request), as
``package_show``/``resource_show`` return it; retries send exactly that.
Whether a hook's reader may see it is decided at every delivery attempt, with
CKAN's own ``package_show`` authorization, so a dataset made private after
the event was captured is not delivered to those who can no longer read it.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any, Optional

from ckan import authz, model
from ckan.plugins import toolkit

from . import topics

log = logging.getLogger(__name__)
SCHEMA_VERSION = "1"


_site_user_name: Optional[str] = None


def _site_context() -> dict[str, Any]:
    global _site_user_name
    if _site_user_name is None:  # it is named after ckan.site_id: it never changes
        _site_user_name = toolkit.get_action("get_site_user")({"ignore_auth": True}, {})["name"]
    return {"user": _site_user_name, "ignore_auth": True, "use_cache": False}


def entity_data(event) -> dict[str, Any]:
    """The entity as the action API shows it, or what was last known of it."""
    kind = topics.object_type(event.topic)
    snapshot = dict(event.snapshot or {})
    snapshot.pop("_package", None)
    action = "package_show" if kind == "dataset" else "resource_show"
    try:
        return toolkit.get_action(action)(_site_context(), {"id": event.object_id})
    except toolkit.ObjectNotFound:
        return snapshot  # purged (or resource removed): the last known columns


def reader_name(user_id: Optional[str], cache: dict) -> Optional[str]:
    """The user name whose permissions apply ('' = anonymous); None = nobody."""
    if not user_id:
        return ""
    if user_id not in cache:
        user = model.User.get(user_id)
        cache[user_id] = user.name if user is not None and user.state == "active" else None
    return cache[user_id]


def can_read(event, reader: str) -> bool:
    """May ``reader`` ('' for anonymous) see this event now?"""
    if event.topic not in topics.TOPICS and not event.package_id:
        return True  # a plugin's own topic: the plugin vetoes what must not be heard
    known = (event.snapshot or {}).get("_package") or {}
    package = model.Package.get(event.package_id) if event.package_id else None
    if package is not None and package.state == "active" \
            and event.topic != topics.DATASET_DELETE:
        try:
            toolkit.check_access("package_show", {"user": reader, "model": model},
                                 {"id": package.id})
            return True
        except (toolkit.NotAuthorized, toolkit.ObjectNotFound):
            return False
    # The dataset is gone (deleted or purged): reveal no more than the API
    # showed before, judged by what was known when the event was captured.
    if known.get("state", "active") != "active":
        return False
    private = bool(known.get("private")) or bool(package is not None and package.private)
    if not private:
        return True
    if not reader:
        return False
    if authz.is_sysadmin(reader):
        return True
    owner_org = known.get("owner_org") or (package.owner_org if package else None)
    return bool(owner_org) and authz.has_user_permission_for_group_or_org(
        owner_org, reader, "read")


def event_envelope(event, data_json: str) -> str:
    """The body shared by every hook of an event, with a slot for the hook id.

    ``data_json`` is serialised once per event; each hook's body is then a
    string substitution, not a new serialisation of the whole entity.
    """
    head = {
        "event_id": event.id,
        "topic": event.topic,
        "timestamp": _iso(event.created),
        "site_url": toolkit.config.get("ckan.site_url"),
        "schema_version": SCHEMA_VERSION,
    }
    head_json = json.dumps(head, separators=(",", ":"))[1:-1]
    return "," + head_json + ',"data":' + data_json + "}"


def body_for(envelope: str, hook_id: str) -> str:
    return '{"webhook_id":' + json.dumps(hook_id) + envelope


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
