"""Request headers of a delivery, signed as the Standard Webhooks spec says:
``webhook-id`` (the event id, stable across retries), ``webhook-timestamp``
and ``webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>``.

The sender (:mod:`sender`) calls :func:`headers` right before it writes
each request, so the timestamp is that of the moment the request leaves,
however long it waited for a connection. Several secrets (a rotation: the
old and the new one) give one ``v1,<signature>`` each, separated by spaces,
in the one header, as the spec allows; receivers accept any that verifies.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import time
from typing import Iterable, Optional, Union

from . import __version__

USER_AGENT = f"ckanext-webhooks/{__version__} (+https://github.com/ckan/ckanext-webhooks)"
_PREFIX = "whsec_"

Secrets = Union[None, str, Iterable[Optional[str]]]


@functools.lru_cache(maxsize=4096)
def _key(secret: str) -> bytes:
    # As the standardwebhooks library reads a secret: an optional whsec_ prefix, base64.
    return base64.b64decode(secret[len(_PREFIX):] if secret.startswith(_PREFIX) else secret)


def secrets_of(secrets: Secrets) -> tuple[str, ...]:
    """The secrets to sign with, as a tuple: ``None``, one secret or several."""
    if not secrets:
        return ()
    if isinstance(secrets, str):
        return (secrets,)
    if isinstance(secrets, tuple) and all(secrets):
        return secrets
    return tuple(s for s in secrets if s)


def check_secrets(secrets: Secrets) -> None:
    """Raise unless every secret can sign (before a request is sent)."""
    for secret in secrets_of(secrets):
        _key(secret)


def signature(event_id: str, timestamp: int, body: bytes, secrets: Secrets) -> str:
    """``v1,<base64 HMAC-SHA256>`` per secret, space-separated."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(_key(secret), signed, hashlib.sha256).digest()
                                 ).decode("ascii")
        for secret in secrets_of(secrets))


def headers(event_id: str, body: Union[str, bytes], secrets: Secrets = None,
            now: Optional[float] = None) -> dict[str, str]:
    """The headers of one delivery, timestamped ``now`` (default: this instant)."""
    timestamp = int(now if now is not None else time.time())
    out = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
    }
    secrets = secrets_of(secrets)
    if secrets:
        out["webhook-signature"] = signature(
            event_id, timestamp, body.encode("utf-8") if isinstance(body, str) else body,
            secrets)
    return out
