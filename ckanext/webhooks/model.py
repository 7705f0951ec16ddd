"""Tables of ckanext-webhooks.

``webhooks``           the subscriptions, with their delivery statistics;
``webhooks_event``     the transactional outbox: one row per captured event,
                       written in the same transaction as the change itself;
``webhooks_attempt``   the delivery log: every attempt, kept for
                       ``ckanext.webhooks.log_retention_days``;
``webhooks_rendering`` each event as each audience's reader sees it, rendered
                       once and shared by that audience's hooks;
``webhooks_worker``    each worker's heartbeat, and which one listens;
``webhooks_delivery``  the durable delivery queue: one row per (event, hook)
                       still to be delivered, first attempts and retries alike.
                       Celery messages only tell workers to drain it, so a lost
                       message, a dead worker or a restarted broker loses nothing.
"""
from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger, Boolean, Column, DateTime, ForeignKey, Index, Integer, Text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from ckan.plugins import toolkit

# The channel the outbox trigger (migration 01) notifies when events commit;
# the workers' listener LISTENs on it.
NOTIFY_CHANNEL = "ckanext_webhooks_events"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Webhook(toolkit.BaseModel):
    __tablename__ = "webhooks"

    id = Column(Text, primary_key=True)
    # The topics it hears; ``dataset/*``, ``resource/*`` and ``*`` are wildcards.
    topics = Column(ARRAY(Text), nullable=False)
    address = Column(Text, nullable=False)
    # The address's host, normalised: for the per-host limit and for reports.
    host = Column(Text, nullable=False)
    # Its registrable domain (or IP address): what the per-site cap counts.
    site = Column(Text, nullable=False)
    # Standard Webhooks signing secret ("whsec_..."); never shown by the API.
    secret = Column(Text, nullable=True)
    # The secret a rotation replaced: it signs beside the new one until then.
    previous_secret = Column(Text, nullable=True)
    previous_secret_until = Column(DateTime(timezone=True), nullable=True)
    # Paused: hears nothing, its pending deliveries held. pause_reason is NULL
    # when its owner paused it, else the rule that did (then deleted after a
    # grace period unless resumed).
    active = Column(Boolean, nullable=False, default=True)
    paused_at = Column(DateTime(timezone=True), nullable=True)
    pause_reason = Column(Text, nullable=True)
    # Whose read permissions apply to deliveries; NULL for anonymous hooks.
    user_id = Column(Text, nullable=True)
    # The API token it was bound through: once revoked, the hook hears as anonymous.
    token_id = Column(Text, nullable=True)
    # Optional filters: only events of this dataset / organization / group.
    dataset_id = Column(Text, nullable=True)
    organization_id = Column(Text, nullable=True)
    group_id = Column(Text, nullable=True)
    created = Column(DateTime(timezone=True), nullable=False, default=utcnow)

    # 64-bit: a busy hook passes 2^31 attempts in a few years.
    delivery_count = Column(BigInteger, nullable=False, default=0)
    success_count = Column(BigInteger, nullable=False, default=0)
    last_delivery = Column(DateTime(timezone=True), nullable=True)
    last_status = Column(Integer, nullable=True)
    last_error = Column(Text, nullable=True)
    consecutive_failures = Column(Integer, nullable=False, default=0)
    consecutive_4xx = Column(Integer, nullable=False, default=0)
    # Start of the current unbroken run of failures (stale pruning).
    failing_since = Column(DateTime(timezone=True), nullable=True)

    # Overlapping subscriptions (same address and filters, a topic in
    # common) are refused by the actions, under an advisory lock per address.
    __table_args__ = (
        Index("webhooks_host_idx", "host"),
        Index("webhooks_address_idx", "address"),
        Index("webhooks_site_idx", "site"),
        Index("webhooks_topics_idx", "topics", postgresql_using="gin"),
    )


