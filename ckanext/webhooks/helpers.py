"""Template helpers of the webhook pages (registered as ``h.webhooks_*``)."""
from __future__ import annotations

import base64
import secrets
from typing import Optional

from ckan.plugins import toolkit

from . import settings

__all__ = ["webhooks_topic_label", "webhooks_state_label", "webhooks_sort_label",
           "webhooks_percent", "webhooks_new_secret", "webhooks_pause_grace_days",
           "webhooks_secret_rotation_hours"]


def webhooks_topic_label(topic: str) -> str:
    """A topic in words; a plugin's own topic as it is."""
    _ = toolkit._
    return {
        "dataset/create": _("A dataset is created"),
        "dataset/update": _("A dataset is updated"),
        "dataset/delete": _("A dataset is deleted"),
        "resource/create": _("A resource is added"),
        "resource/update": _("A resource is updated"),
        "resource/delete": _("A resource is deleted"),
        "dataset/*": _("Anything happens to a dataset"),
        "resource/*": _("Anything happens to a resource"),
        "*": _("Anything happens"),
    }.get(topic, topic)


def webhooks_state_label(state: str) -> str:
    _ = toolkit._
    return {"healthy": _("Healthy"), "failing": _("Failing"),
            "paused": _("Paused")}.get(state, state)


def webhooks_sort_label(sort: str) -> str:
    _ = toolkit._
    return {"created": _("Created"), "topic": _("Event"), "host": _("Host"),
            "deliveries": _("Deliveries"), "success_rate": _("Success rate"),
            "last_delivery": _("Last delivery"), "last_status": _("Last status"),
            "consecutive_failures": _("Consecutive failures")}.get(sort, sort)


def webhooks_percent(ratio: Optional[float]) -> str:
    return "-" if ratio is None else f"{ratio:.0%}"


def webhooks_new_secret() -> str:
    """A fresh Standard Webhooks secret to suggest in the form (never stored)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def webhooks_pause_grace_days() -> str:
    return f"{settings.pause_grace_days():g}"


def webhooks_secret_rotation_hours() -> str:
    return f"{settings.secret_rotation_hours():g}"
