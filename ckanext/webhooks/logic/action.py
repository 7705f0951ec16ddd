"""The webhook actions of the CKAN action API."""
from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any, Optional

import sqlalchemy as sa

from ckan import model
from ckan.plugins import toolkit

from .. import crypto, guard, ids, payload, report, settings, topics, verification
from ..sender import Outcome, Request, web_sender
from ..delivery_queue import attempt_row, log_attempts, pause, requeue, resume
from ..fanout import recover
from ..model import Webhook, WebhookAttempt, WebhookDelivery, WebhookEvent, utcnow
from . import schema

log = logging.getLogger(__name__)
DUPLICATE = "A webhook for this address, these filters and one of these topics already exists"


def _validate(data_dict: dict[str, Any], schema_: dict, context: dict,
              topic_required: bool = False) -> dict[str, Any]:
    data, errors = toolkit.navl_validate(data_dict, schema_, context)
    unknown = {key: ["Unknown field"] for key in data.pop("__extras", {}) or {}}
    if "__extras" in data_dict:  # navl drops a caller's own, and every unknown field with it
        unknown["__extras"] = ["Unknown field"]
    if data.pop("__junk", None):
        errors.setdefault("__junk", ["Unexpected nested values"])
    errors.update(unknown)
    if topic_required and not ({"topic", "topics"} & (set(data) | set(errors))):
        # Reported on "topic", the field of the original API.
        errors["topic"] = [toolkit._("Missing value: give topic, or topics (a list)")]
    if errors:
        raise toolkit.ValidationError(errors)
    return data


def _get(hook_id: str, lock: bool = False) -> Webhook:
    # Always as the database has it now: a hook already in this session's
    # identity map would otherwise come back with the statistics it had then
    # (beside a pending count that is read fresh).
    hook = model.Session.get(Webhook, hook_id, with_for_update=lock or None,
                             populate_existing=True)
    if hook is None:
        raise toolkit.ObjectNotFound("Webhook not found")
    return hook