class WebhookEvent(toolkit.BaseModel):
    __tablename__ = "webhooks_event"

    id = Column(Text, primary_key=True)
    topic = Column(Text, nullable=False)
    object_id = Column(Text, nullable=False)
    package_id = Column(Text, nullable=True)
    created = Column(DateTime(timezone=True), nullable=False, default=utcnow)
    # What was known of the entity at capture time: enough to judge who may
    # see a delete event and to describe a purged entity.
    snapshot = Column(JSONB, nullable=True)
    # The entity as the action API shows it, taken when the event is fanned out;
    # retries send exactly this.
    data = Column(JSONB, nullable=True)
    # NULL until a worker has queued a delivery for every subscribed hook.
    fanned_out = Column(DateTime(timezone=True), nullable=True)
    # Failed fan-outs; after too many the event is set aside (and reported).
    fanout_attempts = Column(Integer, nullable=False, default=0)
    set_aside = Column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        Index("webhooks_event_pending_idx", "created",
              postgresql_where=fanned_out.is_(None)),
    )


class WebhookRendering(toolkit.BaseModel):
    """An event as one audience's reader sees it (``data``), shared by all
    hooks of that audience; while rendering fails, ``due`` says when to try again."""
    __tablename__ = "webhooks_rendering"

    event_id = Column(Text, ForeignKey("webhooks_event.id", ondelete="CASCADE"),
                      primary_key=True)
    audience = Column(Text, primary_key=True)  # '' = anonymous, else a user id
    data = Column(JSONB, nullable=True)
    attempts = Column(Integer, nullable=False, default=0)
    due = Column(DateTime(timezone=True), nullable=True)
    error = Column(Text, nullable=True)


class WebhookDelivery(toolkit.BaseModel):
    __tablename__ = "webhooks_delivery"

    event_id = Column(Text, ForeignKey("webhooks_event.id", ondelete="CASCADE"),
                      primary_key=True)
    hook_id = Column(Text, ForeignKey("webhooks.id", ondelete="CASCADE"),
                     primary_key=True)
    attempts = Column(Integer, nullable=False, default=0)
    # Whose rendering it carries, and the topic and reason it is delivered as
    # (a visibility change makes an update a dataset/create or dataset/delete).
    audience = Column(Text, nullable=False, default="")
    topic = Column(Text, nullable=True)
    reason = Column(Text, nullable=True)
    # When the next attempt is due; also the lease end while a worker holds it.
    due = Column(DateTime(timezone=True), nullable=False, default=utcnow)
    # Set afresh by every claim, cleared when the outcome is recorded or the
    # work handed back: only the holder of the token may record or renew.
    claim_token = Column(Text, nullable=True)
    last_status = Column(Integer, nullable=True)
    last_error = Column(Text, nullable=True)

    __table_args__ = (
        Index("webhooks_delivery_due_idx", "due"),
        Index("webhooks_delivery_hook_idx", "hook_id"),
        Index("webhooks_delivery_claim_idx", "claim_token",
              postgresql_where=claim_token.isnot(None)),
    )


class WebhookAttempt(toolkit.BaseModel):
    __tablename__ = "webhooks_attempt"

    id = Column(BigInteger, primary_key=True, autoincrement=True)
    hook_id = Column(Text, ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False)
    event_id = Column(Text, nullable=False)
    topic = Column(Text, nullable=False)
    at = Column(DateTime(timezone=True), nullable=False, default=utcnow)
    attempt = Column(Integer, nullable=False)
    status = Column(Integer, nullable=True)
    error = Column(Text, nullable=True)
    duration_ms = Column(Integer, nullable=False)
    # The first log_body_bytes of the answer, as text.
    response = Column(Text, nullable=True)
    reason = Column(Text, nullable=True)  # of a dataset/create or dataset/delete

    __table_args__ = (
        Index("webhooks_attempt_hook_idx", "hook_id", "at"),
        Index("webhooks_attempt_at_idx", "at"),
    )


class WebhookWorker(toolkit.BaseModel):
    """A worker's heartbeat (``ckan webhooks health``)."""
    __tablename__ = "webhooks_worker"

    name = Column(Text, primary_key=True)  # its Celery node name
    host = Column(Text, nullable=False)
    pid = Column(Integer, nullable=False)
    started = Column(DateTime(timezone=True), nullable=False)
    beat = Column(DateTime(timezone=True), nullable=False)
    # The elected listener: the one worker that LISTENs for new events.
    listener = Column(Boolean, nullable=False, default=False)
    # Fan-out tasks its listener published since the worker started.
    wakes = Column(BigInteger, nullable=False, default=0)
