"""The webhook actions of the CKAN action API."""
from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from ckan import model
from ckan.plugins import toolkit

from .. import guard, ids, verification
from ..model import Webhook, WebhookDelivery, utcnow
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
    data = _validate(data_dict, schema.webhook_create_schema(), context)
    session = model.Session
    filters = {"dataset_id": data.get("dataset"), "organization_id": data.get("organization"),
               "group_id": data.get("group")}
    exists = session.query(Webhook.id).filter_by(
        topic=data["topic"], address=data["address"], **filters).first()
    if exists:
        raise toolkit.ValidationError({"address": [DUPLICATE]})
    host = guard.parse(data["address"])[1]
    per_host = int(toolkit.config.get("ckanext.webhooks.max_hooks_per_host") or 100)
    if session.query(Webhook.id).filter_by(host=host).limit(per_host).count() >= per_host:
        raise toolkit.ValidationError({"address": [
            f"This portal allows at most {per_host} webhooks per receiver host"]})
    if verification.enabled():
        try:
            verification.verify(data["address"], data["topic"])
        except (verification.Failed, guard.Refused) as failure:
            raise toolkit.ValidationError({"address": [str(failure)]})
    user = context.get("auth_user_obj")
    hook = Webhook(
        id=ids.new_hook_id(),
        topic=data["topic"],
        address=data["address"],
        host=host,
        **filters,
        secret=data.get("secret"),
        user_id=user.id if user is not None and getattr(user, "id", None) else None,
        created=utcnow(),
    )
    session.add(hook)
    try:
        session.commit()
    except IntegrityError:  # the same hook registered concurrently
        session.rollback()
        raise toolkit.ValidationError({"address": [DUPLICATE]})
    return hook.id


@toolkit.side_effect_free
def webhook_show(context, data_dict):
    """Show a webhook and its delivery statistics.

    :param id: the webhook's id, as returned by ``webhook_create``
    :type id: string

    :returns: the webhook: ``id``, ``topic``, ``address``, ``created``,
        ``signed`` (whether deliveries are signed; the secret is never shown),
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
    :param limit: at most this many (optional, default 100)
    :type limit: int
    :param offset: skip this many (optional)
    :type offset: int

    :returns: webhooks as ``webhook_show`` shows them, oldest first
    :rtype: list of dictionaries
    """
    toolkit.check_access("webhook_list", context, data_dict)
    data = _validate(data_dict, schema.webhook_list_schema(), context)
    query = model.Session.query(Webhook).order_by(Webhook.created, Webhook.id)
    if data.get("topic"):
        query = query.filter(Webhook.topic == data["topic"])
    query = query.offset(data.get("offset", 0)).limit(min(data.get("limit", 100), 1000))
    return [_dictize(hook) for hook in query]
