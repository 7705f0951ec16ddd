"""The delivery log, webhook_ping and webhook_redeliver, against a live CKAN,
the suite's worker and a real receiver."""
from __future__ import annotations

import base64
import functools
import os
import uuid

import ckanapi
import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook as StandardWebhook

from ckan import model

from . import processes
from .waiting import until

pytestmark = pytest.mark.usefixtures("no_leftover_hooks")

_wait = functools.partial(until, timeout=15.0)


@pytest.mark.usefixtures("worker")
def test_log_ping_and_redeliver(live_ckan, receiver, sysadmin_token, organization):
    anon = ckanapi.RemoteCKAN(live_ckan)
    admin = ckanapi.RemoteCKAN(live_ckan, apikey=sysadmin_token["token"])
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    receiver.scripts["/log"] = [500, 200]
    receiver.delay_for["/log"] = 0.3  # each answer: the log measures it
    hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/log"),
                                      secret=secret)
    dataset = admin.action.package_create(name=f"ds-{uuid.uuid4().hex[:10]}",
                                          owner_org=organization["id"])
    failed, delivered = receiver.wait_count("/log", 2, timeout=20)

    log = _wait(lambda: (lambda rows: rows if len(rows) == 2 else None)(
        anon.action.webhook_deliveries(id=hook)), what="both attempts in the log")
    newest, oldest = log
    assert (oldest["attempt"], oldest["status"], newest["attempt"], newest["status"]) \
        == (1, 500, 2, 200)
    assert {row["event_id"] for row in log} == {delivered.json["event_id"]}
    assert newest["topic"] == "dataset/create" and '"ok": true' in newest["response"]
    assert newest["duration_ms"] >= 300 and oldest["duration_ms"] >= 300 and newest["at"]
    assert len(anon.action.webhook_deliveries(id=hook, limit=1)) == 1
    assert anon.action.webhook_deliveries(id=hook, offset=2) == []

    ping = anon.action.webhook_ping(id=hook)
    assert ping["ok"] is True and ping["status"] == 200 and ping["error"] is None
    [pinged] = [r for r in receiver.on("/log") if r.json["topic"] == "ping"]
    assert pinged.json["event_id"] == ping["event_id"] and pinged.json["webhook_id"] == hook
    StandardWebhook(secret).verify(pinged.body, pinged.headers)
    assert anon.action.webhook_deliveries(id=hook)[0]["topic"] == "ping"
    stats = anon.action.webhook_show(id=hook)["statistics"]
    assert stats["deliveries"] == 2  # a ping is not counted as a delivery

    anon.action.webhook_redeliver(id=hook, event_id=delivered.json["event_id"])
    again = _wait(lambda: [r for r in receiver.on("/log")
                           if r.json["event_id"] == delivered.json["event_id"]][2:],
                  what="the redelivery")
    assert again[0].json["data"] == delivered.json["data"]
    assert again[0].headers["webhook-id"] == delivered.headers["webhook-id"]
    assert again[0].json["data"]["id"] == dataset["id"]

    with pytest.raises(ckanapi.NotFound):
        anon.action.webhook_redeliver(id=hook, event_id="msg_" + "0" * 32)
    with pytest.raises(ckanapi.NotFound):
        anon.action.webhook_deliveries(id="x" * 43)
    with pytest.raises(ckanapi.NotFound):
        anon.action.webhook_ping(id="x" * 43)
    with pytest.raises(ckanapi.ValidationError):
        anon.action.webhook_deliveries(id=hook, limit=-1)


def test_ping_of_a_refused_address_contacts_nothing(live_ckan, receiver):
    from .receiver import Receiver
    loopback = Receiver(host="127.0.0.1").start()
    hook_id = f"hook-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO webhooks (id, topics, address, host, site, created)
            VALUES (:id, ARRAY['dataset/create'], :address, '127.0.0.1', '127.0.0.1', now())
        """), {"id": hook_id, "address": loopback.url("/x")})
    try:
        result = ckanapi.RemoteCKAN(live_ckan).action.webhook_ping(id=hook_id)
        assert result["ok"] is False and result["error"] == "refused_address"
        assert loopback.requests == []
    finally:
        loopback.stop()


def test_old_attempts_are_pruned(live_ckan, receiver):
    anon = ckanapi.RemoteCKAN(live_ckan)
    hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/old"))
    anon.action.webhook_ping(id=hook)
    anon.action.webhook_ping(id=hook)
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("UPDATE webhooks_attempt SET at = now() - interval '31 days' "
                             "WHERE id = (SELECT min(id) FROM webhooks_attempt "
                             "WHERE hook_id = :h)"),
                     {"h": hook})
    import json
    import subprocess
    result = subprocess.run([str(processes.BIN / "ckan"), "-c", str(processes.TEST_INI),
                             "webhooks", "prune"], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1])["old_attempts"] >= 1
    assert len(anon.action.webhook_deliveries(id=hook)) == 1
