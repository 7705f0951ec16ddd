"""Request headers of a delivery, signed as the Standard Webhooks spec says:
``webhook-id`` (the event id, stable across retries), ``webhook-timestamp``
and ``webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>``."""
from __future__ import annotations

import datetime as dt
import functools
import time

from standardwebhooks.webhooks import Webhook

from . import __version__

USER_AGENT = f"ckanext-webhooks/{__version__} (+https://github.com/ckan/ckanext-webhooks)"


@functools.lru_cache(maxsize=4096)
def _signer(secret: str) -> Webhook:
    return Webhook(secret)


def headers(event_id: str, body: str, secret: str | None,
            now: float | None = None) -> dict[str, str]:
    timestamp = int(now if now is not None else time.time())
    out = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
    }
    if secret:
        when = dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)
        out["webhook-signature"] = _signer(secret).sign(event_id, when, body)
    return out
