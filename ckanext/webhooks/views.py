"""Web pages: subscribe (site-wide or from a dataset page), manage a hook by
its id, the sysadmin dashboard; and the 429 answer of the anonymous creation
limit. Every page goes through the same actions as the API."""
from __future__ import annotations

import datetime as dt
import re
from typing import Any, Optional

from flask import Blueprint, jsonify, make_response
from flask_wtf.csrf import ValidationError as CSRFInvalid, validate_csrf

from ckan.plugins import toolkit

from . import chart, ratelimit, report, settings
from .logic.auth import FORM_CONTEXT_KEY
from .topics import TOPICS, all_topics, valid_patterns

_ = toolkit._
webhooks = Blueprint("webhooks", __name__)

# Creating a hook, pinging one and recovering its events make the portal send
# requests: they count, through the action API and through the pages alike.
_API_LIMITED = re.compile(r"^/api/(?:\d+/)?action/webhook_(?:create|ping|recover)/?$")
_PAGE_LIMITED = re.compile(r"^/(?:dataset/[^/]+/)?webhooks/(?:new|[^/]+/(?:ping|recover))/?$")
PAGE_SIZE = 50


@webhooks.before_app_request
def _limit_creation():
    request = toolkit.request
    if request.method != "POST":
        return None
    is_api = bool(_API_LIMITED.match(request.path))
    if not is_api and not _PAGE_LIMITED.match(request.path):
        return None
    user = toolkit.current_user
    if user.is_authenticated:
        if getattr(user, "sysadmin", False):
            return None
        wait = ratelimit.hit(f"user:{user.id}", settings.user_create_limit())
        message = _("Too many webhooks created by you; try again in %d seconds")
    else:
        wait = ratelimit.hit(ratelimit.client_key(request.remote_addr))
        message = _("Too many webhooks created from your address; "
                    "try again in %d seconds")
    if wait is None:
        return None
    message = message % wait
    if is_api:
        response = jsonify({
            "help": toolkit.url_for("api.action", logic_function="help_show", ver=3,
                                    name="webhook_create", _external=True),
            "success": False,
            "error": {"__type": "Rate Limit Error", "message": message}})
    else:
        response = make_response(toolkit.render("error_document_template.html", {
            "code": 429, "name": _("Too Many Requests"), "content": message}))
    response.status_code = 429
    response.headers["Retry-After"] = str(wait)
    return response


def refuse_cookie_creation_with_403(app) -> None:
    """CKAN 2.11 checks CSRF on every cookie-authenticated API call itself and
    answers a missing token with 400; 2.12 leaves it to the action, whose auth
    function answers 403. Make webhook_create's refusal a 403 on both (other
    CSRF failures keep CKAN's own answer)."""
    from flask_wtf.csrf import CSRFError
    from werkzeug.exceptions import BadRequest
    previous = app.error_handler_spec.get(None, {}).get(400, {}).get(BadRequest)

    def handler(error):
        if not _API_CREATE.match(toolkit.request.path):
            return previous(error) if previous is not None else error
        response = jsonify({
            "help": toolkit.url_for("api.action", logic_function="help_show", ver=3,
                                    name="webhook_create", _external=True),
            "success": False,
            "error": {"__type": "Authorization Error", "message": _(
                "A webhook_create call authenticated by a session cookie must carry the "
                "CSRF token (X-CSRFToken header); use an API token instead")}})
        response.status_code = 403
        return response
    app.register_error_handler(CSRFError, handler)


_API_CREATE = re.compile(r"^/api/(?:\d+/)?action/webhook_create/?$")


@webhooks.before_request
def _check_csrf_token():
    """Every POST of these pages carries CKAN's CSRF token. CKAN 2.12 exempts
    a view from its CSRF check process-wide once an anonymous visitor or an
    API-token caller uses it; a hook created by a logged-in user follows that
    user's read permissions, so these views check the token themselves."""
    if toolkit.request.method != "POST":
        return
    field = toolkit.config.get("WTF_CSRF_FIELD_NAME") or "_csrf_token"
    try:
        validate_csrf(toolkit.request.form.get(field))
    except CSRFInvalid as error:
        toolkit.abort(400, _("The form has expired or is not from this site (%s). "
                             "Reload the page and try again.") % error)