def _dictize(hook: Webhook) -> dict[str, Any]:
    iso = lambda value: value.isoformat() if value else None  # noqa: E731
    pending = model.Session.query(sa.func.count()).select_from(WebhookDelivery).filter(
        WebhookDelivery.hook_id == hook.id).scalar()
    rotating = bool(hook.previous_secret and hook.previous_secret_until
                    and hook.previous_secret_until > utcnow())
    return {
        "id": hook.id,
        "topics": list(hook.topics),
        **({"topic": hook.topics[0]} if len(hook.topics) == 1 else {}),
        "address": hook.address,
        "created": iso(hook.created),
        "signed": bool(hook.secret),
        "previous_secret_until": iso(hook.previous_secret_until) if rotating else None,
        "reader": _reader(hook),
        "active": hook.active,
        "state": "paused" if not hook.active
        else "failing" if hook.failing_since else "healthy",
        "paused": {"at": iso(hook.paused_at), "by": "owner" if not hook.pause_reason
                   else "rule", "reason": hook.pause_reason} if not hook.active else None,
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
    """Subscribe a callback address to one or more event topics.

    Anyone may call this unless ``ckanext.webhooks.minimum_auth`` says
    otherwise. When a logged-in user creates a hook, deliveries follow that
    user's read permissions; an anonymous hook only hears of public datasets.

    :param topic: one of ``dataset/create``, ``dataset/update``,
        ``dataset/delete``, ``resource/create``, ``resource/update``,
        ``resource/delete``, a topic added by a plugin, or a wildcard:
        ``dataset/*``, ``resource/*`` (every topic of that kind, those added
        later included) or ``*``
    :type topic: string
    :param topics: several of these (instead of, or as well as, ``topic``)
    :type topics: list of strings
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

    One address may hold several hooks (other filters, or topics that do not
    overlap); the same address with the same filters and a topic in common
    with an existing hook is refused. Unless the portal turned it off, the
    address is verified first: it is sent a single-use challenge that it must
    echo in a 2xx answer (see the README's "Verification handshake").

    :returns: the id of the new webhook: keep it, it is the only key to show,
        change or delete the hook (every delivery carries it too)
    :rtype: string
    """
    toolkit.check_access("webhook_create", context, data_dict)
    data = _validate(_without_csrf(data_dict), schema.webhook_create_schema(), context,
                     topic_required=True)
    chosen = _chosen_topics(data)
    session = model.Session
    filters = {"dataset_id": data.get("dataset"), "organization_id": data.get("organization"),
               "group_id": data.get("group")}
    _refuse_overlap(data["address"], filters, chosen)
    host = guard.parse(data["address"])[1]
    _check_site_limit(guard.site_of(host))
    _verify(data["address"], chosen)
    user_id, token_id = _bound_reader(context)
    _lock_address(data["address"])
    _refuse_overlap(data["address"], filters, chosen)  # again, now that it is locked
    hook = Webhook(
        id=ids.new_hook_id(),
        topics=chosen,
        address=data["address"],
        host=host,
        site=guard.site_of(host),
        **filters,
        secret=crypto.seal(data.get("secret")),
        user_id=user_id,
        token_id=token_id,
        active=True,
        created=utcnow(),
    )
    session.add(hook)
    session.commit()
    return hook.id


def webhook_update(context, data_dict):
    """Change a webhook. Only the fields given change; the id stays.

    :param id: the webhook's id, as returned by ``webhook_create``
    :type id: string
    :param address: a new address; it is verified by the handshake before
        the change takes effect, and refused as at creation
    :type address: string
    :param topics: the new topics (replacing the old ones; ``topic`` for one)
    :type topics: list of strings
    :param dataset: a new dataset filter; empty to remove it
    :type dataset: string
    :param organization: a new organization filter; empty to remove it
    :type organization: string
    :param group: a new group filter; empty to remove it
    :type group: string
    :param secret: a new signing secret: the old one goes on signing beside
        it for ``ckanext.webhooks.secret_rotation_hours`` (two signatures in
        ``webhook-signature``); empty to drop the secret (deliveries unsigned
        from now on)
    :type secret: string
    :param active: ``false`` pauses the hook (nothing is queued for it, its
        pending deliveries are held, it is never pruned while its owner keeps
        it paused); ``true`` resumes it, and its held deliveries go out
    :type active: bool

    A refused change changes nothing.

    :returns: the webhook, as ``webhook_show`` shows it
    :rtype: dictionary
    """
    toolkit.check_access("webhook_update", context, data_dict)
    data = _validate(_without_csrf(data_dict), schema.webhook_update_schema(), context)
    session = model.Session
    hook = _get(data["id"])
    chosen = _chosen_topics(data) or list(hook.topics)
    address = data.get("address", hook.address)
    filters = {"dataset_id": data.get("dataset", hook.dataset_id),
               "organization_id": data.get("organization", hook.organization_id),
               "group_id": data.get("group", hook.group_id)}
    _refuse_overlap(address, filters, chosen, except_id=hook.id)
    host = guard.parse(address)[1]
    if address != hook.address:
        if guard.site_of(host) != hook.site:
            _check_site_limit(guard.site_of(host))
        _verify(address, chosen)
    _lock_address(address)
    hook = _get(data["id"], lock=True)  # deleted or changed meanwhile?
    _refuse_overlap(address, filters, chosen, except_id=hook.id)
    hook.topics, hook.address, hook.host = chosen, address, host
    hook.site = guard.site_of(host)
    for column, value in filters.items():
        setattr(hook, column, value)
    if "secret" in data:
        _set_secret(hook, data["secret"])
    session.flush()
    if data.get("active") is False:
        pause(hook.id)
    elif data.get("active") is True:
        resume(hook.id)
    session.commit()
    session.refresh(hook)
    return _dictize(hook)


def _without_csrf(data_dict: dict[str, Any]) -> dict[str, Any]:
    field = toolkit.config.get("WTF_CSRF_FIELD_NAME") or "_csrf_token"
    return {key: value for key, value in data_dict.items() if key != field}


def _chosen_topics(data: dict[str, Any]) -> list[str]:
    chosen: list[str] = []
    for topic in (data.get("topic") or []) + (data.get("topics") or []):
        if topic not in chosen:
            chosen.append(topic)
    return chosen


def _lock_address(address: str) -> None:
    """Serialise creations and changes of hooks of one address until commit,
    so two overlapping subscriptions cannot both pass the check."""
    model.Session.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:a))"),
                          {"a": "ckanext-webhooks:" + address})


def _refuse_overlap(address: str, filters: dict, chosen: list[str],
                    except_id: Optional[str] = None) -> None:
    """The same address with the same filters and a topic in common is the
    same subscription twice: refused, without saying which hook has it."""
    rows = model.Session.query(Webhook.id, Webhook.topics).filter_by(
        address=address, **filters)
    if any(row.id != except_id and topics.overlap(chosen, row.topics) for row in rows):
        raise toolkit.ValidationError({"address": [DUPLICATE]})


