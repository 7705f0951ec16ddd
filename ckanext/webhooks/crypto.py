"""Signing secrets at rest: stored Fernet-encrypted (AES-128-CBC with an
HMAC-SHA256, from ``cryptography``), never in plain text.

Keys, newest first: ``ckanext.webhooks.secret_keys`` (or the environment's
``CKANEXT_WEBHOOKS_SECRET_KEYS``), space-separated Fernet keys. The first
encrypts; every one decrypts. A key derived from CKAN's own ``SECRET_KEY``
(HKDF-SHA256) always decrypts too, and encrypts when no key is configured:
a portal that sets nothing still stores no secret in clear. ``ckan webhooks
rotate-key`` re-encrypts every stored secret with the first key, after which
an old key can be removed.

Exports (``ckan webhooks export``) carry secrets encrypted with a key derived
from a passphrase (scrypt), so the file alone reveals nothing.
"""
from __future__ import annotations

import base64
import functools
import os
from typing import Optional

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from . import settings

ENVIRONMENT_KEYS = "CKANEXT_WEBHOOKS_SECRET_KEYS"
PLAIN_PREFIX = "whsec_"  # what a secret looks like in clear: never stored so


class SecretUnreadable(ValueError):
    """A stored secret that none of the configured keys decrypts."""


def new_key() -> str:
    return Fernet.generate_key().decode("ascii")


def _derived_key(secret_key: str) -> bytes:
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=b"ckanext-webhooks secrets at rest").derive(secret_key.encode("utf-8"))
    return base64.urlsafe_b64encode(key)


def _configured_keys() -> tuple[str, ...]:
    return tuple(settings.secret_keys() or os.environ.get(ENVIRONMENT_KEYS, "").split())


@functools.lru_cache(maxsize=8)
def _fernet(keys: tuple[str, ...], secret_key: Optional[str]) -> MultiFernet:
    fernets = [Fernet(key.encode("ascii")) for key in keys]
    if secret_key:
        fernets.append(Fernet(_derived_key(secret_key)))
    if not fernets:
        raise RuntimeError("no key for webhook secrets: set ckanext.webhooks.secret_keys "
                           "or CKAN's SECRET_KEY")
    return MultiFernet(fernets)


def _keys() -> MultiFernet:
    return _fernet(_configured_keys(), settings.ckan_secret_key())


def seal(secret: Optional[str]) -> Optional[str]:
    """The stored form of a signing secret (None stays None)."""
    if not secret:
        return None
    return _keys().encrypt(secret.encode("utf-8")).decode("ascii")


@functools.lru_cache(maxsize=4096)
def _open(stored: str, fernet: MultiFernet) -> str:
    try:
        return fernet.decrypt(stored.encode("ascii")).decode("utf-8")
    except (InvalidToken, ValueError, UnicodeError):
        raise SecretUnreadable("a stored webhook secret cannot be decrypted with the "
                               "configured keys") from None


def unseal(stored: Optional[str]) -> Optional[str]:
    """The signing secret from its stored form. Raises SecretUnreadable when
    no key decrypts it (the delivery then fails as ``internal_error``)."""
    if not stored:
        return None
    return _open(stored, _keys())


def rotate(stored: str) -> str:
    """Re-encrypt with the first key (MultiFernet.rotate)."""
    try:
        return _keys().rotate(stored.encode("ascii")).decode("ascii")
    except InvalidToken:
        raise SecretUnreadable("a stored webhook secret cannot be decrypted with the "
                               "configured keys") from None


# --- exports ------------------------------------------------------------------

def passphrase_key(passphrase: str, salt: bytes) -> Fernet:
    key = Scrypt(salt=salt, length=32, n=2 ** 15, r=8, p=1).derive(passphrase.encode("utf-8"))
    return Fernet(base64.urlsafe_b64encode(key))