def _context() -> dict[str, Any]:
    # Every POST here has passed the CSRF check above: a hook made by a
    # logged-in visitor through these pages may be bound to them.
    return {"user": toolkit.current_user.name if toolkit.current_user.is_authenticated
            else "", "auth_user_obj": toolkit.current_user, FORM_CONTEXT_KEY: True}


def _private(response):
    """A page that shows or acts on a hook id: the id is a key, so keep it out
    of caches and out of the Referer header of any link followed from it."""
    response = make_response(response)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


def _error_text(error: toolkit.ValidationError) -> str:
    """A validation error as one line, for an error page or a flash message."""
    return "; ".join(f"{key}: {', '.join(map(str, messages))}"
                     for key, messages in error.error_dict.items())


def _call(action: str, data: dict[str, Any]) -> Any:
    """Run an action as the visitor; unknown hooks and refusals become CKAN's
    404 and 403 pages."""
    try:
        return toolkit.get_action(action)(_context(), data)
    except toolkit.ObjectNotFound:
        toolkit.abort(404, _("Webhook not found"))
    except toolkit.ValidationError as error:
        if set(error.error_dict) == {"id"}:  # not even the shape of a hook id
            toolkit.abort(404, _("Webhook not found"))
        raise
    except toolkit.NotAuthorized as refusal:
        toolkit.abort(403, str(refusal) or _("Not authorized"))


# Subscribe

def _dataset_or_404(dataset_id: str) -> dict[str, Any]:
    if "\x00" in dataset_id or len(dataset_id) > 200:  # no dataset has such an id
        toolkit.abort(404, _("Dataset not found"))
    try:
        return toolkit.get_action("package_show")(_context(), {"id": dataset_id})
    except (toolkit.ObjectNotFound, toolkit.NotAuthorized):
        toolkit.abort(404, _("Dataset not found"))


@webhooks.route("/webhooks/new", methods=["GET", "POST"], endpoint="new")
@webhooks.route("/dataset/<id>/webhooks/new", methods=["GET", "POST"],
                endpoint="new_for_dataset")
def new(id: Optional[str] = None):
    dataset = _dataset_or_404(id) if id else None
    topics = list(TOPICS) if dataset else list(all_topics())
    form = {"topics": ["dataset/update"], "address": "", "secret": ""}
    errors: dict[str, list[str]] = {}
    if toolkit.request.method == "POST":
        posted = toolkit.request.form
        form = {"topics": [t for t in posted.getlist("topic") if t in topics],
                "address": posted.get("address", "").strip(),
                "secret": posted.get("secret", "").strip()}
        try:
            hook_ids = _create_hooks(form, dataset)
        except toolkit.ValidationError as error:
            errors = error.error_dict
        else:
            return _private(toolkit.render("webhooks/created.html", {
                "hook_ids": hook_ids, "topics": form["topics"], "address": form["address"],
                "dataset": dataset}))
    return toolkit.render("webhooks/new.html", {
        "dataset": dataset, "topics": topics, "form_data": form, "errors": errors,
        "error_summary": {key: "; ".join(map(str, value)) for key, value in errors.items()}})


def _create_hooks(form: dict[str, Any], dataset: Optional[dict]) -> list[str]:
    """One hook for every chosen event (one verification handshake)."""
    if not form["topics"]:
        raise toolkit.ValidationError({"topic": [_("Choose at least one event")]})
    data = {"topics": form["topics"], "address": form["address"]}
    if form["secret"]:
        data["secret"] = form["secret"]
    if dataset:
        data["dataset"] = dataset["id"]
    try:
        return [_call("webhook_create", data)]
    except toolkit.ValidationError as error:
        errors = dict(error.error_dict)
        if "topics" in errors:  # the form's field is "topic"
            errors["topic"] = errors.pop("topics")
        raise toolkit.ValidationError(errors)


# Manage by id

