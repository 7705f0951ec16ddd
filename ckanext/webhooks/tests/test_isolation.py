"""Fair, owned delivery on the real stack (a real worker process, receivers on
127.0.0.2 and 127.0.0.3): a name that does not resolve is retried, never
pruned as a 4xx; a hanging resolver delays only its own host; a name that
resolves to a refused address is refused at every attempt; slow receivers do
not delay healthy ones, however many they are.

Host names are answered by the test DNS stand-in: every process the suite
starts loads ``tests/netguard/sitecustomize.py``, whose ``socket.getaddrinfo``
answers names under ``.dns-standin`` from the JSON file named by
``$WEBHOOKS_DNS_STANDIN`` (set by conftest.py), read afresh at each lookup,
and refuses every other name but localhost. A test rewrites the file
(``tests/dns_standin.py``: ``answer``, ``fail`` with EAI_AGAIN or EAI_NONAME,
``hang`` until the entry changes) and the worker's resolver threads see it at
their next lookup; every lookup is logged, so a test can tell that a lookup
is still hanging. No DNS query leaves the machine.

Assertions are about the order of events (what had arrived, or not ended,
when something else happened), never about durations.
"""
from __future__ import annotations

import functools
import uuid

import pytest
import sqlalchemy as sa

from ckan import model
from ckan.tests import factories

from . import dns_standin as dns
from .receiver import Receiver, SilentHosts
from .waiting import attempt_log, until

pytestmark = pytest.mark.usefixtures("no_leftover_hooks")

FAST = {
    "ckanext.webhooks.timeout": "4",
    "ckanext.webhooks.connect_timeout": "1",
    "ckanext.webhooks.dns_timeout": "1",
    "ckanext.webhooks.lease_seconds": "8",
    "ckanext.webhooks.sweep_interval": "1",
    # Many quick retries: the tests decide when the resolver recovers.
    "ckanext.webhooks.retry_schedule": " ".join(["0"] + ["1"] * 29),
}


def _queue() -> dict:
    return {"ckanext.webhooks.celery.queue": f"isolation-{uuid.uuid4().hex[:8]}"}


@pytest.fixture
def dataset(with_plugins, organization):
    return factories.Dataset(owner_org=organization["id"])


def _update(dataset_id: str) -> None:
    package = model.Package.get(dataset_id)
    package.notes = f"isolation {uuid.uuid4().hex}"
    model.Session.commit()
    model.Session.remove()


def _add_hook(address: str, host: str, dataset_id: str = None) -> str:
    hook_id = f"iso-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO webhooks (id, topics, address, host, site, dataset_id, created)
            VALUES (:id, ARRAY['dataset/update'], :address, :host, :host, :dataset, now())
        """), {"id": hook_id, "address": address, "host": host, "dataset": dataset_id})
    return hook_id


def _at_least(count: int, hook_id: str):
    """The hook's logged attempts once there are ``count`` of them (else None)."""
    rows = attempt_log(hook_id)
    return rows if len(rows) >= count else None


def _queued(hook_id: str) -> int:
    """The hook's deliveries still in the queue (due, retrying or on the wire)."""
    with model.meta.engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM webhooks_delivery "
                                    "WHERE hook_id = :h"), {"h": hook_id}).scalar()


def _hook(hook_id: str):
    with model.meta.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT consecutive_4xx, consecutive_failures, last_error FROM webhooks "
            "WHERE id = :h"), {"h": hook_id}).first()


_wait = functools.partial(until, timeout=30.0)


