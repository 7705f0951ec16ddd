"""Nothing lost under faults: real workers killed, brokers and PostgreSQL
restarted, receivers down or hostile. Each test runs its own workers (the
suite's shared worker is frozen meanwhile), is bounded in time and reports
the duplicates at-least-once delivery produced."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid

import pytest
import sqlalchemy as sa

from ckan import model
from ckan.tests import factories

from . import processes
from .receiver import Receiver
from .waiting import until

# Short timeouts and leases so that faults resolve within a test's time.
FAST = {
    "ckanext.webhooks.timeout": "3",
    "ckanext.webhooks.connect_timeout": "1",
    "ckanext.webhooks.lease_seconds": "6",
    "ckanext.webhooks.sweep_interval": "1",
    "ckanext.webhooks.retry_schedule": "0 1 1 1 2 2 2 2 2 2",
}

pytestmark = pytest.mark.usefixtures("no_leftover_hooks")


def _queue() -> dict:
    return {"ckanext.webhooks.celery.queue": f"chaos-{uuid.uuid4().hex[:8]}"}


def _add_hooks(receiver: Receiver, count: int, prefix: str, topic: str = "dataset/update"
               ) -> list[str]:
    """``count`` hooks straight into the table (creating them through the API
    would run the verification handshake ``count`` times: not what is tested)."""
    ids = [f"chaos-{uuid.uuid4().hex}{uuid.uuid4().hex}" for _ in range(count)]
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO webhooks (id, topics, address, host, site, created)
            SELECT id, ARRAY[:topic], :base || n, :host, :host, now()
              FROM unnest(CAST(:ids AS text[])) WITH ORDINALITY AS t(id, n)
        """), {"ids": ids, "topic": topic, "base": receiver.url(f"{prefix}/"),
               "host": receiver.host})
    return ids


def _pending() -> int:
    with model.meta.engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM webhooks_delivery")).scalar()


def _drained(timeout: float = 30) -> None:
    """The queue table is empty: every delivery was made and its outcome
    recorded (a receiver records a request before it answers), so what the
    receivers have is all they will get."""
    until(lambda: _pending() == 0, timeout, lambda: f"the queue table emptied ({_pending()} left)")


def _attempts(hook_ids: list[str]) -> int:
    """Attempts in the attempt log for these hooks."""
    with model.meta.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT count(*) FROM webhooks_attempt WHERE hook_id = ANY(:ids)"),
            {"ids": hook_ids}).scalar()


def _made_by(proc: processes.Process) -> int:
    """Delivery attempts a worker made, by its own log: each of its drains
    reports how many it made (a fan-out task drains too)."""
    text = proc.output()
    return (sum(map(int, re.findall(r"delivery attempts made: (\d+)", text)))
            + sum(map(int, re.findall(r"(\d+) attempted here", text))))


def _both_took_part(workers: list[processes.Process], hook_ids: list[str]) -> None:
    """Each worker made deliveries, and between them their logs account for
    exactly the attempts the attempt log holds. (A worker counts what it
    claims: a claim that waited out the timeout for a connection slot goes
    back unsent and is counted again by whoever claims it next.)"""
    attempts = _attempts(hook_ids)
    # A drain logs its count once it ends, a little after its last outcome is recorded.
    made = until(lambda: [_made_by(proc) for proc in workers] if sum(
        _made_by(proc) for proc in workers) >= attempts else None, 30,
        lambda: f"the workers' logs account for the {attempts} attempts: "
                f"{[_made_by(proc) for proc in workers]}")
    print(f"deliveries made per worker: {made} (attempt log: {attempts})")
    assert sum(made) == attempts, f"the workers counted {made}, the attempt log {attempts}"
    assert all(made), f"a worker made no delivery: {made}"


def _report(name: str, received: list, expected: int) -> tuple[int, int]:
    distinct = len({r.path for r in received})
    duplicates = len(received) - distinct
    print(f"\n{name}: expected {expected}, received {len(received)}, distinct {distinct}, "
          f"duplicates {duplicates}, lost {expected - distinct}")
    return distinct, duplicates




@pytest.fixture
def dataset(with_plugins, organization):
    return factories.Dataset(owner_org=organization["id"])


