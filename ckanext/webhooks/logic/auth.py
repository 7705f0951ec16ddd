"""Authorization of the webhook actions.

By default anyone may create, show and delete hooks (the hook id is the
capability that guards show and delete); ``ckanext.webhooks.minimum_auth``
raises the bar to a logged-in user, an organization editor or admin, or a
sysadmin. Listing hooks is for sysadmins only (CKAN lets sysadmins through
before any auth function runs).
"""
from __future__ import annotations

from typing import Any

from ckan import authz
from ckan.plugins import toolkit

from .. import settings

__all__ = ["webhook_create", "webhook_show", "webhook_update", "webhook_delete",
           "webhook_deliveries", "webhook_recover",
           "webhook_ping", "webhook_redeliver", "webhook_list", "webhook_activity",
           "webhook_redeliver_failed"]

LEVELS = ("anonymous", "user", "editor", "admin", "sysadmin")


def _minimum_level() -> str:
    level = settings.minimum_auth()
    return level if level in LEVELS else "sysadmin"  # a typo must not open things up


def _meets_minimum(context: dict[str, Any]) -> dict[str, Any]:
    level = _minimum_level()
    if level == "anonymous":
        return {"success": True}
    user = context.get("user")
    if not user or not authz.get_user_id_for_username(user, allow_none=True):
        return {"success": False, "msg": toolkit._("You must be logged in to use webhooks")}
    if level == "user" or authz.is_sysadmin(user):
        return {"success": True}
    if level in ("editor", "admin"):
        permission = "create_dataset" if level == "editor" else "admin"
        orgs = toolkit.get_action("organization_list_for_user")(
            {"user": user, "ignore_auth": True}, {"permission": permission})
        if orgs:
            return {"success": True}
    return {"success": False,
            "msg": toolkit._("Webhooks on this portal need the role: %s") % level}


# Set in the context by the extension's own pages, which check CSRF themselves.
FORM_CONTEXT_KEY = "ckanext.webhooks.csrf_checked_form"


def _api_call_by_cookie() -> bool:
    """Is this an action API request authenticated by a browser's session
    cookie alone (no API token)? Such a request could have been made by a page
    on another site, riding on the visitor's login."""
    from flask import g, has_request_context, request
    if not has_request_context() or (request.endpoint or "").split(".")[0] != "api":
        return False
    return bool(toolkit.current_user.is_authenticated and not g.get("login_via_auth_header"))


def _csrf_token_valid() -> bool:
    from flask_wtf.csrf import ValidationError as CSRFInvalid, validate_csrf
    request = toolkit.request
    field = toolkit.config.get("WTF_CSRF_FIELD_NAME") or "_csrf_token"
    token = (request.headers.get("X-CSRFToken") or request.headers.get("X-CSRF-Token")
             or request.form.get(field))
    try:
        validate_csrf(token)
    except CSRFInvalid:
        return False
    return True


def webhook_create(context, data_dict):
    """Anyone, subject to ckanext.webhooks.minimum_auth; but a call that would
    bind the hook to a logged-in user through the session cookie alone must
    carry CKAN's CSRF token (otherwise another site could make a visitor's
    browser create a hook that hears that visitor's private datasets)."""
    if not context.get(FORM_CONTEXT_KEY) and _api_call_by_cookie() \
            and not _csrf_token_valid():
        return {"success": False, "msg": toolkit._(
            "A webhook_create call authenticated by a session cookie must carry the "
            "CSRF token (X-CSRFToken header); use an API token instead")}
    return _meets_minimum(context)


# Run for sysadmins too: they are the users whose hooks would hear the most.
webhook_create = toolkit.auth_sysadmins_check(toolkit.auth_allow_anonymous_access(webhook_create))


def _capability(name: str):
    """Auth of an action that anyone holding a hook id (or, for create, anyone)
    may call, subject to ckanext.webhooks.minimum_auth."""
    @toolkit.auth_allow_anonymous_access
    def auth(context, data_dict):
        return _meets_minimum(context)
    auth.__name__ = auth.__qualname__ = name
    return auth


webhook_show = _capability("webhook_show")
webhook_delete = _capability("webhook_delete")
webhook_update = _capability("webhook_update")
webhook_recover = _capability("webhook_recover")
webhook_deliveries = _capability("webhook_deliveries")
webhook_ping = _capability("webhook_ping")
webhook_redeliver = _capability("webhook_redeliver")


def _sysadmins_only(name: str):
    """Auth of an action about every hook: sysadmins only (CKAN lets them
    through before any auth function runs)."""
    def auth(context, data_dict):
        return {"success": False, "msg": toolkit._("Only sysadmins may do this")}
    auth.__name__ = auth.__qualname__ = name
    return auth


webhook_list = _sysadmins_only("webhook_list")
webhook_activity = _sysadmins_only("webhook_activity")
webhook_redeliver_failed = _sysadmins_only("webhook_redeliver_failed")
