"""examples/receiver.py against real deliveries from a live CKAN and worker."""
from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
import uuid

import ckanapi
import pytest

from ckanext.webhooks.ids import fingerprint

from . import processes
from .waiting import until


@pytest.fixture
def example_receiver():
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    port = processes.free_port("127.0.0.2")
    proc = processes.Process("example-receiver", [
        sys.executable, "-u", str(processes.ROOT / "examples" / "receiver.py"),
        "--host", "127.0.0.2", "--port", str(port), "--secret", secret])
    processes.wait_port(port, 15, host="127.0.0.2", proc=proc.proc)
    yield {"url": f"http://127.0.0.2:{port}", "secret": secret, "proc": proc}
    proc.stop()


def _lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]


def test_example_receiver_handles_real_deliveries(worker, live_ckan, example_receiver,
                                                  sysadmin_token, organization):
    anon = ckanapi.RemoteCKAN(live_ckan)
    admin = ckanapi.RemoteCKAN(live_ckan, apikey=sysadmin_token["token"])
    url, secret, proc = (example_receiver[k] for k in ("url", "secret", "proc"))
    # The handshake is answered by the example itself.
    hook = anon.action.webhook_create(topic="dataset/create", address=url + "/ckan",
                                      secret=secret)
    dataset = admin.action.package_create(name=f"ex-{uuid.uuid4().hex[:10]}",
                                          owner_org=organization["id"])
    [event] = until(lambda: [e for e in _lines(proc) if e.get("id") == dataset["id"]], 20,
                    lambda: f"the event printed: {proc.output()[-2000:]}")
    assert event["received"] == "dataset/create" and event["hook"] == fingerprint(hook)
    assert {"verification": "dataset/create"} in _lines(proc)

    # A retry of that delivery (same webhook-id) is acknowledged, not printed twice.
    body = json.dumps({"webhook_id": hook, "event_id": event["event_id"],
                       "topic": "dataset/create", "data": {"id": dataset["id"]}}).encode()
    from ckanext.webhooks import signing
    headers = signing.headers(event["event_id"], body.decode(), secret)
    request = urllib.request.Request(url + "/ckan", data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and response.read() == b"duplicate"
    assert len([e for e in _lines(proc) if e.get("id") == dataset["id"]]) == 1
    # A forged signature is refused.
    headers["webhook-signature"] = "v1," + base64.b64encode(b"x" * 32).decode()
    headers["webhook-id"] = "msg_" + "f" * 32
    forged = urllib.request.Request(url + "/ckan", data=body, headers=headers)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(forged, timeout=10)
    assert refused.value.code == 401