def _update(dataset_id: str) -> None:
    package = model.Package.get(dataset_id)
    package.notes = f"chaos {uuid.uuid4().hex}"
    model.Session.commit()
    model.Session.remove()


def test_worker_killed_in_the_middle_of_a_fan_out(private_stack, receiver, dataset):
    receiver.delay_for["/k"] = 0.005  # slow enough to be caught mid-way
    _, ini, worker = private_stack({**FAST, **_queue()}, web=False)
    _add_hooks(receiver, 1000, "/k")
    _update(dataset["id"])
    receiver.wait_for(lambda rs: len(rs) >= 150, timeout=30)
    worker.kill()
    killed_at = len(receiver.requests)
    assert killed_at < 1000, "the fan-out finished before the kill: nothing was tested"
    replacement = processes.start_worker(ini, concurrency=2, name="worker-replacement")
    try:
        receiver.wait_for(lambda rs: len({r.path for r in rs}) >= 1000, timeout=60)
        _drained()
        distinct, duplicates = _report("worker SIGKILL", receiver.requests, 1000)
        assert distinct == 1000
        assert duplicates <= 1000 - 150  # only what the dead worker held can repeat
        assert len({r.json["event_id"] for r in receiver.requests}) == 1
    finally:
        replacement.stop()


def test_two_workers_share_the_work_without_loss(private_stack, receiver, dataset):
    # A timeout long enough that no claimed delivery waits it out for a
    # connection slot and goes back unsent: each claim a worker counts is then
    # an attempt it made.
    _, ini, first = private_stack({**FAST, **_queue(), "ckanext.webhooks.timeout": "30"},
                                  web=False)
    second = processes.start_worker(ini, concurrency=1, name="worker-second")
    try:
        hooks = _add_hooks(receiver, 1000, "/two")
        for _ in range(3):
            _update(dataset["id"])
        receiver.wait_for(lambda rs: len({(r.path, r.json["event_id"]) for r in rs}) >= 3000,
                          timeout=60)
        _drained()
        pairs = [(r.path, r.json["event_id"]) for r in receiver.requests]
        print(f"\ntwo workers: expected 3000, received {len(pairs)}, "
              f"duplicates {len(pairs) - len(set(pairs))}")
        assert len(set(pairs)) == 3000
        _both_took_part([first, second], hooks)
    finally:
        second.stop()


def test_two_workers_on_rabbitmq(private_stack, rabbitmq, receiver, dataset):
    _, ini, first = private_stack({**FAST, **_queue(),
                                   "ckanext.webhooks.broker_url": rabbitmq}, web=False)
    second = processes.start_worker(ini, concurrency=1, name="worker-second-amqp")
    try:
        for proc in (first, second):  # the broker is RabbitMQ, not the default Redis
            assert re.search(r"transport: +amqp://", proc.output()), proc.output()[:2000]
        hooks = _add_hooks(receiver, 500, "/amqp")
        for _ in range(2):
            _update(dataset["id"])
        receiver.wait_for(lambda rs: len({(r.path, r.json["event_id"]) for r in rs}) >= 1000,
                          timeout=60)
        _drained()
        pairs = [(r.path, r.json["event_id"]) for r in receiver.requests]
        print(f"\ntwo workers on RabbitMQ: expected 1000, received {len(pairs)}, "
              f"duplicates {len(pairs) - len(set(pairs))}")
        assert len(set(pairs)) == 1000
        assert _attempts(hooks) == len(pairs)
    finally:
        second.stop()


