"""End to end: a real CKAN server, a real Celery worker on a real Redis broker,
real HTTP receivers on 127.0.0.2, driven through ckanapi as real clients."""
from __future__ import annotations

import json
import functools
import time
import uuid
from pathlib import Path

import ckanapi
import jsonschema
import pytest
import sqlalchemy as sa

from ckan import model
from ckan.plugins import toolkit

from . import processes
from .waiting import settled, until

SCHEMA = json.loads((Path(__file__).parents[1] / "schemas" / "payload.schema.json").read_text())

pytestmark = pytest.mark.usefixtures("no_leftover_hooks")


def _name(prefix: str = "ds") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"




def _validate(received) -> dict:
    body = received.json
    jsonschema.validate(body, SCHEMA, format_checker=jsonschema.FormatChecker())
    assert received.headers["content-type"] == "application/json"
    assert received.headers["user-agent"].startswith("ckanext-webhooks/")
    assert received.headers["webhook-id"] == body["event_id"]
    assert abs(int(received.headers["webhook-timestamp"]) - time.time()) < 60
    return body


@pytest.mark.usefixtures("worker")
class TestDelivery:
    def test_dataset_create_reaches_the_receiver(self, anon, admin, receiver, organization):
        hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/c"))
        dataset = admin.action.package_create(name=_name(), owner_org=organization["id"],
                                              resources=[{"url": "http://a.test/x.csv"}])
        [received] = receiver.wait_count("/c", 1)
        body = _validate(received)
        assert body["webhook_id"] == hook
        assert body["topic"] == "dataset/create"
        assert body["site_url"] == toolkit.config["ckan.site_url"]
        assert body["data"]["id"] == dataset["id"]
        assert body["data"]["name"] == dataset["name"]
        assert [r["url"] for r in body["data"]["resources"]] == ["http://a.test/x.csv"]
        # Statistics follow the delivery.
        def recorded():
            stats = anon.action.webhook_show(id=hook)["statistics"]
            return stats if stats["deliveries"] >= 1 else None
        stats = until(recorded, 10, "the delivery in the hook's statistics")
        assert stats["successes"] == 1 and stats["last_status"] == 200
        assert stats["consecutive_failures"] == 0 and stats["last_delivery"]

    def test_each_of_the_six_topics(self, anon, admin, receiver, organization):
        topics = ["dataset/create", "dataset/update", "dataset/delete",
                  "resource/create", "resource/update", "resource/delete"]
        hooks = {"/" + topic: anon.action.webhook_create(topic=topic,
                                                         address=receiver.url("/" + topic))
                 for topic in topics}
        expected: dict = {}

        def then_expect(**arrivals):
            # Each change is awaited before the next: an update fanned out
            # after the dataset was deleted is (rightly) withheld from readers
            # who can no longer see it.
            for topic, count in arrivals.items():
                path = "/" + topic.replace("_", "/", 1)
                expected[path] = expected.get(path, 0) + count
            receiver.wait_for(lambda rs: all(
                sum(r.path == p for r in rs) >= n for p, n in expected.items()))

        dataset = admin.action.package_create(name=_name(), owner_org=organization["id"])
        then_expect(dataset_create=1)
        admin.action.package_patch(id=dataset["id"], title="Changed")
        then_expect(dataset_update=1)
        resource = admin.action.resource_create(package_id=dataset["id"], url="http://a.test/r")
        then_expect(resource_create=1, dataset_update=1)
        admin.action.resource_patch(id=resource["id"], name="renamed")
        then_expect(resource_update=1, dataset_update=1)
        admin.action.resource_delete(id=resource["id"])
        then_expect(resource_delete=1, dataset_update=1)
        admin.action.package_delete(id=dataset["id"])
        then_expect(dataset_delete=1)
        # Nothing more can arrive: every event of the dataset is settled, and
        # each hook's log holds what its receiver got.
        settled(packages=[dataset["id"]])
        for path, count in expected.items():
            bodies = [_validate(r) for r in receiver.on(path)]
            assert len(bodies) == count, (path, len(bodies))
            assert _logged(hooks[path]) == count, path
            assert {b["topic"] for b in bodies} == {path[1:]}
        assert receiver.on("/resource/update")[0].json["data"]["name"] == "renamed"
        assert receiver.on("/resource/delete")[0].json["data"]["id"] == resource["id"]
        deleted = receiver.on("/dataset/delete")[0].json
        assert deleted["data"] == {"id": dataset["id"], "name": dataset["name"]}
        assert deleted["reason"] == "deleted"
        event_ids = [r.json["event_id"] for r in receiver.requests]
        assert len(event_ids) == len(set(event_ids))

    def test_404_five_times_pauses_the_hook(self, anon, admin, receiver, organization):
        receiver.scripts["/missing"] = [404]
        hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/missing"))
        other = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/fine"))
        for n in range(4):
            admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_count("/missing", 4)
        _wait_until(lambda: anon.action.webhook_show(id=hook)["statistics"]["deliveries"] == 4)
        stats = anon.action.webhook_show(id=hook)["statistics"]
        assert stats["consecutive_4xx"] == 4
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_count("/missing", 5)
        _wait_until(lambda: anon.action.webhook_show(id=hook)["state"] == "paused")
        shown = anon.action.webhook_show(id=hook)
        assert shown["active"] is False and shown["paused"]["by"] == "rule"
        assert "4xx 5 times" in shown["paused"]["reason"]
        # Paused: the next event reaches the other hook, and nothing is
        # queued or attempted for this one (its log still holds 5 attempts).
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        _wait_until(lambda: anon.action.webhook_show(id=other)["statistics"]["successes"] == 6)
        assert len(anon.action.webhook_deliveries(id=hook)) == 5
        assert anon.action.webhook_show(id=hook)["statistics"]["pending_deliveries"] == 0
        assert len(receiver.on("/missing")) == 5  # 4xx are not retried

    def test_410_prunes_the_hook_at_once(self, anon, admin, receiver, organization):
        receiver.scripts["/gone"] = [410]
        hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/gone"))
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_count("/gone", 1)
        _wait_gone(anon, hook)

    def test_private_datasets_are_not_delivered_to_anonymous_hooks(
            self, anon, admin, receiver, organization):
        hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/pub"))
        private = admin.action.package_create(name=_name(), owner_org=organization["id"],
                                              private=True)
        public = admin.action.package_create(name=_name(), owner_org=organization["id"])
        # Both creations are settled (the private one fanned out to nobody):
        # the hook's log is final.
        assert len(settled(packages=[private["id"], public["id"]])) == 2
        assert [r.json["data"]["id"] for r in receiver.on("/pub")] == [public["id"]]
        assert _logged(hook) == 1


