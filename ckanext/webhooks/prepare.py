"""What each claimed delivery sends, decided just before it is sent.

Each body is the one fan-out rendered for the delivery's own audience
(``webhooks_rendering``); the reader's access is checked again now, which can
withhold a delivery (access lost since fan-out, a token revoked, a user
blocked) but never widen one; then ``IWebhooks`` plugins may veto or change
it. A failure while preparing one delivery is that delivery's alone: it is
retried on the schedule, then given up.
"""
from __future__ import annotations

import collections
import json
import logging
import time
import traceback
from typing import Any, Optional

import sqlalchemy as sa

from ckan import model
from ckan.plugins import PluginImplementations

from . import audience, payload, topics
from .delivery_queue import Job
from .ids import fingerprint
from .interfaces import IWebhooks
from .model import WebhookEvent

log = logging.getLogger(__name__)

_events: "collections.OrderedDict[str, _DetachedEvent]" = collections.OrderedDict()
_envelopes: "collections.OrderedDict[tuple, str]" = collections.OrderedDict()


def prepare_batch(jobs: list[Job]) -> list[Job]:
    """:func:`_prepare`, with a failure of the batch as a whole (rather than of
    one delivery) confined to the batch: each of its deliveries not decided yet
    is retried on the schedule, and the drain goes on with other batches."""
    try:
        return _prepare(jobs)
    except Exception as error:  # noqa: BLE001
        _prepare_failed([job for job in jobs if job.outcome is None and job.drop is None
                         and job.prepare_error is None], error)
        return []


_failure_traces: dict[tuple, None] = {}


def _prepare_failed(jobs: list[Job], error: Exception) -> None:
    """Preparing these deliveries raised (a plugin, authorization, rendering):
    nothing was sent, and each is retried on the schedule like a failed attempt
    (not counted against its hook), then given up. Logged with the hooks'
    fingerprints, never their ids (nor addresses or secrets, scrubbed from the
    message); the traceback once per process and distinct stack."""
    model.Session.rollback()  # its read transaction may be broken: go on in a new one
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    for job in jobs:
        job.prepare_error = "internal_error"
        for secret, stand_in in ((job.hook_id, fingerprint(job.hook_id)),
                                 (job.hook.address, "<address>"), (job.hook.secret, "<secret>")):
            if secret:
                text = text.replace(secret, stand_in)
    stack = tuple((frame.filename, frame.lineno)
                  for frame in traceback.extract_tb(error.__traceback__))
    if len(_failure_traces) > 100:
        _failure_traces.clear()
    trace = ""
    if stack not in _failure_traces:
        _failure_traces[stack] = None
        trace = "\n" + "".join(traceback.format_list(traceback.extract_tb(error.__traceback__)))
    if not jobs:
        log.error("could not prepare a batch (no delivery affected): %s%s", text, trace)
        return
    log.error("could not prepare event %s for %s%s (attempt %d): %s%s", jobs[0].event_id,
              fingerprint(jobs[0].hook_id),
              f" and {len(jobs) - 1} other(s)" if len(jobs) > 1 else "",
              jobs[0].attempts, text, trace)


def _prepare(jobs: list[Job]) -> list[Job]:
    """Decide, for each claimed job, whether and what to send; returns the sendable.

    Each body is the one rendered for the delivery's own audience. Access is
    checked again now: it can withhold a delivery (access lost since fan-out,
    a token revoked, a user blocked) but never widen one.
    """
    session = model.Session
    names = audience.reader_names({job.reader_now for job in jobs
                                   if job.reader_now is not None})
    extensions = list(PluginImplementations(IWebhooks))
    sendable = []
    for job in jobs:
        try:
            hook = job.hook
            event = _event(job.event_id)
            if event is None:
                job.drop = "gone"
                continue
            job.topic = job.delivered_topic or event.topic
            job.created = event.created.timestamp() if event.created else None
            key = job.reader_now  # read with the claim
            reader = names.get(key) if key is not None else None
            if reader is None:
                job.drop = "reader_gone"
                continue
            if key != job.audience:  # its body was rendered for another reader
                job.drop = "reader_changed"
                continue
            check = _access_check(event, job.topic)
            if check is not None and not audience.may_still_read(
                    reader, key, event.id, check[0], check[1], event.package_id):
                job.drop = "not_visible"
                continue
            envelope = _envelope(event, key, job.topic, job.reason)
            if envelope is None:
                job.drop = "no_view"
                continue
            # The address is resolved and checked by the sender, at the attempt.
            job.body = payload.body_for(envelope, hook.id)
            if extensions:
                job.body = _through_plugins(extensions, job.body, hook)
                if job.body is None:
                    job.drop = "vetoed"
                    continue
            sendable.append(job)
        except Exception as error:  # noqa: BLE001 - it fails alone; the batch goes on
            _prepare_failed([job], error)
    session.rollback()  # end the read transaction before the slow part
    return sendable


