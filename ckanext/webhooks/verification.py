"""Subscriber verification: before a hook is stored, the portal proves that
its address wants it (as WebSub and Trello do).

The portal POSTs ``{"type": "webhook.verification", "challenge": "<random>",
"topics": [...], "topic": ..., "site_url": ...}`` (``topic`` when there is
one) with the header ``webhook-challenge`` carrying
the same random value. The receiver proves it asked for the hook by answering
2xx with the challenge as the body, either as plain text or as
``{"challenge": "<random>"}``. The challenge is fresh for every request and
never stored, so it cannot be replayed. The request goes through the same
SSRF guard, timeouts and size cap as deliveries. A name that does not resolve
now (within ``ckanext.webhooks.dns_timeout``) refuses the hook with a
validation error (:class:`guard.Unresolvable`): this is input validation,
whereas deliveries to a stored hook retry such a name (``dns_error``).
"""
from __future__ import annotations

import json
import secrets

from ckan.plugins import toolkit

from . import guard, settings
from .sender import web_sender
from .signing import USER_AGENT


FAILED = ("The address did not answer the verification request with its challenge: "
          "it must answer 2xx with the challenge it was sent (see the README)")


class Failed(ValueError):
    """The address did not prove it wants the hook; the message says why."""


def enabled() -> bool:
    return settings.verify_on_create()


def verify(address: str, topics: list[str]) -> None:
    """Raise Failed (or guard.Refused) unless ``address`` echoes a challenge."""
    target = guard.resolve(address)
    challenge = secrets.token_urlsafe(32)
    about = {"topics": topics, **({"topic": topics[0]} if len(topics) == 1 else {})}
    body = json.dumps({"type": "webhook.verification", "challenge": challenge, **about,
                       "site_url": toolkit.config.get("ckan.site_url")})
    outcome = web_sender().post(target, body.encode(), {
        "Content-Type": "application/json", "User-Agent": USER_AGENT,
        "webhook-challenge": challenge})
    # One message whatever went wrong: a closed, a filtered and an open port
    # (or a refusing receiver) must look alike to whoever probes with it.
    if not outcome.ok or not _echoes(outcome.body, challenge):
        raise Failed(FAILED)


def _echoes(answer: bytes, challenge: str) -> bool:
    text = answer.strip()
    if secrets.compare_digest(text, challenge.encode()):
        return True
    try:
        parsed = json.loads(text)
    except ValueError:
        return False
    value = parsed.get("challenge") if isinstance(parsed, dict) else None
    return isinstance(value, str) and secrets.compare_digest(value.encode(), challenge.encode())