@webhooks.route("/webhooks/<id>", endpoint="read")
def read(id: str):
    hook = _call("webhook_show", {"id": id})
    attempts = _call("webhook_deliveries", {"id": id, "limit": 20})
    return _private(toolkit.render("webhooks/read.html", {
        "hook": hook, "attempts": attempts, "filters": _filters_shown(hook),
        "new_secret": toolkit.h.webhooks_new_secret(),
        "an_hour_ago": (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1))
        .strftime("%Y-%m-%dT%H:%M")}))


def _filters_shown(hook: dict[str, Any]) -> list[dict[str, Any]]:
    """Each filter with its title and link, as the visitor may see it (an
    object hidden from them stays an id)."""
    shown = []
    for kind, action, route in (("dataset", "package_show", "dataset.read"),
                                ("organization", "organization_show", "organization.read"),
                                ("group", "group_show", "group.read")):
        object_id = hook["filters"][kind]
        if not object_id:
            continue
        try:
            found = toolkit.get_action(action)(_context(), {"id": object_id})
        except (toolkit.ObjectNotFound, toolkit.NotAuthorized):
            shown.append({"kind": kind, "id": object_id, "title": None, "url": None})
        else:
            shown.append({"kind": kind, "id": object_id,
                          "title": found.get("title") or found["name"],
                          "url": toolkit.url_for(route, id=found["name"])})
    return shown


def _back_to(hook_id: Optional[str]):
    """Where a button on the hook page or the dashboard returns to."""
    if toolkit.request.form.get("return_to") == "admin":
        return toolkit.redirect_to("webhooks.admin")
    if hook_id:
        return _private(toolkit.redirect_to("webhooks.read", id=hook_id))
    return toolkit.redirect_to("webhooks.new")


@webhooks.route("/webhooks/<id>/edit", methods=["GET", "POST"], endpoint="edit")
def edit(id: str):
    hook = _call("webhook_show", {"id": id})
    form = {"topics": hook["topics"], "address": hook["address"],
            **{kind: hook["filters"][kind] or "" for kind in ("dataset", "organization",
                                                              "group")}}
    errors: dict[str, list[str]] = {}
    if toolkit.request.method == "POST":
        posted = toolkit.request.form
        form = {"topics": posted.getlist("topic"), "address": posted.get("address", "").strip(),
                **{kind: posted.get(kind, "").strip() for kind in ("dataset", "organization",
                                                                  "group")}}
        try:
            _call("webhook_update", {"id": id, **form})
        except toolkit.ValidationError as error:
            errors = dict(error.error_dict)
            if "topics" in errors:  # the form's field is "topic"
                errors["topic"] = errors.pop("topics")
        else:
            toolkit.h.flash_success(_("Webhook changed"))
            return _back_to(id)
    return _private(toolkit.render("webhooks/edit.html", {
        "hook": hook, "topics": list(valid_patterns()), "form_data": form, "errors": errors,
        "error_summary": {key: "; ".join(map(str, value)) for key, value in errors.items()}}))


@webhooks.route("/webhooks/<id>/pause", methods=["POST"], endpoint="pause")
def pause(id: str):
    _call("webhook_update", {"id": id, "active": False})
    toolkit.h.flash_success(_("Webhook paused: nothing is sent to it until you resume it"))
    return _back_to(id)


@webhooks.route("/webhooks/<id>/resume", methods=["POST"], endpoint="resume")
def resume(id: str):
    _call("webhook_update", {"id": id, "active": True})
    toolkit.h.flash_success(_("Webhook resumed: what was held is on its way"))
    return _back_to(id)


@webhooks.route("/webhooks/<id>/secret", methods=["POST"], endpoint="secret")
def secret(id: str):
    _call("webhook_show", {"id": id})  # an unknown id is a 404 whatever the form says
    form = toolkit.request.form
    new = "" if form.get("drop") else form.get("secret", "").strip()
    if not new and not form.get("drop"):
        toolkit.h.flash_error(_("secret: Missing value"))
        return _back_to(id)
    try:
        hook = _call("webhook_update", {"id": id, "secret": new})
    except toolkit.ValidationError as error:
        toolkit.h.flash_error(_error_text(error))
        return _back_to(id)
    if not new:
        toolkit.h.flash_success(_("Secret removed: deliveries are no longer signed"))
    elif hook["previous_secret_until"]:
        toolkit.h.flash_success(_("New secret set; the old one also signs until %s")
                                % toolkit.h.render_datetime(hook["previous_secret_until"],
                                                            with_hours=True))
    else:
        toolkit.h.flash_success(_("Secret set: deliveries are signed from now on"))
    return _back_to(id)