_wait_until = functools.partial(until, timeout=15.0, interval=0.1)


def _wait_gone(client, hook: str, timeout: float = 15.0) -> None:
    def gone():
        try:
            client.action.webhook_show(id=hook)
        except ckanapi.NotFound:
            return True
        return False
    until(gone, timeout, "the hook was not pruned")


def _logged(hook_id: str) -> int:
    """Attempts in the hook's delivery log."""
    with model.meta.engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM webhooks_attempt WHERE hook_id = :h"),
                            {"h": hook_id}).scalar_one()


def _waiting_in_the_outbox(dataset_ids) -> tuple[int, int]:
    """How many events the datasets have, and how many of them are not fanned out."""
    with model.meta.engine.connect() as conn:
        return tuple(conn.execute(sa.text(
            "SELECT count(*), count(*) FILTER (WHERE fanned_out IS NULL) FROM webhooks_event "
            "WHERE package_id = ANY(:d)"), {"d": list(dataset_ids)}).one())


@pytest.mark.usefixtures("worker")
def test_rollback_sends_nothing(with_plugins, receiver, organization, live_ckan):
    """A change rolled back in the writer's transaction is never announced."""
    from ckan.tests import factories
    anon = ckanapi.RemoteCKAN(live_ckan)
    hook = anon.action.webhook_create(topic="dataset/update", address=receiver.url("/rb"))
    dataset = factories.Dataset(owner_org=organization["id"])
    package = model.Package.get(dataset["id"])
    package.title = "rolled back"
    model.Session.flush()
    model.Session.rollback()
    package = model.Package.get(dataset["id"])
    package.title = "committed"
    model.Session.commit()
    [received] = receiver.wait_count("/rb", 1)
    assert received.json["data"]["title"] == "committed"
    # The rolled-back change left no event: the dataset's one update is the
    # committed one, settled.
    settled(packages=[dataset["id"]])
    with model.meta.engine.connect() as conn:
        updates = conn.execute(sa.text(
            "SELECT count(*) FROM webhooks_event WHERE package_id = :d "
            "AND topic = 'dataset/update'"), {"d": dataset["id"]}).scalar_one()
    assert updates == 1
    assert len(receiver.on("/rb")) == 1 and _logged(hook) == 1


def test_broker_down_while_writing_loses_nothing(webhooks_tables, only_my_workers, receiver,
                                                 sysadmin_token, organization):
    """Redis (the broker) stops while datasets are written: CKAN writes still
    succeed, and every event is delivered once the broker is back."""
    redis_port = processes.free_port()
    web_port = processes.free_port()
    ini = processes.write_ini({
        "ckanext.webhooks.broker_url": f"redis://127.0.0.1:{redis_port}/0",
        "ckanext.webhooks.celery.queue": f"broker-down-{redis_port}",
        "ckan.site_url": f"http://127.0.0.1:{web_port}",
    })
    broker = processes.start_redis(redis_port)
    web = processes.start_ckan(ini, web_port)
    worker = processes.start_worker(ini, concurrency=1, name="worker-broker-down")
    try:
        url = f"http://127.0.0.1:{web_port}"
        anon = ckanapi.RemoteCKAN(url)
        admin = ckanapi.RemoteCKAN(url, apikey=sysadmin_token["token"])
        anon.action.webhook_create(topic="dataset/create", address=receiver.url("/bd"))
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_count("/bd", 1)

        broker.stop()
        written = []
        for _ in range(5):
            started = time.monotonic()
            written.append(admin.action.package_create(name=_name(),
                                                       owner_org=organization["id"])["id"])
            assert time.monotonic() - started < 5, "a write waited for the broker"
        # The outage is real: the worker lost the broker, and the five events
        # wait in the outbox, none fanned out.
        until(lambda: "Connection to broker lost" in worker.output(), 30,
              "the worker noticed the broker's outage")
        assert _waiting_in_the_outbox(written) == (5, 5)
        assert len(receiver.on("/bd")) == 1

        broker = processes.start_redis(redis_port)
        receiver.wait_count("/bd", 6, timeout=60)
        delivered = {r.json["data"]["id"] for r in receiver.on("/bd")}
        assert set(written) <= delivered
    finally:
        worker.stop()
        web.stop()
        broker.stop()
        ini.unlink()