@pytest.mark.exclusive  # restarts the machine's PostgreSQL: run alone (scripts/test-all)
def test_postgresql_restart_while_delivering(private_stack, receiver, dataset):
    """PostgreSQL restarts while deliveries are on the wire and more wait in
    the queue table: the worker recovers its connections by itself, records
    what it sent as its own once the database is back (its leases held
    meanwhile), so every hook gets the event exactly once."""
    cluster = _pg_cluster()
    # Answers slow enough (16 at a time, 0.2 s each: ~8 s for all) that the
    # restart lands in the middle of the fan-out.
    receiver.delay_for["/pg"] = 0.2
    _, ini, worker = private_stack({**FAST, **_queue()}, web=False)
    hooks = _add_hooks(receiver, 600, "/pg")
    _update(dataset["id"])
    receiver.wait_for(lambda rs: len(rs) >= 50, timeout=30)
    server_started = _postmaster_started()
    with model.meta.engine.connect() as conn:
        # Claimed by the worker and not recorded yet: on the wire, or about to be.
        in_flight = conn.execute(sa.text(
            "SELECT count(*) FROM webhooks_delivery WHERE claim_token IS NOT NULL")).scalar()
    model.Session.remove()
    model.meta.engine.dispose()
    before = len({r.path for r in receiver.requests})
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "restart"],
                   check=True, capture_output=True, timeout=120)
    processes.wait_port(5432, 60)
    receiver.delay_for["/pg"] = 0
    # The fault happened, in the middle: the server is a new one, and when it
    # went down deliveries were claimed and unrecorded, and not all had come.
    until(lambda: _started_since(server_started), 60, "PostgreSQL answering, as a new server")
    assert in_flight > 0 and before < 600, \
        f"the fan-out was not under way at the restart ({before} of 600 received, " \
        f"{in_flight} in flight): nothing was tested"
    print(f"\nPostgreSQL restart: {in_flight} deliveries in flight, {before} of 600 received")
    receiver.wait_for(lambda rs: len({r.path for r in rs}) >= 600, timeout=90)
    _drained(60)
    distinct, duplicates = _report("PostgreSQL restart", receiver.requests, 600)
    assert distinct == 600
    assert duplicates == 0, "a delivery made before the restart was sent again"
    with model.meta.engine.connect() as conn:
        recorded_after = conn.execute(sa.text("""
            SELECT count(*) FROM webhooks_attempt
             WHERE hook_id = ANY(:ids) AND at >= pg_postmaster_start_time()"""),
            {"ids": hooks}).scalar()
    assert recorded_after > 0, "no outcome was recorded after the restart"
    assert _attempts(hooks) >= 600
    assert worker.alive(), "the worker must recover its connections by itself"


def _postmaster_started():
    with model.meta.engine.connect() as conn:
        return conn.execute(sa.text("SELECT pg_postmaster_start_time()")).scalar()


def _started_since(previous) -> bool:
    try:
        return _postmaster_started() > previous
    except sa.exc.OperationalError:  # still starting up
        return False


