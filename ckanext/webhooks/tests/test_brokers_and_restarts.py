"""Private stacks (their own CKAN server, worker and broker) for tests that
stop things: RabbitMQ as the broker, and a worker killed with a retry pending."""
from __future__ import annotations

import re
import uuid

import ckanapi
import sqlalchemy as sa

from ckan import model

from . import processes
from .waiting import until


def _name() -> str:
    return f"ds-{uuid.uuid4().hex[:12]}"


def test_rabbitmq_as_the_broker(private_stack, rabbitmq, receiver, sysadmin_token,
                                organization):
    # A long sweep interval: only the direct publish through RabbitMQ can
    # deliver within the test's time.
    url, _, worker = private_stack({"ckanext.webhooks.broker_url": rabbitmq,
                                    "ckanext.webhooks.celery.queue":
                                        f"rabbit-{uuid.uuid4().hex[:6]}",
                                    "ckanext.webhooks.sweep_interval": "300"})
    assert re.search(r"transport: +amqp://", worker.output())  # RabbitMQ, not Redis
    anon = ckanapi.RemoteCKAN(url)
    admin = ckanapi.RemoteCKAN(url, apikey=sysadmin_token["token"])
    hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/amqp"))
    datasets = [admin.action.package_create(name=_name(), owner_org=organization["id"])["id"]
                for _ in range(3)]
    received = receiver.wait_count("/amqp", 3, timeout=20)
    assert sorted(r.json["data"]["id"] for r in received) == sorted(datasets)
    assert {r.json["webhook_id"] for r in received} == {hook}


def test_pending_retry_survives_a_killed_worker(private_stack, receiver, sysadmin_token,
                                                organization):
    receiver.scripts["/retry"] = [503, 200]
    overrides = {"ckanext.webhooks.celery.queue": f"kill-{uuid.uuid4().hex[:6]}",
                 # first retry 8 s after the failure: time enough to kill the
                 # worker before it claims the retry, even on a loaded machine
                 "ckanext.webhooks.retry_schedule": "0 8 3 3"}
    url, ini, worker = private_stack(overrides)
    anon = ckanapi.RemoteCKAN(url)
    admin = ckanapi.RemoteCKAN(url, apikey=sysadmin_token["token"])
    hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/retry"))
    admin.action.package_create(name=_name(), owner_org=organization["id"])
    [first] = receiver.wait_count("/retry", 1)
    # The failure is recorded (and the retry due 3 s later): kill the worker now.
    until(lambda: anon.action.webhook_show(id=hook)["statistics"]["deliveries"] == 1, 10,
          "the failed first attempt recorded")
    worker.kill()
    with model.meta.engine.connect() as conn:
        claimed = conn.execute(sa.text(
            "SELECT count(*) FROM webhooks_delivery "
            "WHERE hook_id = :h AND claim_token IS NOT NULL"), {"h": hook}).scalar()
    assert claimed == 0 and len(receiver.on("/retry")) == 1, \
        "the retry was claimed before the kill: nothing was tested"
    stats = anon.action.webhook_show(id=hook)["statistics"]
    assert stats["pending_deliveries"] == 1 and stats["successes"] == 0
    replacement = processes.start_worker(ini, concurrency=1, name="worker-replacement")
    try:
        first, second = receiver.wait_count("/retry", 2, timeout=30)
        assert second.json["event_id"] == first.json["event_id"]
        assert second.headers["webhook-id"] == first.headers["webhook-id"]
        def recorded():
            stats = anon.action.webhook_show(id=hook)["statistics"]
            return stats if stats["pending_deliveries"] == 0 and stats["successes"] else None
        stats = until(recorded, 15, lambda: f"the retry recorded as a success: "
                      f"{anon.action.webhook_show(id=hook)['statistics']}")
        assert stats["successes"] == 1 and stats["deliveries"] == 2
    finally:
        replacement.stop()
