"""IWebhooks, used by a plugin of the test suite's own (tests/plugin.py)."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import ckanapi
import jsonschema

from . import processes
from .test_operations import _scrape
from .waiting import settled, until

SCHEMA = json.loads((Path(__file__).parents[1] / "schemas" / "payload.schema.json").read_text())


def test_a_plugin_adds_a_topic_changes_payloads_and_vetoes(private_stack, receiver,
                                                           sysadmin_token, organization):
    metrics = processes.free_port()
    url, _, worker = private_stack({"ckan.plugins": "webhooks webhooks_test_plugin",
                               "ckanext.webhooks.metrics_port": str(metrics),
                               "ckanext.webhooks.celery.queue": f"iface-{uuid.uuid4().hex[:6]}"})
    anon = ckanapi.RemoteCKAN(url)
    admin = ckanapi.RemoteCKAN(url, apikey=sysadmin_token["token"])
    anon.action.webhook_create(topic="organization/update", address=receiver.url("/org"))
    anon.action.webhook_create(topic="organization/update", address=receiver.url("/vetoed"))
    anon.action.webhook_create(topic="dataset/create", address=receiver.url("/ds"))
    # Wildcards cover a plugin's topics too.
    anon.action.webhook_create(topic="*", address=receiver.url("/all"))
    anon.action.webhook_create(topics=["organization/*"], address=receiver.url("/orgs"))
    admin.action.organization_patch(id=organization["id"], title="Renamed organization")
    dataset = admin.action.package_create(name=f"ds-{uuid.uuid4().hex[:8]}",
                                          owner_org=organization["id"])
    [org_event] = receiver.wait_count("/org", 1)
    [ds_event] = receiver.wait_count("/ds", 1)
    receiver.wait_for(lambda rs: {r.json["topic"] for r in rs if r.path == "/all"}
                      >= {"organization/update", "dataset/create"})
    [org_star] = receiver.wait_count("/orgs", 1)
    assert org_star.json["topic"] == "organization/update"
    # Both events are settled: the vetoed hook's delivery was queued with the
    # others and dropped by the veto (withheld: no request, no attempt).
    settled(events=[org_event.json["event_id"], ds_event.json["event_id"]])
    withheld = ("ckanext_webhooks_deliveries_total",
                (("outcome", "withheld"), ("topic", "organization/update")))
    # (The metrics move right after the commit that settled them.) Scraped
    # from this worker's port: its process tree listens there, nobody else.
    until(lambda: processes.owns_port(worker.proc.pid, metrics), 30, "the worker's metrics port")
    counted = until(lambda: _scrape(metrics).get(withheld), 10, "the withheld delivery counted")
    assert counted == 1
    body = org_event.json
    jsonschema.validate(body, SCHEMA)
    assert body["topic"] == "organization/update"
    assert body["data"] == {"id": organization["id"], "name": organization["name"],
                            "title": "Renamed organization"}
    assert body["x_test_plugin"] == "seen by organization/update"
    assert ds_event.json["x_test_plugin"] == "seen by dataset/create"
    assert ds_event.json["data"]["id"] == dataset["id"]
    assert receiver.on("/vetoed") == []
