"""The Celery app: its configuration from the CKAN ini, the task base class
that gives every task a CKAN app context, and the messages that wake workers
(the tasks are in :mod:`tasks`, the worker process in :mod:`worker`).

Celery messages only wake workers up (and the workers' own outbox listener,
:mod:`listener`, is what publishes them); the durable state lives in the
database (``webhooks_event`` and ``webhooks_delivery``), so tasks are acked on
receipt and no message ever waits in the broker for a retry (a Redis broker
would redeliver it after its visibility timeout and multiply it).
"""
from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task

from ckan import model
from ckan.plugins import toolkit

from . import settings

log = logging.getLogger(__name__)

FANOUT = "ckanext.webhooks.fanout"
DRAIN = "ckanext.webhooks.drain"
SWEEP = "ckanext.webhooks.sweep"
PRUNE = "ckanext.webhooks.prune"


class CKANTask(Task):
    """Runs each task inside a CKAN request context, with a fresh DB session.

    The session keeps one connection for the whole task: a task commits several
    times, and every checkout from CKAN's pool costs a ping round trip.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with _flask_app().test_request_context(), model.meta.engine.connect() as connection:
            model.Session(bind=connection)
            try:
                return super().__call__(*args, **kwargs)
            finally:
                model.Session.remove()


celery = Celery("ckanext.webhooks", task_cls=CKANTask, set_as_current=False)
_flask = None


def use_flask_app(app: Any) -> None:
    """The CKAN app whose context tasks run in (the worker command's own)."""
    global _flask
    _flask = app


def _flask_app():
    global _flask
    if _flask is None:
        from ckan.config.middleware import make_app
        _flask = make_app(toolkit.config)
    return getattr(_flask, "_wsgi_app", _flask)


def queue_name() -> str:
    return settings.queue_name()


def configure(config: Any) -> None:
    """Configure the Celery app from the CKAN config (web and worker alike)."""
    broker = (settings.broker_url(config)
              or config.get("ckan.redis.url") or "redis://127.0.0.1:6379/0")
    queue = settings.queue_name(config)
    transport_options: dict[str, Any] = {}
    if broker.startswith(("redis://", "rediss://")):
        # Fail fast when Redis is away: the outbox keeps the events meanwhile.
        transport_options = {"socket_connect_timeout": 2, "socket_timeout": 10,
                             "visibility_timeout": 3600}
    celery.conf.update(
        broker_url=broker,
        broker_transport_options=transport_options,
        broker_connection_timeout=2,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        task_default_queue=queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=False,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        beat_schedule={
            "webhooks-sweep": {
                "task": SWEEP,
                "schedule": settings.sweep_interval(config),
            },
            "webhooks-prune": {
                "task": PRUNE,
                "schedule": settings.prune_interval(config),
            },
        },
    )


def send_fanout() -> None:
    """Ask a worker to fan out pending events; raises quickly when the broker is away."""
    celery.send_task(FANOUT, queue=queue_name(), retry=False)


def send_drain(count: int = 1) -> None:
    for _ in range(count):
        celery.send_task(DRAIN, queue=queue_name(), retry=False)
