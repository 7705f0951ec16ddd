"""Validators of ckanext-webhooks (registered with CKAN as named validators)."""
from __future__ import annotations

import base64
import binascii
from typing import Any

from ckan.plugins import toolkit

from .. import guard
from ..topics import all_topics, valid_patterns

Invalid = toolkit.Invalid
MAX_TOPIC_LENGTH = 100
MAX_SECRET_LENGTH = 200


def webhooks_string(key, data, errors, context) -> None:
    """Only strings, and without NUL: a list, number or object where a string
    belongs is an error, and the validators after this one never see it."""
    value = data.get(key)
    if value is toolkit.missing or value is None:
        return
    if not isinstance(value, str):
        errors[key].append(toolkit._("Must be a string"))
        raise toolkit.StopOnError
    if "\x00" in value:  # PostgreSQL text cannot hold it: refuse, never a 500
        errors[key].append(toolkit._("Must not contain NUL characters"))
        raise toolkit.StopOnError


def webhooks_topic(value: Any) -> Any:
    topics = all_topics()
    if not isinstance(value, str) or len(value) > MAX_TOPIC_LENGTH or value not in topics:
        raise Invalid(toolkit._("Unknown topic. Choose one of: %s") % ", ".join(topics))
    return value


MAX_TOPICS = 50


def webhooks_topics(value: Any) -> Any:
    """A list of topics and wildcards (``dataset/*``, ``resource/*``, ``*``);
    one string is a list of one. Duplicates are dropped, the order kept."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Invalid(toolkit._("Must be a non-empty list of topics"))
    if len(value) > MAX_TOPICS:
        raise Invalid(toolkit._("At most %d topics") % MAX_TOPICS)
    known = valid_patterns()
    chosen: list[str] = []
    for topic in value:
        if not isinstance(topic, str) or len(topic) > MAX_TOPIC_LENGTH or topic not in known:
            raise Invalid(toolkit._("Unknown topic. Choose among: %s") % ", ".join(known))
        if topic not in chosen:
            chosen.append(topic)
    return chosen


def webhooks_address(value: Any) -> Any:
    """An absolute http(s) URL whose host the portal may contact; normalised."""
    try:
        target = guard.resolve(value)
    except guard.Refused as refused:
        raise Invalid(str(refused))
    return f"{target.scheme}://{target.host_header}{target.path}"


def webhooks_secret(value: Any) -> Any:
    """Standard Webhooks secret: ``whsec_`` + base64 of 24 to 64 random bytes;
    empty: none (on update: drop the secret)."""
    if value in (None, "", toolkit.missing):
        return None
    error = Invalid(toolkit._(
        "Must be 'whsec_' followed by the base64 encoding of 24 to 64 bytes"))
    if len(value) > MAX_SECRET_LENGTH or not value.startswith("whsec_"):
        raise error
    try:
        key = base64.b64decode(value[len("whsec_"):], validate=True)
    except (binascii.Error, ValueError):
        raise error
    if not 24 <= len(key) <= 64:
        raise error
    return value


def webhooks_boolean(value: Any) -> Any:
    """true or false (also "true"/"false", "1"/"0", "yes"/"no"); anything else
    is an error, never taken as false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise Invalid(toolkit._("Must be true or false"))


def webhooks_id(value: Any) -> Any:
    if not isinstance(value, str) or not value or len(value) > 200:
        raise Invalid(toolkit._("Must be a webhook id"))
    return value


def _visible(action: str, context, value) -> bool:
    """May the caller ``action`` this object? (auth only: nothing is returned)"""
    try:
        toolkit.check_access(action, {"user": context.get("user"),
                                      "auth_user_obj": context.get("auth_user_obj")},
                             {"id": value})
        return True
    except (toolkit.NotAuthorized, toolkit.ObjectNotFound):
        return False


def webhooks_dataset_filter(value: Any, context) -> Any:
    """A dataset id or name the caller can read; stored as its id."""
    from ckan import model
    if value in (None, "", toolkit.missing):
        return None
    package = model.Package.get(value) if len(value) <= 200 else None
    if package is None or package.state == "deleted" \
            or not _visible("package_show", context, package.id):
        # The same answer whether it does not exist or is private.
        raise Invalid(toolkit._("Not found, or not visible to you"))
    return package.id


def _group_filter(value: Any, context, is_organization: bool) -> Any:
    from ckan import model
    if value in (None, "", toolkit.missing):
        return None
    group = model.Group.get(value) if len(value) <= 200 else None
    action = "organization_show" if is_organization else "group_show"
    if group is None or group.state != "active" or group.is_organization != is_organization \
            or not _visible(action, context, group.id):
        raise Invalid(toolkit._("Not found, or not visible to you"))
    return group.id


def webhooks_organization_filter(value: Any, context) -> Any:
    """An organization id or name the caller can see; stored as its id."""
    return _group_filter(value, context, True)


def webhooks_group_filter(value: Any, context) -> Any:
    """A group id or name the caller can see; stored as its id."""
    return _group_filter(value, context, False)


def webhooks_days(value: Any) -> Any:
    """A reporting window: 1 to 90 days."""
    if not 1 <= value <= 90:
        raise Invalid(toolkit._("Must be between 1 and 90"))
    return value
