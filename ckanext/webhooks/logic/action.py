"""The webhook actions of the CKAN action API."""
from __future__ import annotations

import json
from typing import Any, Optional

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ckan import model
from ckan.plugins import toolkit

from .. import guard, ids, payload, report, settings, signing, verification
from ..delivery import Request, web_sender
from ..dispatcher import attempt_row, log_attempts, requeue
from ..model import Webhook, WebhookAttempt, WebhookDelivery, WebhookEvent, utcnow
from . import schema

DUPLICATE = "A webhook for this topic and address already exists"


def _validate(data_dict: dict[str, Any], schema_: dict, context: dict) -> dict[str, Any]:
    data, errors = toolkit.navl_validate(data_dict, schema_, context)
    unknown = {key: ["Unknown field"] for key in data.pop("__extras", {}) or {}}
    if data.pop("__junk", None):
        errors.setdefault("__junk", ["Unexpected nested values"])
    errors.update(unknown)
    if errors:
        raise toolkit.ValidationError(errors)
    return data


def _get(hook_id: str) -> Webhook:
    hook = model.Session.get(Webhook, hook_id)
    if hook is None:
        raise toolkit.ObjectNotFound("Webhook not found")
    return hook


def _dictize(hook: Webhook) -> dict[str, Any]:
    iso = lambda value: value.isoformat() if value else None  # noqa: E731
    pending = model.Session.query(sa.func.count()).select_from(WebhookDelivery).filter(
        WebhookDelivery.hook_id == hook.id).scalar()
    return {
        "id": hook.id,
        "topic": hook.topic,
        "address": hook.address,
        "created": iso(hook.created),
        "signed": bool(hook.secret),
        "reader": _reader(hook),
        "state": "failing" if hook.failing_since else "healthy",
        "filters": {"dataset": hook.dataset_id, "organization": hook.organization_id,
                    "group": hook.group_id},
        "statistics": {
            "deliveries": hook.delivery_count,
            "successes": hook.success_count,
            "last_delivery": iso(hook.last_delivery),
            "last_status": hook.last_status,
            "last_error": hook.last_error,
            "consecutive_failures": hook.consecutive_failures,
            "consecutive_4xx": hook.consecutive_4xx,
            "failing_since": iso(hook.failing_since),
            "pending_deliveries": pending,
        },
    }


def webhook_create(context, data_dict):
    """Subscribe a callback address to an event topic.

    Anyone may call this unless ``ckanext.webhooks.minimum_auth`` says
    otherwise. When a logged-in user creates a hook, deliveries follow that
    user's read permissions; an anonymous hook only hears of public datasets.

    :param topic: one of ``dataset/create``, ``dataset/update``,
        ``dataset/delete``, ``resource/create``, ``resource/update``,
        ``resource/delete``
    :type topic: string
    :param address: the absolute ``http://`` or ``https://`` URL that receives
        the POSTs (at most 2,000 characters; private and local network
        addresses are refused)
    :type address: string
    :param dataset: optional: only events of this dataset (id or name), its
        resources' events included for ``resource/*`` topics. It must exist
        and be visible to the caller.
    :type dataset: string
    :param organization: optional: only events of datasets of this
        organization (id or name), visible to the caller
    :type organization: string
    :param group: optional: only events of datasets in this group (id or name)
    :type group: string
    :param secret: optional Standard Webhooks signing secret, ``whsec_``
        followed by the base64 of 24 to 64 random bytes; when given, every
        delivery carries a ``webhook-signature`` header. Never shown again.
    :type secret: string

    Unless the portal turned it off, the address is verified first: it is
    sent a single-use challenge that it must echo in a 2xx answer (see the
    README's "Verification handshake").

    :returns: the id of the new webhook: keep it, it is the only key to show
        or delete the hook (every delivery carries it too)
    :rtype: string
    """
    toolkit.check_access("webhook_create", context, data_dict)
    csrf_field = toolkit.config.get("WTF_CSRF_FIELD_NAME") or "_csrf_token"
    data_dict = {key: value for key, value in data_dict.items() if key != csrf_field}
    data = _validate(data_dict, schema.webhook_create_schema(), context)
    session = model.Session
    filters = {"dataset_id": data.get("dataset"), "organization_id": data.get("organization"),
               "group_id": data.get("group")}
    exists = session.query(Webhook.id).filter_by(
        topic=data["topic"], address=data["address"], **filters).first()
    if exists:
        raise toolkit.ValidationError({"address": [DUPLICATE]})
    host = guard.parse(data["address"])[1]
    per_host = settings.max_hooks_per_host()
    if session.query(Webhook.id).filter_by(host=host).limit(per_host).count() >= per_host:
        raise toolkit.ValidationError({"address": [
            f"This portal allows at most {per_host} webhooks per receiver host"]})
    if verification.enabled():
        try:
            verification.verify(data["address"], data["topic"])
        except (verification.Failed, guard.Refused) as failure:
            raise toolkit.ValidationError({"address": [str(failure)]})
    user_id, token_id = _bound_reader(context)
    hook = Webhook(
        id=ids.new_hook_id(),
        topic=data["topic"],
        address=data["address"],
        host=host,
        **filters,
        secret=data.get("secret"),
        user_id=user_id,
        token_id=token_id,
        created=utcnow(),
    )
    session.add(hook)
    try:
        session.commit()
    except IntegrityError:  # the same hook registered concurrently
        session.rollback()
        raise toolkit.ValidationError({"address": [DUPLICATE]})
    return hook.id


