"""Host names end to end: a real CKAN server, a real worker and a real
receiver on 127.0.0.2, with hooks whose addresses are host names.

Names are answered by the resolver stand-in of ``tests/netguard/
sitecustomize.py`` (driven by ``tests/dns_standin.py``): a process-level
stand-in for the resolver, loaded into every process the suite starts, whose
``socket.getaddrinfo`` answers names under ``.dns-standin`` from a file the
test writes, and logs each lookup with the pid that made it. No query leaves
loopback: nothing is asked of any DNS server at all. The product's own code
runs unchanged: its resolver calls ``socket.getaddrinfo``, checks every
address, and connects to the checked one.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import ckanapi
import pytest

from . import dns_standin as dns
from . import processes
from .waiting import attempt_log, settled

METADATA = "169.254.169.254"  # link-local: cloud metadata, never an allowed network

pytestmark = pytest.mark.usefixtures("no_leftover_hooks")


@pytest.fixture
def named_stack(webhooks_tables, only_my_workers):
    """(CKAN url, CKAN process, worker process) on test.ini's allowed networks
    (127.0.0.2/32 and 127.0.0.3/32)."""
    port = processes.free_port()
    ini = processes.write_ini({
        "ckan.site_url": f"http://127.0.0.1:{port}",
        "ckanext.webhooks.celery.queue": f"names-{uuid.uuid4().hex[:8]}"})
    web = processes.start_ckan(ini, port)
    try:
        worker = processes.start_worker(ini, concurrency=1, name="worker-names")
    except BaseException:
        web.stop()
        raise
    yield f"http://127.0.0.1:{port}", web, worker
    worker.stop()
    web.stop()


def _lookups(name: str) -> list[tuple[int, str]]:
    """(pid, answer) of each finished lookup of ``name``, in order, from the
    stand-in's log (``<time> <pid> start|end <name> [<answer>]``)."""
    log = Path(os.environ["WEBHOOKS_DNS_STANDIN"] + ".log")
    found = []
    for line in log.read_text().splitlines():
        _, pid, kind, looked_up, *answer = line.split(" ")
        if kind == "end" and looked_up == name:
            found.append((int(pid), answer[0] if answer else ""))
    return found


def test_a_name_is_resolved_checked_and_connected_to_and_a_rebound_name_is_refused(
        named_stack, receiver, sysadmin_token, organization):
    """Two hooks created through CKAN's API on two names, both resolving to
    the receiver's 127.0.0.2: CKAN resolves each, checks it and sends the
    handshake to the checked address (the receiver gets it, addressed to the
    name). Then one name is rebound to 169.254.169.254, and the dataset
    changes: the worker resolves both names again; the other one's delivery
    arrives (one lookup, and the request on 127.0.0.2: no second resolution
    on the way to connecting), the rebound one's is refused at delivery
    (``refused_address`` in the attempt log; the stand-in's log shows the
    worker's lookup answering the metadata address, after CKAN's), and no
    connection to it was even tried (the network guard recorded none)."""
    url, web, worker = named_stack
    kept, rebound = dns.name("receiver"), dns.name("rebound")
    for name in (kept, rebound):
        dns.answer(name, receiver.host)
    anon = ckanapi.RemoteCKAN(url)
    admin = ckanapi.RemoteCKAN(url, apikey=sysadmin_token["token"])
    dataset = admin.action.package_create(name=f"names-{uuid.uuid4().hex[:10]}",
                                          owner_org=organization["id"])
    hooks = {name: anon.action.webhook_create(
                 topic="dataset/update", dataset=dataset["id"],
                 address=f"http://{name}:{receiver.port}/{name}")
             for name in (kept, rebound)}
    # Creation: resolved by CKAN, checked, and the handshake sent to that address.
    assert sorted(v.headers["host"] for v in receiver.verifications) == \
        sorted(f"{name}:{receiver.port}" for name in (kept, rebound))
    at_creation = _lookups(rebound)
    assert at_creation and {(pid in web.pids(), answer) for pid, answer in at_creation} == \
        {(True, receiver.host)}

    dns.answer(rebound, METADATA)  # the name now points at cloud metadata
    admin.action.package_patch(id=dataset["id"], notes="changed")
    settled(packages=[dataset["id"]])

    [(event, status, error)] = attempt_log(hooks[kept])
    assert (status, error) == (200, None)
    [arrived] = receiver.on(f"/{kept}")
    assert arrived.json["event_id"] == event
    assert arrived.headers["host"] == f"{kept}:{receiver.port}"
    [(pid, answer)] = [(pid, answer) for pid, answer in _lookups(kept) if pid in worker.pids()]
    assert answer == receiver.host

    assert attempt_log(hooks[rebound]) == [(event, None, "refused_address")]
    assert receiver.on(f"/{rebound}") == []
    [(pid, answer)] = _lookups(rebound)[len(at_creation):]  # the worker's, at delivery
    assert pid in worker.pids() and answer == METADATA
    guard_log = Path(os.environ["WEBHOOKS_NETGUARD_LOG"])
    assert METADATA not in (guard_log.read_text() if guard_log.exists() else "")