def test_unresolvable_names_are_retried_and_refused_names_refused(
        private_stack, receiver, dataset, organization):
    """A name that does not resolve (EAI_NONAME, then EAI_AGAIN) while the
    dataset is updated three times: every attempt is a ``dns_error``, many
    more than ``max_consecutive_4xx``, the hook stays, and every update
    arrives once the name resolves. A name resolving to 127.0.0.1 (not an
    allowed network) is ``refused_address`` at each attempt and never
    contacted."""
    loopback = Receiver(host="127.0.0.1").start()
    flaky, evil = dns.name("flaky"), dns.name("evil")
    dns.fail(flaky, "EAI_NONAME")
    dns.answer(evil, "127.0.0.1")
    other = factories.Dataset(owner_org=organization["id"])
    _, _, worker = private_stack({**FAST, **_queue(),
                                  "ckanext.webhooks.max_consecutive_4xx": "3"}, web=False)
    flaky_hook = _add_hook(f"http://{flaky}:{receiver.port}/flaky", flaky, dataset["id"])
    evil_hook = _add_hook(f"http://{evil}:{loopback.port}/evil", evil, other["id"])
    try:
        for _ in range(3):
            _update(dataset["id"])
        for _ in range(2):
            _update(other["id"])
        _wait(lambda: _at_least(4, flaky_hook), what="four failed attempts")
        dns.fail(flaky, "EAI_AGAIN")
        failed = _wait(lambda: _at_least(8, flaky_hook), what="eight failed attempts")
        assert {(status, error) for _, status, error in failed} == {(None, "dns_error")}
        assert len({event for event, _, _ in failed}) == 3
        state = _hook(flaky_hook)
        assert state is not None and state.consecutive_4xx == 0  # never a 4xx
        assert state.last_error == "dns_error"

        dns.answer(flaky, "127.0.0.2")  # the resolver recovers
        arrived = receiver.wait_for(
            lambda rs: len({r.json["event_id"] for r in rs if r.path == "/flaky"}) >= 3,
            timeout=30)
        assert {r.headers["host"] for r in arrived} == {f"{flaky}:{receiver.port}"}
        assert {r.json["event_id"] for r in arrived} == {event for event, _, _ in failed}
        assert _hook(flaky_hook) is not None

        # The refused deliveries are settled (none left in the queue, so none
        # will be retried): the log holds every attempt there will be.
        _wait(lambda: _at_least(2, evil_hook) and not _queued(evil_hook),
              what="two refused attempts, nothing left to retry")
        refused = attempt_log(evil_hook)
        assert [(status, error) for _, status, error in refused] == \
            [(None, "refused_address")] * 2
        assert len({event for event, _, _ in refused}) == 2  # one per update, not retried
        assert loopback.requests == [] and loopback.verifications == []
        assert dns.lookups(evil), "the name was not resolved at the attempts"
        assert _hook(evil_hook).consecutive_4xx == 2
    finally:
        loopback.stop()


def test_a_hanging_resolver_delays_only_its_own_host(private_stack, receiver, dataset):
    """Three hooks on a name whose resolver hangs and four on names (and an
    address) that resolve, in one fan-out: the four arrive while the hanging
    lookup has not returned; the three fail as ``dns_error`` (the attempt's
    DNS timeout) and are retried, sharing the one hanging lookup; once the
    resolver answers, they arrive."""
    hangs, ok = dns.name("hangs"), dns.name("ok")
    dns.hang(hangs)
    dns.answer(ok, "127.0.0.2")
    _, _, worker = private_stack({**FAST, **_queue()}, web=False)
    try:
        hanging = [_add_hook(f"http://{hangs}:{receiver.port}/hang/{n}", hangs)
                   for n in range(3)]
        for n in range(3):
            _add_hook(f"http://{ok}:{receiver.port}/ok/{n}", ok)
        _add_hook(receiver.url("/ok/literal"), receiver.host)
        _update(dataset["id"])
        receiver.wait_for(lambda rs: sum(r.path.startswith("/ok/") for r in rs) >= 4,
                          timeout=30)
        assert [kind for kind, _ in dns.lookups(hangs)] == ["start"]  # still hanging
        assert not any(r.path.startswith("/hang/") for r in receiver.requests)

        _wait(lambda: all(attempt_log(h) for h in hanging), what="an attempt per hanging hook")
        assert {error for h in hanging for _, _, error in attempt_log(h)} == {"dns_error"}
        assert [kind for kind, _ in dns.lookups(hangs)] == ["start"]  # one lookup, shared

        dns.answer(hangs, "127.0.0.2")  # the resolver answers at last
        receiver.wait_for(lambda rs: len({r.path for r in rs
                                          if r.path.startswith("/hang/")}) >= 3, timeout=30)
        assert worker.alive()
    finally:
        dns.answer(hangs, "127.0.0.2")  # never leave a resolver thread hanging