def _bound_reader(context) -> tuple[Optional[str], Optional[str]]:
    """(user id, API token id) whose view a new hook gets; (None, None) for anonymous.

    Through the action API, a logged-in caller binds the hook with an API
    token (remembered: revoking it makes the hook anonymous) or, with the
    session cookie, only with CKAN's CSRF token (checked by the auth function).
    """
    user = context.get("auth_user_obj")
    if user is None or not getattr(user, "id", None):
        return None, None
    token_id = _request_token_id()
    token = model.Session.get(model.ApiToken, token_id) if token_id else None
    return user.id, (token.id if token is not None and token.user_id == user.id else None)


def _request_token_id() -> Optional[str]:
    """The id (jti) of the API token this request was authenticated with, if any."""
    from flask import g, has_request_context
    if not has_request_context() or not g.get("login_via_auth_header"):
        return None
    raw = toolkit.request.headers.get(toolkit.config.get("apitoken_header_name")
                                      or "Authorization", "")
    if not raw:
        return None
    from ckan.lib import api_token
    from ckan.plugins import PluginImplementations
    from ckan.plugins.interfaces import IApiToken
    data = api_token.decode(str(raw))
    for plugin in reversed(list(PluginImplementations(IApiToken))):
        if not data:
            break
        data = plugin.preprocess_api_token(data)
    return (data or {}).get("jti")


def _reader(hook: Webhook) -> Optional[str]:
    """The user name whose view the hook gets, or None for anonymous."""
    if not hook.user_id:
        return None
    if hook.token_id and model.Session.get(model.ApiToken, hook.token_id) is None:
        return None  # its token was revoked: public data only
    user = model.Session.get(model.User, hook.user_id)
    return user.name if user is not None else None


@toolkit.side_effect_free
def webhook_show(context, data_dict):
    """Show a webhook and its delivery statistics.

    :param id: the webhook's id, as returned by ``webhook_create``
    :type id: string

    :returns: the webhook: ``id``, ``topic``, ``address``, ``created``,
        ``signed`` (whether deliveries are signed; the secret is never shown),
        ``reader`` (the name of the user whose view of the portal the hook
        gets, or null: anonymous, public data only),
        ``filters`` (``dataset``, ``organization``, ``group`` ids or null)
        and ``statistics`` (``deliveries``, ``successes``, ``last_delivery``,
        ``last_status``, ``last_error``, ``consecutive_failures``,
        ``consecutive_4xx``, ``failing_since``, ``pending_deliveries``)
    :rtype: dictionary
    """
    toolkit.check_access("webhook_show", context, data_dict)
    data = _validate(data_dict, schema.webhook_id_schema(), context)
    return _dictize(_get(data["id"]))


