"""Subscriber verification: before a hook is stored, the portal proves that
its address wants it (as WebSub and Trello do).

The portal POSTs ``{"type": "webhook.verification", "challenge": "<random>",
"topic": ..., "site_url": ...}`` with the header ``webhook-challenge`` carrying
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
from .delivery import web_sender
from .signing import USER_AGENT


class Failed(ValueError):
    """The address did not prove it wants the hook; the message says why."""


def enabled() -> bool:
    return settings.verify_on_create()


def verify(address: str, topic: str) -> None:
    """Raise Failed (or guard.Refused) unless ``address`` echoes a challenge."""
    target = guard.resolve(address)
    challenge = secrets.token_urlsafe(32)
    body = json.dumps({"type": "webhook.verification", "challenge": challenge,
                       "topic": topic, "site_url": toolkit.config.get("ckan.site_url")})
    outcome = web_sender().post(target, body.encode(), {
        "Content-Type": "application/json", "User-Agent": USER_AGENT,
        "webhook-challenge": challenge})
    if not outcome.ok:
        what = f"HTTP {outcome.status}" if outcome.status else outcome.error
        raise Failed(f"The address did not accept the verification request ({what}); "
                     "it must answer 2xx with the challenge it was sent")
    if not _echoes(outcome.body, challenge):
        raise Failed("The address answered the verification request without echoing "
                     "its challenge")


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
