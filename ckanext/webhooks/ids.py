"""Identifiers: hook ids are capabilities, event ids are message ids."""
import hashlib
import secrets
import uuid


def new_hook_id() -> str:
    """43 URL-safe characters from ``secrets`` (about 256 random bits), never
    starting with ``-``: a command line would take such an id for an option."""
    while True:
        hook_id = secrets.token_urlsafe(32)
        if not hook_id.startswith("-"):
            return hook_id


def new_event_id() -> str:
    """The Standard Webhooks message id, stable across retries."""
    return "msg_" + uuid.uuid4().hex


def fingerprint(hook_id: str) -> str:
    """What logs show instead of a hook id: the id is the only key to a hook."""
    return "hook:" + hashlib.sha256(hook_id.encode()).hexdigest()[:12]