def _pg_cluster() -> list[str]:
    if not shutil.which("pg_ctlcluster") or os.geteuid() != 0:
        pytest.fail("restarting PostgreSQL needs pg_ctlcluster and root (CI has both)")
    out = subprocess.run(["pg_lsclusters", "-h"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        version, name, port = line.split()[:3]
        if port == "5432":
            return [version, name]
    pytest.fail("no PostgreSQL cluster on port 5432")


def test_receiver_down_for_a_long_outage(private_stack, dataset):
    """Retries carry deliveries over an outage; a receiver that stays down
    past the stale window has its hook paused, then deleted when the grace
    period runs out; others are not affected."""
    comes_back = Receiver().start()
    stays_down = Receiver().start()
    healthy = Receiver(host="127.0.0.3").start()
    port = comes_back.bind_port
    _, ini, worker = private_stack({
        **FAST, **_queue(), "ckanext.webhooks.retry_schedule": "0 1 1 2 2 2 2 2 2 2",
        "ckanext.webhooks.stale_after_days": str(10 / 86400),  # ten seconds
        "ckanext.webhooks.pause_grace_days": str(5 / 86400),  # five seconds
        "ckanext.webhooks.prune_interval": "1"}, web=False)
    [back_hook] = _add_hooks(comes_back, 1, "/back")
    [dead_hook] = _add_hooks(stays_down, 1, "/dead")
    [healthy_hook] = _add_hooks(healthy, 1, "/ok")
    comes_back.stop()
    stays_down.stop()
    try:
        for _ in range(3):
            _update(dataset["id"])
        healthy.wait_count("/ok/1", 3, timeout=15)
        # An outage of a few retries, well inside the stale window: each event
        # failed at least twice (a first attempt and a retry) while it was down.
        until(lambda: _failed_attempts(back_hook) >= 6, 15,
              lambda: f"retries during the outage ({_failed_attempts(back_hook)} failed)")
        comes_back = Receiver(bind_port=port).start()
        received = comes_back.wait_count("/back/1", 3, timeout=30)
        assert len({r.json["event_id"] for r in received}) == 3
        paused = until(lambda: _hook_if(dead_hook, lambda hook: not hook.active), 30,
                       "the dead receiver's hook paused")
        assert paused.pause_reason.startswith("only failures")
        until(lambda: _hook(dead_hook) is None, 30,
              "the paused hook deleted after its grace")
        assert model.Session.get(model_webhook(), back_hook).active
        assert model.Session.get(model_webhook(), healthy_hook).active
        assert len(healthy.on("/ok/1")) == 3
        assert "only failures" in worker.output()
        assert "not resumed" in worker.output()
    finally:
        comes_back.stop()
        healthy.stop()
        model.Session.remove()


def model_webhook():
    from ckanext.webhooks.model import Webhook
    return Webhook


def _hook(hook_id: str):
    model.Session.remove()  # a fresh read
    return model.Session.get(model_webhook(), hook_id)


def _hook_if(hook_id: str, condition):
    hook = _hook(hook_id)
    return hook if hook is not None and condition(hook) else None


def _failed_attempts(hook_id: str) -> int:
    with model.meta.engine.connect() as conn:
        return conn.execute(sa.text("""
            SELECT count(*) FROM webhooks_attempt
             WHERE hook_id = :id AND (status IS NULL OR status >= 300)"""),
            {"id": hook_id}).scalar()


def test_hostile_receivers_do_not_stall_healthy_ones(private_stack, dataset):
    """Never answers, trickles a byte a second, answers 50 MB, hangs up
    mid-answer: each is cut off, and healthy hooks of the same fan-out, in
    the same batch or in later ones, are all served while the slow ones still
    hold their requests."""
    import socket
    import threading

    accepted: dict[str, float] = {}  # receiver: when its request came (monotonic)
    closed: dict[str, float] = {}  # receiver: when its connection ended

    def serve(name, behaviour):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.3", 0))
        sock.listen(64)

        def loop():
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                threading.Thread(target=_guarded, args=(name, behaviour, conn),
                                 daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()
        return sock

    def _guarded(name, behaviour, conn):
        try:
            conn.recv(65536)
            accepted.setdefault(name, time.monotonic())
            behaviour(conn)
        except OSError:
            pass
        finally:
            closed.setdefault(name, time.monotonic())
            conn.close()

    def silent(conn):
        conn.settimeout(120)
        conn.recv(1)  # returns when the sender gives up and closes

    def trickle(conn):
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
            conn.sendall(bytes([byte]))
            time.sleep(1)  # the hostile behaviour itself: one byte a second

    def huge(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 52428800\r\n\r\n")
        for _ in range(800):
            conn.sendall(b"x" * 65536)

    def hang_up(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")

    sockets = {name: serve(name, fn) for name, fn in
               (("silent", silent), ("trickle", trickle), ("huge", huge), ("hang_up", hang_up))}
    healthy = Receiver().start()
    # A little slow, so that serving them spans the whole fan-out.
    healthy.delay_for["/healthy"] = 0.2
    # Small batches: the slow receivers hold some of them; the rest must flow.
    # A 10 s timeout: the window in which the healthy ones must all be served.
    _, ini, worker = private_stack({**FAST, **_queue(), "ckanext.webhooks.batch_size": "5",
                                    "ckanext.webhooks.timeout": "10",
                                    "ckanext.webhooks.retry_schedule": "0"}, web=False)
    try:
        hostile_ids = []
        with model.meta.engine.begin() as conn:
            for name, sock in sockets.items():
                hook_id = f"hostile-{name}-{uuid.uuid4().hex}{uuid.uuid4().hex}"
                hostile_ids.append(hook_id)
                conn.execute(sa.text("""
                    INSERT INTO webhooks (id, topics, address, host, site, created)
                    VALUES (:id, ARRAY['dataset/update'], :address, '127.0.0.3', '127.0.0.3',
                            now())
                """), {"id": hook_id,
                       "address": f"http://127.0.0.3:{sock.getsockname()[1]}/{name}"})
        _add_hooks(healthy, 50, "/healthy")
        _update(dataset["id"])
        healthy.wait_for(lambda rs: len(rs) >= 50, timeout=60)
        last_healthy = max(r.at for r in healthy.requests)
        # The silent and trickling receivers had their requests before the
        # last healthy one came, and held them until after: the healthy ones
        # did not wait for them.
        for name in ("silent", "trickle"):
            assert accepted.get(name, float("inf")) < last_healthy, (name, accepted)
            assert closed.get(name, float("inf")) > last_healthy, (name, closed)
        # The hostile ones are cut off by the total timeout and the size cap.
        from ckanext.webhooks.model import Webhook

        def all_recorded():
            model.Session.remove()
            hooks = [model.Session.get(Webhook, h) for h in hostile_ids]
            return hooks if all(h.delivery_count for h in hooks) else None
        hooks = until(all_recorded, 40, "an outcome recorded for every hostile receiver")
        outcome = {h.id.split("-")[1]: (h.last_status, h.last_error) for h in hooks}
        assert outcome["silent"] == (None, "timeout")
        assert outcome["trickle"] == (None, "timeout")
        assert outcome["huge"][0] == 200  # capped at 20 KB, connection dropped
        assert outcome["hang_up"] == (None, "connection_error")
    finally:
        for sock in sockets.values():
            sock.close()
        healthy.stop()


def test_soak(private_stack, dataset, organization):
    """Writes at a steady rate against many hooks whose receiver fails 10% of
    requests; at the end every event reached every hook, the queue is empty
    and worker memory stayed bounded. Scaled down by default; full length:
    WEBHOOKS_SOAK_SECONDS=1800 WEBHOOKS_SOAK_RATE=20 WEBHOOKS_SOAK_HOOKS=1000."""
    seconds = float(os.environ.get("WEBHOOKS_SOAK_SECONDS", "30"))
    rate = float(os.environ.get("WEBHOOKS_SOAK_RATE", "4"))
    hook_count = int(os.environ.get("WEBHOOKS_SOAK_HOOKS", "50"))
    receiver = Receiver(fail_ratio=0.10).start()
    _, ini, worker = private_stack({**FAST, **_queue(),
                                    "ckanext.webhooks.retry_schedule": "0 1 1 2 2 3 3 5 5 5"},
                                   web=False)
    datasets = [factories.Dataset(owner_org=organization["id"])["id"] for _ in range(5)]
    _add_hooks(receiver, hook_count, "/soak")
    rss = [processes_rss(worker)]
    sent = 0
    started = time.time()
    try:
        while time.time() - started < seconds:
            _update(datasets[sent % len(datasets)])
            sent += 1
            if sent % max(1, int(rate * 5)) == 0:
                rss.append(processes_rss(worker))
            time.sleep(max(0.0, started + sent / rate - time.time()))
        expected = sent * hook_count
        receiver.wait_for(lambda rs: len({(r.path, r.json["event_id"]) for r in rs
                                          if r.status == 200}) >= expected,
                          timeout=60 + expected / 500)
        _drained()
        rss.append(processes_rss(worker))
        answered_ok = [(r.path, r.json["event_id"]) for r in receiver.requests
                       if r.status == 200]
        acknowledged = set(answered_ok)
        received = len(receiver.requests)
        print(f"\nsoak: {seconds:.0f}s at {rate}/s to {hook_count} hooks: events sent {sent}, "
              f"deliveries expected {expected}, received {received} "
              f"({received - len(answered_ok)} answered 503 and retried), "
              f"acknowledged {len(acknowledged)}, "
              f"duplicates {len(answered_ok) - len(acknowledged)}, "
              f"lost {expected - len(acknowledged)}; worker RSS MB "
              f"{rss[0] / 2**20:.0f} -> {max(rss) / 2**20:.0f} -> {rss[-1] / 2**20:.0f}")
        assert len(acknowledged) == expected
        assert max(rss) < rss[0] * 1.5, "worker memory grew without bound"
    finally:
        receiver.stop()


def processes_rss(proc: processes.Process) -> int:
    total = 0
    pids = [proc.proc.pid] + [int(p) for p in subprocess.run(
        ["pgrep", "-P", str(proc.proc.pid)], capture_output=True, text=True).stdout.split()]
    for pid in pids:
        try:
            for line in open(f"/proc/{pid}/status"):
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total
