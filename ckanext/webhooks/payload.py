"""What a delivery says.

The body of a delivery is built from the rendering of its own audience
(:mod:`fanout` stores one per event and reader), or, for a reader who lost
sight of a dataset, from what that reader saw before: its ``id`` and ``name``.
"""
from __future__ import annotations

import datetime as dt
import json
from typing import Any, Callable, Optional

from ckan.plugins import toolkit

from . import topics

SCHEMA_VERSION = "1"


def delivery_data(event, topic: str, rendering: Callable[[], Optional[Any]]
                  ) -> Optional[Any]:
    """The ``data`` of a delivery of ``event`` as ``topic``; ``rendering``
    gives the audience's stored rendering. None: nothing may be sent."""
    if topic == topics.DATASET_DELETE:
        snapshot = event.snapshot or {}
        before = snapshot.get("_before") or {}
        return {"id": event.package_id or event.object_id,
                "name": before.get("name") or snapshot.get("name")}
    if topic == topics.RESOURCE_DELETE:
        return {"id": event.object_id, "package_id": event.package_id}
    if topic in topics.TOPICS:
        return rendering()
    return event.data if event.data is not None else {}  # a plugin's own topic


def event_envelope(event, data_json: str, topic: Optional[str] = None,
                   reason: Optional[str] = None) -> str:
    """The body shared by every hook of an audience, with a slot for the hook id.

    ``data_json`` is serialised once; each hook's body is then a string
    substitution, not a new serialisation of the whole entity.
    """
    head = {
        "event_id": event.id,
        "topic": topic or event.topic,
        "timestamp": _iso(event.created),
        "site_url": toolkit.config.get("ckan.site_url"),
        "schema_version": SCHEMA_VERSION,
    }
    if reason is not None:
        head["reason"] = reason
    head_json = json.dumps(head, separators=(",", ":"))[1:-1]
    return "," + head_json + ',"data":' + data_json + "}"


def body_for(envelope: str, hook_id: str) -> str:
    return '{"webhook_id":' + json.dumps(hook_id) + envelope


def _iso(value: dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