def webhook_delete(context, data_dict):
    """Delete a webhook. Deliveries not yet sent are dropped.

    :param id: the webhook's id, as returned by ``webhook_create``
    :type id: string
    """
    toolkit.check_access("webhook_delete", context, data_dict)
    data = _validate(data_dict, schema.webhook_id_schema(), context)
    hook = _get(data["id"])
    model.Session.delete(hook)
    model.Session.commit()


@toolkit.side_effect_free
def webhook_list(context, data_dict):
    """List webhooks (sysadmins only; there is no public list).

    :param topic: only hooks of this topic (optional)
    :type topic: string
    :param host: only hooks whose address is on this host (optional)
    :type host: string
    :param state: ``healthy`` (no failure since the last success) or
        ``failing`` (optional)
    :type state: string
    :param sort: ``created`` (default), ``topic``, ``host``, ``deliveries``,
        ``success_rate``, ``last_delivery``, ``last_status`` or
        ``consecutive_failures``
    :type sort: string
    :param descending: sort in descending order (optional, default false)
    :type descending: bool
    :param limit: at most this many (optional, default 100, at most 1000)
    :type limit: int
    :param offset: skip this many (optional)
    :type offset: int

    :returns: webhooks as ``webhook_show`` shows them
    :rtype: list of dictionaries
    """
    toolkit.check_access("webhook_list", context, data_dict)
    data = _validate(data_dict, schema.webhook_list_schema(), context)
    query = report.hooks(data.get("topic"), data.get("host"), data.get("state"),
                         data.get("sort", "created"), data.get("descending", False))
    query = query.offset(data.get("offset", 0)).limit(min(data.get("limit", 100), 1000))
    return [_dictize(hook) for hook in query]


@toolkit.side_effect_free
def webhook_activity(context, data_dict):
    """Delivery totals and hourly activity of all webhooks (sysadmins only).

    :param days: how many days of hourly activity (optional, default 7, 1 to 90)
    :type days: int

    :returns: ``totals`` (``hooks``, ``failing``, ``pending``,
        ``events_waiting``, ``attempts_24h``, ``successes_24h``,
        ``success_rate_24h``, ``by_topic``) and ``hours``: one entry per hour,
        oldest first, with ``hour`` (ISO 8601, UTC), ``attempts`` and
        ``successes`` (pings excluded)
    :rtype: dictionary
    """
    toolkit.check_access("webhook_activity", context, data_dict)
    data = _validate(data_dict, schema.webhook_activity_schema(), context)
    return {"totals": report.totals(), "hours": report.hourly_activity(data.get("days", 7))}


def webhook_redeliver_failed(context, data_dict):
    """Queue again every delivery that failed since a time and has not
    succeeded since (sysadmins only), with original event ids and payloads.

    :param since: ISO 8601 time (UTC unless it says otherwise)
    :type since: string
    :param id: only this webhook's failures (optional)
    :type id: string

    :returns: ``queued``: how many deliveries were queued
    :rtype: dictionary
    """
    toolkit.check_access("webhook_redeliver_failed", context, data_dict)
    data = _validate(data_dict, schema.webhook_redeliver_failed_schema(), context)
    failed = report.failed_deliveries(data["since"], data.get("id"))
    requeue(failed)
    return {"queued": len(failed)}


@toolkit.side_effect_free
def webhook_deliveries(context, data_dict):
    """The recent delivery attempts of a webhook, newest first (the log is
    kept for ``ckanext.webhooks.log_retention_days``).

    :param id: the webhook's id
    :type id: string
    :param limit: at most this many (optional, default 20, at most 1000)
    :type limit: int
    :param offset: skip this many (optional)
    :type offset: int

    :returns: attempts: ``event_id``, ``topic``, ``at``, ``attempt`` (1 for a
        first attempt), ``status`` (HTTP status or null), ``error`` (``timeout``,
        ``connect_error``, ``connection_error``, ``tls_error``,
        ``refused_address``, ``dns_error``, ``internal_error`` or null),
        ``duration_ms`` and ``response`` (the
        first 20 KB of the answer)
    :rtype: list of dictionaries
    """
    toolkit.check_access("webhook_deliveries", context, data_dict)
    data = _validate(data_dict, schema.webhook_deliveries_schema(), context)
    hook = _get(data["id"])
    rows = model.Session.query(WebhookAttempt).filter(WebhookAttempt.hook_id == hook.id) \
        .order_by(WebhookAttempt.at.desc(), WebhookAttempt.id.desc()) \
        .offset(data.get("offset", 0)).limit(min(data.get("limit", 20), 1000))
    return [{"event_id": r.event_id, "topic": r.topic, "at": r.at.isoformat(),
             "attempt": r.attempt, "status": r.status, "error": r.error,
             "duration_ms": r.duration_ms, "response": r.response} for r in rows]


