"""Private stacks (their own CKAN server, worker and broker) for tests that
stop things: RabbitMQ as the broker, and a worker killed with a retry pending."""
from __future__ import annotations

import time
import uuid

import ckanapi

from . import processes


def _name() -> str:
    return f"ds-{uuid.uuid4().hex[:12]}"


def test_rabbitmq_as_the_broker(private_stack, rabbitmq, receiver, sysadmin_token,
                                organization):
    # A long sweep interval: only the direct publish through RabbitMQ can
    # deliver within the test's time.
    url, _, _ = private_stack({"ckanext.webhooks.broker_url": rabbitmq,
                               "ckanext.webhooks.celery.queue": f"rabbit-{uuid.uuid4().hex[:6]}",
                               "ckanext.webhooks.sweep_interval": "300"})
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
                 # first retry 3 s after the failure: time enough to kill the worker
                 "ckanext.webhooks.retry_schedule": "0 3 3 3"}
    url, ini, worker = private_stack(overrides)
    anon = ckanapi.RemoteCKAN(url)
    admin = ckanapi.RemoteCKAN(url, apikey=sysadmin_token["token"])
    hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/retry"))
    admin.action.package_create(name=_name(), owner_org=organization["id"])
    [first] = receiver.wait_count("/retry", 1)
    time.sleep(0.5)  # the failure is recorded
    worker.kill()
    assert anon.action.webhook_show(id=hook)["statistics"]["pending_deliveries"] == 1
    replacement = processes.start_worker(ini, concurrency=1, name="worker-replacement")
    try:
        first, second = receiver.wait_count("/retry", 2, timeout=30)
        assert second.json["event_id"] == first.json["event_id"]
        assert second.headers["webhook-id"] == first.headers["webhook-id"]
        time.sleep(1)
        stats = anon.action.webhook_show(id=hook)["statistics"]
        assert stats["pending_deliveries"] == 0 and stats["successes"] == 1
    finally:
        replacement.stop()
