"""Running it in production: the health command's every reason, one listener
elected among several workers (one fan-out per commit, taken over when its
worker dies), and bounded storage (what the log keeps of an answer,
retention in bounded batches). Real workers, real PostgreSQL and Redis."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import functools
import uuid

import pytest
import sqlalchemy as sa

from ckan import model
from ckan.tests import factories

from . import processes
from .waiting import until
from .receiver import Receiver

pytestmark = pytest.mark.usefixtures("no_leftover_hooks")

CKAN = str(processes.BIN / "ckan")


def _sql(statement: str, **params):
    with model.meta.engine.begin() as conn:
        result = conn.execute(sa.text(statement), params)
        return result.all() if result.returns_rows else result.rowcount


def _health(ini, max_lag: float = 60) -> tuple[int, str]:
    result = subprocess.run([CKAN, "-c", str(ini), "webhooks", "health", "--max-lag",
                             str(max_lag)], capture_output=True, text=True, timeout=120)
    return result.returncode, result.stdout.strip().splitlines()[-1]


_until = functools.partial(until, timeout=30.0)


@pytest.fixture
def dataset(with_plugins, organization):
    return factories.Dataset(owner_org=organization["id"])


def _update(dataset_id: str) -> None:
    package = model.Package.get(dataset_id)
    package.notes = f"ops {uuid.uuid4().hex}"
    model.Session.commit()
    model.Session.remove()


def _hook(receiver: Receiver, path: str) -> str:
    hook_id = f"ops-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    _sql("""INSERT INTO webhooks (id, topics, address, host, site, created)
            VALUES (:id, ARRAY['dataset/update'], :address, :host, :host, now())""",
         id=hook_id, address=receiver.url(path), host=receiver.host)
    return hook_id


# --- health ---------------------------------------------------------------------------

def test_health_names_every_reason_then_recovers(private_stack, receiver):
    """With every worker stopped (the suite's frozen, heartbeats aged): no
    worker alive, an event waiting for its fan-out, a delivery waiting past
    its due time; then, the listener gone while workers beat; then a worker
    starts, works the backlog off, and health is OK."""
    _sql("UPDATE webhooks_worker SET beat = now() - interval '2 hours'")
    _sql("""INSERT INTO webhooks_worker (name, host, pid, started, beat)
            VALUES (:n, 'gone', 1, now() - interval '1 day', now() - interval '1 hour')""",
         n=f"ops-gone-{uuid.uuid4().hex[:6]}")
    hook = _hook(receiver, "/health")
    event = f"msg_ops{uuid.uuid4().hex}"
    _sql("""INSERT INTO webhooks_event (id, topic, object_id, created)
            VALUES (:e, 'dataset/update', 'gone', now() - interval '10 minutes')""", e=event)
    done = f"msg_ops{uuid.uuid4().hex}"
    _sql("""INSERT INTO webhooks_event (id, topic, object_id, created, fanned_out, data)
            VALUES (:e, 'dataset/update', 'x', now(), now(), '{"id": "x"}');
            INSERT INTO webhooks_delivery (event_id, hook_id, attempts, due)
            VALUES (:e, :h, 0, now() - interval '10 minutes')""", e=done, h=hook)
    # The health command's view: alive means a heartbeat within 3 x 10 s, wide
    # enough for a command that takes seconds to start on a loaded machine.
    ini = processes.write_ini({"ckanext.webhooks.heartbeat_seconds": "10",
                               "ckanext.webhooks.celery.queue": f"ops-{uuid.uuid4().hex[:6]}"})
    code, line = _health(ini)
    assert code == 2 and line.startswith("UNHEALTHY: ")
    # Ages as the rows were made (an hour, ten minutes), read by a command that
    # may take a while to start on a loaded machine.
    assert re.search(r"no worker alive \(last heartbeat 3[67]\d\d s ago\)", line)
    assert re.search(r"an event has waited 6\d\d s for its fan-out \(bound 60 s\)", line)
    assert re.search(r"a due delivery has waited 6\d\d s \(1 due; bound 60 s\)", line)
    # Workers beating, but none holding the listener's place.
    _sql("""INSERT INTO webhooks_worker (name, host, pid, started, beat, listener)
            VALUES ('ops-test', 'here', 1, now(), now(), false)""")
    assert "no worker listens for new events" in _health(ini)[1]
    _sql("DELETE FROM webhooks_worker WHERE name = 'ops-test'")

    _, _, worker = private_stack({"ckanext.webhooks.heartbeat_seconds": "1",
                                  "ckanext.webhooks.celery.queue":
                                      f"ops-{uuid.uuid4().hex[:6]}"}, web=False)
    seen = []
    _until(lambda: seen.append(_health(ini)) or seen[-1][0] == 0,
           what=lambda: f"health to come back (last said: {seen[-1]})")
    assert _health(ini)[1].startswith("OK: 1 worker(s) alive")
    assert _sql("SELECT fanned_out IS NOT NULL FROM webhooks_event WHERE id = :e",
                e=event) == [(True,)]
    _until(lambda: _sql("SELECT count(*) FROM webhooks_delivery WHERE event_id = :e",
                        e=done) == [(0,)], what="the due delivery to be dealt with")
    [row] = _sql("SELECT pid, listener FROM webhooks_worker WHERE beat > now() - "
                 "interval '30 seconds'")  # every other row is hours old
    assert tuple(row) == (worker.proc.pid, True)


# --- one listener among several workers ----------------------------------------------------

def test_one_listener_one_fan_out_per_commit_and_a_quick_take_over(private_stack, receiver,
                                                                   dataset):
    overrides = {"ckanext.webhooks.heartbeat_seconds": "1",
                 "ckanext.webhooks.sweep_interval": "60",  # only notifications wake them
                 "ckanext.webhooks.celery.queue": f"ops-{uuid.uuid4().hex[:6]}"}
    _, ini, first = private_stack(overrides, web=False)
    second = processes.start_worker(ini, concurrency=1, name="worker-private-2")
    try:
        _hook(receiver, "/one")
        workers = {first.proc.pid: first, second.proc.pid: second}

        def beating():
            rows = _sql("SELECT pid, listener FROM webhooks_worker "
                        "WHERE beat > now() - interval '3 seconds'")
            return rows if {r.pid for r in rows} == set(workers) else None
        rows = _until(beating, what="both workers' heartbeats")
        [leader] = [r.pid for r in rows if r.listener]
        assert _sql("SELECT pg_try_advisory_lock(:k)", k=_lock())[0][0] is False

        def wakes() -> dict[int, int]:  # fan-out tasks each listener published
            return dict(_sql("SELECT pid, wakes FROM webhooks_worker WHERE pid = ANY(:p)",
                             p=list(workers)))
        before = wakes()
        commits = 8
        for n in range(commits):
            _update(dataset["id"])
            receiver.wait_count("/one", n + 1)
        # One wake-up per commit, by the listener alone (every worker
        # listening would make one per worker), as the next heartbeats say.
        after = _until(lambda: (w := wakes())[leader] - before[leader] >= commits and w,
                       what="the listener's heartbeat")
        assert after[leader] - before[leader] == commits
        [other] = [pid for pid in workers if pid != leader]
        assert after[other] == before[other] == 0

        # The listener's worker dies: the other takes its place within
        # seconds (heartbeat 1 s; the deadline is the bound, wide enough for a
        # loaded machine).
        os.killpg(workers[leader].proc.pid, signal.SIGKILL)
        [survivor] = [pid for pid in workers if pid != leader]
        _until(lambda: _sql("SELECT listener FROM webhooks_worker WHERE pid = :p "
                            "AND beat > now() - interval '3 seconds'", p=survivor)
               == [(True,)], timeout=20, what="the take-over")
        _update(dataset["id"])
        receiver.wait_count("/one", commits + 1)
        assert "now listens for every worker" in workers[survivor].output()
    finally:
        second.stop()


def _lock() -> int:
    from ckanext.webhooks.listener import LISTENER_LOCK
    return LISTENER_LOCK


# --- bounded storage ---------------------------------------------------------------------------

def test_the_log_keeps_log_body_bytes_of_an_answer(with_plugins, monkeypatch):
    from ckan.plugins import toolkit
    from ckanext.webhooks.delivery_queue import attempt_row
    from ckanext.webhooks.sender import Outcome
    answer = b"a" * 5000 + "é".encode() * 100
    assert len(attempt_row("h", "e", "t", 1, Outcome(200, None, 0.1, body=answer))["r"]) \
        == 1024
    monkeypatch.setitem(toolkit.config, "ckanext.webhooks.log_body_bytes", "0")
    assert attempt_row("h", "e", "t", 1, Outcome(200, None, 0.1, body=answer))["r"] is None
    monkeypatch.setitem(toolkit.config, "ckanext.webhooks.log_body_bytes", "5001")
    # Cut inside a character: replaced, never an error.
    assert attempt_row("h", "e", "t", 1, Outcome(200, None, 0.1, body=answer))["r"] \
        == "a" * 5000 + "\ufffd"


def test_retention_deletes_in_bounded_batches(webhooks_tables, receiver):
    """12,000 attempts and 6,000 events past the window, beside recent ones:
    the prune command deletes all the old ones, in transactions of at most
    5,000 rows (its log counts them)."""
    hook = _hook(receiver, "/retention")
    _sql("""INSERT INTO webhooks_attempt (hook_id, event_id, topic, at, attempt, status,
                                          duration_ms)
            SELECT :h, 'msg_old' || n, 'dataset/update', now() - interval '40 days', 1, 200, 1
              FROM generate_series(1, 12000) AS n;
            INSERT INTO webhooks_attempt (hook_id, event_id, topic, at, attempt, status,
                                          duration_ms)
            VALUES (:h, 'msg_recent', 'dataset/update', now(), 1, 200, 1);
            INSERT INTO webhooks_event (id, topic, object_id, created, fanned_out)
            SELECT 'msg_oldev' || n, 'dataset/update', 'x', now() - interval '40 days',
                   now() - interval '40 days'
              FROM generate_series(1, 6000) AS n""", h=hook)
    result = subprocess.run([CKAN, "-c", str(processes.TEST_INI), "webhooks", "prune"],
                            capture_output=True, text=True, timeout=180, check=True)
    report = result.stdout.strip().splitlines()[-1]
    assert '"old_attempts": 12000' in report and '"old_events": 6000' in report
    assert _sql("SELECT count(*) FROM webhooks_attempt WHERE hook_id = :h", h=hook) == [(1,)]
    logged = result.stdout + result.stderr
    assert "deleted 12000 attempts in 3 transaction(s)" in logged
    assert "deleted 6000 events in 2 transaction(s)" in logged


# --- metrics -----------------------------------------------------------------------------------

def _scrape(port: int) -> dict[tuple, float]:
    """/metrics over HTTP, parsed by prometheus_client's own parser:
    {(sample name, sorted labels): value}."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_move_as_deliveries_happen(private_stack, receiver, dataset):
    """The worker serves its metrics on loopback; scraped before and after a
    real delivery run (2 workers' pool processes summed), the counters and
    histograms move by what happened and the database gauges say it."""
    port = processes.free_port()
    _, _, worker = private_stack({
        "ckanext.webhooks.metrics_port": str(port),
        "ckanext.webhooks.retry_schedule": "0 60 60",
        "ckanext.webhooks.celery.queue": f"ops-{uuid.uuid4().hex[:6]}"}, web=False)
    ok, failing = _hook(receiver, "/ok"), _hook(receiver, "/down")
    receiver.scripts["/down"] = [503]
    # What is scraped is this worker's: it (its process tree) listens there, nobody else.
    _until(lambda: processes.owns_port(worker.proc.pid, port), what="the worker's metrics port")
    before = _scrape(port)
    success = ("ckanext_webhooks_deliveries_total",
               (("outcome", "success"), ("topic", "dataset/update")))
    retry = ("ckanext_webhooks_deliveries_total",
             (("outcome", "retry"), ("topic", "dataset/update")))
    latency = ("ckanext_webhooks_commit_to_receipt_seconds_count", ())
    for n in range(3):
        _update(dataset["id"])
    receiver.wait_count("/ok", 3)
    receiver.wait_count("/down", 3)
    after = _until(lambda: (got := _scrape(port)).get(success, 0) - before.get(success, 0) >= 3
                   and got.get(retry, 0) - before.get(retry, 0) >= 3 and got,
                   what="the outcomes in the metrics")
    assert after[success] - before.get(success, 0) == 3
    assert after[retry] - before.get(retry, 0) == 3
    assert after[latency] - before.get(latency, 0) == 3
    attempts = [v for (name, labels), v in after.items()
                if name == "ckanext_webhooks_attempt_duration_seconds_count"]
    assert sum(attempts) - sum(v for (name, _), v in before.items()
                               if name == "ckanext_webhooks_attempt_duration_seconds_count") == 6
    # The database gauges: the failing hook waits for its retry, nothing is due now.
    assert after[("ckanext_webhooks_hooks", (("state", "failing"),))] >= 1
    assert after[("ckanext_webhooks_hooks", (("state", "healthy"),))] >= 1
    assert after[("ckanext_webhooks_workers_alive", ())] >= 1
    assert ("ckanext_webhooks_outbox_backlog", ()) in after
    assert ("ckanext_webhooks_deliveries_due", ()) in after
    # Loopback only, by default.
    assert f"metrics on http://127.0.0.1:{port}/metrics" in worker.output()
    for hook_id in (ok, failing):
        assert hook_id not in str(after)  # no hook id in the metrics