def _access_check(event, topic: str) -> Optional[tuple[str, str]]:
    """What the reader must still be allowed to see for this delivery to go:
    (action, id), or None for a delete (it says no more than the reader saw)."""
    if topic in (topics.DATASET_CREATE, topics.DATASET_UPDATE):
        return ("package_show", event.package_id)
    if topic in (topics.RESOURCE_CREATE, topics.RESOURCE_UPDATE):
        return ("resource_show", event.object_id)
    if topic in topics.TOPICS or not event.package_id:
        return None
    return ("package_show", event.package_id)  # a plugin's topic about a dataset


def _through_plugins(extensions, body: str, hook) -> Optional[str]:
    """Let IWebhooks plugins veto or change one delivery; None means vetoed."""
    data = json.loads(body)
    info = {"id": hook.id, "address": hook.address, "user_id": hook.user_id,
            "topic": data["topic"]}
    for plugin in extensions:
        if plugin.webhooks_veto(data, info):
            return None
        data = plugin.webhooks_payload(data, info)
    return json.dumps(data, separators=(",", ":"), default=str)


def _event(event_id: str) -> Optional["_DetachedEvent"]:
    cached = _events.get(event_id)
    if cached is not None:
        _events.move_to_end(event_id)
        return cached
    event = model.Session.get(WebhookEvent, event_id)
    if event is None:
        return None
    return keep_event(event)


# What this process's own fan-out just read and rendered, so that the
# deliveries it sends right after need not read them back. A rendering is
# kept for a second at most: a fan-out rolled back and done again elsewhere
# stores its own.
KEPT_SECONDS = 1.0
_kept_renderings: "collections.OrderedDict[tuple[str, str], tuple[Any, float]]" = \
    collections.OrderedDict()


def keep_event(event: WebhookEvent) -> "_DetachedEvent":
    _events[event.id] = detached = _DetachedEvent(event)
    _events.move_to_end(event.id)
    while len(_events) > 256:
        _events.popitem(last=False)
    return detached


def keep_rendering(event_id: str, key: str, data: Any) -> None:
    """The rendering just stored for (event, audience), as reading it back
    from ``webhooks_rendering`` would return it (its keys in jsonb's order)."""
    _kept_renderings[(event_id, key)] = (_as_jsonb(json.loads(json.dumps(data, default=str))),
                                         time.monotonic() + KEPT_SECONDS)
    _kept_renderings.move_to_end((event_id, key))
    while len(_kept_renderings) > 256:
        _kept_renderings.popitem(last=False)


def forget(event_id: str) -> None:
    """The fan-out of this event was rolled back: keep nothing of it."""
    _events.pop(event_id, None)
    for cache_key in [k for k in _kept_renderings if k[0] == event_id]:
        del _kept_renderings[cache_key]


def _as_jsonb(value: Any) -> Any:
    """``value`` with its objects' keys in the order jsonb stores them
    (shorter keys first, then by their bytes)."""
    if isinstance(value, dict):
        return {k: _as_jsonb(value[k])
                for k in sorted(value, key=lambda k: (len(k.encode()), k.encode()))}
    if isinstance(value, list):
        return [_as_jsonb(item) for item in value]
    return value


def _envelope(event: "_DetachedEvent", key: str, topic: str, reason: Optional[str]
              ) -> Optional[str]:
    """The body shared by every hook of one audience, topic and reason; None
    when the audience has no rendering of the event."""
    cache_key = (event.id, key, topic, reason)
    cached = _envelopes.get(cache_key)
    if cached is not None:
        _envelopes.move_to_end(cache_key)
        return cached
    data = payload.delivery_data(event, topic, lambda: _rendering(event.id, key))
    if data is None:
        return None
    envelope = payload.event_envelope(
        event, json.dumps(data, separators=(",", ":"), default=str), topic, reason)
    _envelopes[cache_key] = envelope
    while len(_envelopes) > 256:
        _envelopes.popitem(last=False)
    return envelope


def _rendering(event_id: str, key: str) -> Optional[Any]:
    """The stored rendering of an event for an audience, or None."""
    kept = _kept_renderings.pop((event_id, key), None)
    if kept is not None and kept[1] > time.monotonic():
        return kept[0]
    return model.Session.execute(sa.text(
        "SELECT data FROM webhooks_rendering WHERE event_id = :e AND audience = :a "
        "AND data IS NOT NULL"), {"e": event_id, "a": key}).scalar()


class _DetachedEvent:
    """The fields of an event that deliveries need, safe to keep in a cache."""

    def __init__(self, event: WebhookEvent) -> None:
        self.id = event.id
        self.topic = event.topic
        self.object_id = event.object_id
        self.package_id = event.package_id
        self.created = event.created
        self.snapshot = event.snapshot
        self.data = event.data