def test_slow_receivers_do_not_delay_healthy_ones(private_stack, dataset):
    """Twenty hooks on a receiver that answers promptly, then 200 hooks on 40
    receivers that never answer (three times the worker's 64 slots), all in
    one fan-out: the healthy twenty arrive while every silent connection is
    still open (none has timed out), and the worker's healthy pool was never
    what held them."""
    healthy = Receiver().start()
    silent = SilentHosts(40, host="127.0.0.3")
    _, _, worker = private_stack({**FAST, **_queue(), "ckanext.webhooks.timeout": "10",
                                  "ckanext.webhooks.retry_schedule": "0"}, web=False)
    try:
        for n in range(20):
            _add_hook(healthy.url(f"/healthy/{n}"), healthy.host)
        _update(dataset["id"])  # the worker learns that this receiver answers promptly
        healthy.wait_for(lambda rs: len(rs) >= 20, timeout=30)

        for url in silent.urls():
            for n in range(5):
                _add_hook(f"{url}/{n}", silent.host)
        _update(dataset["id"])
        healthy.wait_for(lambda rs: len(rs) >= 40, timeout=30)
        assert silent.closed == 0, "healthy deliveries waited for slow ones to end"
        _wait(lambda: silent.requests, what="a slow request on the wire")
        assert worker.alive()
    finally:
        silent.close()
        healthy.stop()


def test_a_drain_busy_with_unknown_receivers_sends_a_new_events_healthy_deliveries(
        private_stack, dataset, organization):
    """One worker process (so a new event's own task waits behind its drain)
    with four batches on the wire, 200 requests to 40 receivers not heard
    from yet that never answer: one probe each holds a slot of the healthy
    pool and the rest wait for it, so the pool has no free slot. The next
    event is fanned out inside that drain, and its deliveries to a proven
    receiver are claimed and sent with it: they arrive while every silent
    connection is still open, not once a batch on the wire has ended."""
    healthy = Receiver().start()
    silent = SilentHosts(40, host="127.0.0.3")
    other = factories.Dataset(owner_org=organization["id"])
    _, _, worker = private_stack({
        **FAST, **_queue(), "ckanext.webhooks.timeout": "10",
        "ckanext.webhooks.retry_schedule": "0",
        # The silent receivers stay unknown (out of the slow lane) until they
        # time out, and their 200 deliveries take four batches.
        "ckanext.webhooks.slow_after": "30", "ckanext.webhooks.batch_size": "50"}, web=False)
    try:
        for n in range(20):
            _add_hook(healthy.url(f"/healthy/{n}"), healthy.host, dataset["id"])
        _update(dataset["id"])  # the worker learns that this receiver answers promptly
        healthy.wait_for(lambda rs: len(rs) >= 20, timeout=30)

        for url in silent.urls():
            for n in range(5):
                _add_hook(f"{url}/{n}", silent.host, other["id"])
        _update(other["id"])
        _wait(lambda: silent.requests >= 40, what="a probe on the wire to every silent receiver")
        _update(dataset["id"])
        healthy.wait_for(lambda rs: len(rs) >= 40, timeout=30)
        assert silent.closed == 0, "the healthy deliveries waited for a batch on the wire to end"
        assert silent.requests == 40, "a silent receiver got more than its probe"
        assert worker.alive()
    finally:
        silent.close()
        healthy.stop()


def test_ping_resolves_at_the_attempt(live_ckan, receiver):
    """webhook_ping goes through the same sender: a name that does not resolve
    is a ``dns_error`` (not ``refused_address``), and once it resolves the
    ping arrives, signed at its sending."""
    import base64
    import os

    import ckanapi
    from standardwebhooks.webhooks import Webhook as StandardWebhook

    from ckanext.webhooks import crypto

    host = dns.name("ping")
    dns.fail(host, "EAI_AGAIN")
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    hook_id = _add_hook(f"http://{host}:{receiver.port}/ping", host)
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("UPDATE webhooks SET secret = :s WHERE id = :h"),
                     {"s": crypto.seal(secret), "h": hook_id})  # stored encrypted
    anon = ckanapi.RemoteCKAN(live_ckan)
    failed = anon.action.webhook_ping(id=hook_id)
    assert (failed["ok"], failed["status"], failed["error"]) == (False, None, "dns_error")
    dns.answer(host, "127.0.0.2")
    pinged = anon.action.webhook_ping(id=hook_id)
    assert pinged["ok"] is True and pinged["status"] == 200
    [arrived] = receiver.on("/ping")
    assert arrived.json["event_id"] == pinged["event_id"]
    StandardWebhook(secret).verify(arrived.body, arrived.headers)
