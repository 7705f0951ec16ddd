"""HTTP-level behaviour: the 429 answer of the anonymous creation limit.

CKAN's action API has no status for "too many requests", so the limit is
applied before the API view runs, for anonymous POSTs to ``webhook_create``
and ``webhook_ping`` (both make the portal send a request).
"""
from __future__ import annotations

import re

from flask import Blueprint, jsonify

from ckan.plugins import toolkit

from . import ratelimit

webhooks = Blueprint("webhooks", __name__)
# Creating a hook and pinging one make the portal send requests: both count.
_CREATE = re.compile(r"^/api/(?:\d+/)?action/webhook_(?:create|ping)/?$")


@webhooks.before_app_request
def _limit_anonymous_creation():
    request = toolkit.request
    if request.method != "POST" or not _CREATE.match(request.path):
        return None
    if toolkit.current_user.is_authenticated:
        return None
    wait = ratelimit.hit(request.remote_addr or "unknown")
    if wait is None:
        return None
    response = jsonify({
        "help": toolkit.url_for("api.action", logic_function="help_show", ver=3,
                                name="webhook_create", _external=True),
        "success": False,
        "error": {"__type": "Rate Limit Error",
                  "message": toolkit._("Too many webhooks created from your address; "
                                       "try again in %d seconds") % wait}})
    response.status_code = 429
    response.headers["Retry-After"] = str(wait)
    return response