@webhooks.route("/webhooks/<id>/recover", methods=["POST"], endpoint="recover")
def recover(id: str):
    _call("webhook_show", {"id": id})
    try:
        result = _call("webhook_recover", {"id": id,
                                           "since": toolkit.request.form.get("since", "")})
    except toolkit.ValidationError as error:
        toolkit.h.flash_error(_error_text(error))
    else:
        toolkit.h.flash_success(_("%d past events queued for this webhook") % result["queued"])
    return _back_to(id)


@webhooks.route("/webhooks/<id>/ping", methods=["POST"], endpoint="ping")
def ping(id: str):
    outcome = _call("webhook_ping", {"id": id})
    if outcome["ok"]:
        toolkit.h.flash_success(_("Ping delivered: HTTP %s in %d ms")
                                % (outcome["status"], outcome["duration_ms"]))
    else:
        toolkit.h.flash_error(_("Ping failed: %s")
                              % (outcome["error"] or "HTTP %s" % outcome["status"]))
    return _back_to(id)


@webhooks.route("/webhooks/<id>/delete", methods=["GET", "POST"], endpoint="delete")
def delete(id: str):
    hook = _call("webhook_show", {"id": id})
    if toolkit.request.method == "POST":
        _call("webhook_delete", {"id": id})
        toolkit.h.flash_success(_("Webhook deleted: %s will receive no more events")
                                % hook["address"])
        return _back_to(None)
    return _private(toolkit.render("webhooks/confirm_delete.html", {
        "hook": hook, "return_to": toolkit.request.args.get("return_to", "")}))


# Sysadmin dashboard

_FILTERS = ("topic", "host", "state", "sort", "descending")


@webhooks.route("/ckan-admin/webhooks", endpoint="admin")
def admin():
    args = toolkit.request.args
    query = {key: args[key] for key in _FILTERS if args.get(key)}
    page = int(args["page"]) if re.fullmatch(r"[1-9][0-9]{0,5}", args.get("page", "")) else 1
    try:
        hooks = toolkit.get_action("webhook_list")(_context(), dict(
            query, limit=PAGE_SIZE + 1, offset=(page - 1) * PAGE_SIZE))
        activity = toolkit.get_action("webhook_activity")(_context(), {"days": 7})
    except toolkit.NotAuthorized:
        toolkit.abort(403, _("Only sysadmins may see the webhooks dashboard"))
    except toolkit.ValidationError as error:
        toolkit.abort(400, _error_text(error))
    return toolkit.render("admin/webhooks.html", {
        "hooks": hooks[:PAGE_SIZE], "has_next": len(hooks) > PAGE_SIZE, "page": page,
        "query": query, "topics": all_topics(), "states": report.STATES,
        "sorts": list(report.SORTS), "totals": activity["totals"],
        "chart": chart.activity_svg(activity["hours"]),
        "days": chart.daily_totals(activity["hours"]),
        "week_ago": (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=7))
        .strftime("%Y-%m-%dT%H:%M:%S")})


@webhooks.route("/ckan-admin/webhooks/redeliver", methods=["POST"],
                endpoint="redeliver_failed")
def redeliver_failed():
    form = toolkit.request.form
    data = {"since": form.get("since", "")}
    if form.get("id"):
        data["id"] = form["id"]
    try:
        result = toolkit.get_action("webhook_redeliver_failed")(_context(), data)
    except toolkit.NotAuthorized:
        toolkit.abort(403, _("Only sysadmins may do this"))
    except toolkit.ValidationError as error:
        toolkit.h.flash_error(_error_text(error))
    else:
        toolkit.h.flash_success(_("%d failed deliveries queued again") % result["queued"])
    return toolkit.redirect_to("webhooks.admin")