def webhook_ping(context, data_dict):
    """Send a ``ping`` event to the webhook now and report how it went.

    The ping is signed like any delivery and recorded in the delivery log; it
    does not count towards pruning.

    :param id: the webhook's id
    :type id: string

    :returns: ``event_id``, ``ok``, ``status`` (HTTP status or null),
        ``error`` (error kind or null) and ``duration_ms``
    :rtype: dictionary
    """
    toolkit.check_access("webhook_ping", context, data_dict)
    data = _validate(data_dict, schema.webhook_id_schema(), context)
    hook = _get(data["id"])
    event_id = ids.new_event_id()
    envelope = payload.event_envelope(
        _Ping(event_id), json.dumps({"id": hook.id, "topic": hook.topic}))
    body = payload.body_for(envelope, hook.id)
    # The sender resolves and checks the address (refused_address, or a
    # dns_error when the name does not resolve now) and signs right before sending.
    outcome = web_sender().post(Request(hook.address, body.encode("utf-8"), event_id,
                                        signing.secrets_of(hook.secret)))
    log_attempts([attempt_row(hook.id, event_id, "ping", 1, outcome)])
    model.Session.commit()
    return {"event_id": event_id, "ok": outcome.ok, "status": outcome.status,
            "error": outcome.error, "duration_ms": int(outcome.duration * 1000)}


def webhook_redeliver(context, data_dict):
    """Send one past event to the webhook again, with its original event id
    (``webhook-id``) and payload. Queued now; the delivery log shows it.

    :param id: the webhook's id
    :type id: string
    :param event_id: the ``event_id`` of a past delivery to this webhook
    :type event_id: string
    """
    toolkit.check_access("webhook_redeliver", context, data_dict)
    data = _validate(data_dict, schema.webhook_redeliver_schema(), context)
    hook = _get(data["id"])
    was_sent = model.Session.query(WebhookAttempt.id).filter_by(
        hook_id=hook.id, event_id=data["event_id"]).first()
    event = model.Session.get(WebhookEvent, data["event_id"])
    if not was_sent or event is None:
        raise toolkit.ObjectNotFound("No such past delivery for this webhook")
    requeue([(hook.id, event.id)])


class _Ping:
    """What the payload envelope needs to know of a ping."""

    topic = "ping"

    def __init__(self, event_id: str) -> None:
        self.id = event_id
        self.created = utcnow()


if not toolkit.check_ckan_version(min_version="2.12"):
    # CKAN 2.11 writes an organization's bulk actions with one SQL UPDATE that
    # IDomainObjectModification never sees (2.12 runs them through
    # package_patch): record their events here, in the same transaction.
    from ..capture import record_bulk_change

    def _bulk(name: str, change: dict[str, Any]):
        @toolkit.chained_action
        def bulk_action(up_func, context, data_dict):
            toolkit.check_access(name, context, data_dict)
            record_bulk_change(data_dict.get("datasets") or [], data_dict.get("org_id"),
                               change)
            try:
                return up_func(context, data_dict)  # commits the events with the change
            except Exception:
                model.Session.rollback()
                raise
        bulk_action.__name__ = bulk_action.__qualname__ = name
        return bulk_action

    bulk_update_public = _bulk("bulk_update_public", {"private": False})
    bulk_update_private = _bulk("bulk_update_private", {"private": True})
    bulk_update_delete = _bulk("bulk_update_delete", {"state": "deleted"})