def _check_site_limit(site: str) -> None:
    """At most ``max_hooks_per_host`` hooks per registrable domain (or IP)."""
    per_site = settings.max_hooks_per_host()
    if model.Session.query(Webhook.id).filter_by(site=site).limit(per_site).count() \
            >= per_site:
        raise toolkit.ValidationError({"address": [
            f"This portal allows at most {per_site} webhooks per receiver site "
            "(domain or IP address)"]})


def _verify(address: str, chosen: list[str]) -> None:
    if verification.enabled():
        try:
            verification.verify(address, chosen)
        except (verification.Failed, guard.Refused) as failure:
            raise toolkit.ValidationError({"address": [str(failure)]})


def _set_secret(hook: Webhook, secret: Optional[str]) -> None:
    """A new secret keeps the old one signing beside it for the rotation
    window; no secret (dropped) signs nothing from now on."""
    if secret is None:
        hook.secret = hook.previous_secret = hook.previous_secret_until = None
        return
    if hook.secret and secret == crypto.unseal(hook.secret):
        return
    if hook.secret:
        hook.previous_secret = hook.secret
        hook.previous_secret_until = utcnow() + dt.timedelta(
            hours=settings.secret_rotation_hours())
    hook.secret = crypto.seal(secret)


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

    :returns: the webhook: ``id``, ``topics`` (and ``topic`` when there is
        exactly one), ``address``, ``created``,
        ``signed`` (whether deliveries are signed; the secret is never shown),
        ``previous_secret_until`` (during a rotation: until when the old
        secret signs too, else null), ``active`` (false: paused), ``state``
        (``healthy``, ``failing`` or ``paused``), ``paused`` (null, or ``at``,
        ``by`` (``owner`` or ``rule``) and ``reason``: a hook paused by a
        rule is deleted ``ckanext.webhooks.pause_grace_days`` after ``at``
        unless resumed),
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
        ``duration_ms`` and ``response`` (the first
        ``ckanext.webhooks.log_body_bytes`` of the answer, 1 KB by default)
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
        _Ping(event_id), json.dumps({"id": hook.id, "topics": list(hook.topics),
                                         **({"topic": hook.topics[0]}
                                            if len(hook.topics) == 1 else {})}))
    body = payload.body_for(envelope, hook.id)
    # The sender resolves and checks the address (refused_address, or a
    # dns_error when the name does not resolve now) and signs right before sending.
    try:
        secrets = _signing_secrets(hook)
    except crypto.SecretUnreadable:  # never sent unsigned: the portal's keys are wrong
        log.error("webhook %s: its secret cannot be decrypted with the configured keys",
                  ids.fingerprint(hook.id))
        outcome = Outcome(None, "internal_error", 0.0, sent=False)
    else:
        outcome = web_sender().post(Request(hook.address, body.encode("utf-8"), event_id,
                                            secrets))
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


def _signing_secrets(hook: Webhook) -> tuple[str, ...]:
    """The new secret, and during a rotation the old one too."""
    rotating = hook.previous_secret_until is not None and hook.previous_secret_until > utcnow()
    return tuple(crypto.unseal(s) for s in (hook.secret, hook.previous_secret if rotating
                                            else None) if s)


def webhook_recover(context, data_dict):
    """Send the webhook again every event it would have received in a window:
    its topics, its filters and its reader's view as judged now, with the
    original event ids (``webhook-id``), queued oldest first. Events that
    happened while it was paused or failing are included, events from before
    it was created are not. Limited like
    ``webhook_ping``. Queued now; the delivery log shows them.

    :param id: the webhook's id
    :type id: string
    :param since: ISO 8601 time (UTC unless it says otherwise); at most
        ``ckanext.webhooks.event_retention_days`` ago
    :type since: string
    :param until: ISO 8601 time (optional, default now)
    :type until: string

    :returns: ``queued``: how many deliveries were queued
    :rtype: dictionary
    """
    toolkit.check_access("webhook_recover", context, data_dict)
    data = _validate(data_dict, schema.webhook_recover_schema(), context)
    hook = _get(data["id"])
    since, until = _aware(data["since"]), _aware(data.get("until") or utcnow())
    days = settings.event_retention_days()
    if since < utcnow() - dt.timedelta(days=days):
        raise toolkit.ValidationError({"since": [
            toolkit._("Events are kept for %g days: ask from %s on")
            % (days, (utcnow() - dt.timedelta(days=days)).isoformat(timespec="seconds"))]})
    if until < since:
        raise toolkit.ValidationError({"until": [toolkit._("Must not be before since")]})
    return {"queued": recover(hook.id, since, until)}


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


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
