"""Nothing lost under faults: real workers killed, brokers and PostgreSQL
restarted, receivers down or hostile. Each test runs its own workers (the
suite's shared worker is frozen meanwhile), is bounded in time and reports
the duplicates at-least-once delivery produced."""
from __future__ import annotations

import os
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
        time.sleep(1)
        distinct, duplicates = _report("worker SIGKILL", receiver.requests, 1000)
        assert distinct == 1000
        assert duplicates <= 1000 - 150  # only what the dead worker held can repeat
        assert len({r.json["event_id"] for r in receiver.requests}) == 1
        deadline = time.time() + 20
        while _pending():
            assert time.time() < deadline, "the queue table did not empty"
            time.sleep(0.5)
    finally:
        replacement.stop()


def test_two_workers_share_the_work_without_loss(private_stack, receiver, dataset):
    _, ini, first = private_stack({**FAST, **_queue()}, web=False)
    second = processes.start_worker(ini, concurrency=1, name="worker-second")
    try:
        _add_hooks(receiver, 1000, "/two")
        for _ in range(3):
            _update(dataset["id"])
        receiver.wait_for(lambda rs: len({(r.path, r.json["event_id"]) for r in rs}) >= 3000,
                          timeout=60)
        time.sleep(1)
        pairs = [(r.path, r.json["event_id"]) for r in receiver.requests]
        print(f"\ntwo workers: expected 3000, received {len(pairs)}, "
              f"duplicates {len(pairs) - len(set(pairs))}")
        assert len(set(pairs)) == 3000
        for proc in (first, second):  # both took part
            assert "attempted here" in proc.output() or "attempts made" in proc.output()
    finally:
        second.stop()


def test_two_workers_on_rabbitmq(private_stack, rabbitmq, receiver, dataset):
    _, ini, first = private_stack({**FAST, **_queue(),
                                   "ckanext.webhooks.broker_url": rabbitmq}, web=False)
    second = processes.start_worker(ini, concurrency=1, name="worker-second-amqp")
    try:
        _add_hooks(receiver, 500, "/amqp")
        for _ in range(2):
            _update(dataset["id"])
        receiver.wait_for(lambda rs: len({(r.path, r.json["event_id"]) for r in rs}) >= 1000,
                          timeout=60)
        pairs = [(r.path, r.json["event_id"]) for r in receiver.requests]
        print(f"\ntwo workers on RabbitMQ: expected 1000, received {len(pairs)}, "
              f"duplicates {len(pairs) - len(set(pairs))}")
        assert len(set(pairs)) == 1000
    finally:
        second.stop()


@pytest.mark.exclusive  # restarts the machine's PostgreSQL: run alone (scripts/test-all)
def test_postgresql_restart_while_delivering(private_stack, receiver, dataset):
    cluster = _pg_cluster()
    receiver.delay_for["/pg"] = 0.01
    _, ini, worker = private_stack({**FAST, **_queue()}, web=False)
    _add_hooks(receiver, 600, "/pg")
    _update(dataset["id"])
    receiver.wait_for(lambda rs: len(rs) >= 50, timeout=30)
    model.Session.remove()
    model.meta.engine.dispose()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", *cluster, "restart"],
                   check=True, capture_output=True, timeout=120)
    processes.wait_port(5432, 60)
    receiver.wait_for(lambda rs: len({r.path for r in rs}) >= 600, timeout=90)
    distinct, _ = _report("PostgreSQL restart", receiver.requests, 600)
    assert distinct == 600
    assert worker.alive(), "the worker must recover its connections by itself"


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
        time.sleep(2)  # an outage of a few retries, well inside the stale window
        comes_back = Receiver(bind_port=port).start()
        received = comes_back.wait_count("/back/1", 3, timeout=30)
        assert len({r.json["event_id"] for r in received}) == 3
        deadline = time.time() + 30
        while (hook := model.Session.get(model_webhook(), dead_hook)).active:
            assert time.time() < deadline, "the dead receiver's hook was not paused"
            time.sleep(0.2)
            model.Session.remove()
        assert hook.pause_reason.startswith("only failures")
        model.Session.remove()
        while model.Session.get(model_webhook(), dead_hook) is not None:
            assert time.time() < deadline, "the paused hook was not deleted after its grace"
            time.sleep(0.5)
            model.Session.remove()
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


def test_hostile_receivers_do_not_stall_healthy_ones(private_stack, dataset):
    """Never answers, trickles a byte a second, answers 50 MB, hangs up
    mid-answer: each is cut off, and healthy hooks of the same fan-out, in
    the same batch or in later ones, are served within their own time."""
    import socket
    import threading

    def serve(behaviour):
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
                threading.Thread(target=_guarded, args=(behaviour, conn), daemon=True).start()
        threading.Thread(target=loop, daemon=True).start()
        return sock

    def _guarded(behaviour, conn):
        try:
            conn.recv(65536)
            behaviour(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def silent(conn):
        time.sleep(20)

    def trickle(conn):
        for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
            conn.sendall(bytes([byte]))
            time.sleep(1)

    def huge(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 52428800\r\n\r\n")
        for _ in range(800):
            conn.sendall(b"x" * 65536)

    def hang_up(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")

    sockets = {name: serve(fn) for name, fn in
               (("silent", silent), ("trickle", trickle), ("huge", huge), ("hang_up", hang_up))}
    healthy = Receiver().start()
    # Small batches: the slow receivers hold some of them; the rest must flow.
    _, ini, worker = private_stack({**FAST, **_queue(), "ckanext.webhooks.batch_size": "5",
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
        started = time.time()
        _update(dataset["id"])
        healthy.wait_for(lambda rs: len(rs) >= 50, timeout=10)
        served_in = max(r.at for r in healthy.requests) - min(r.at for r in healthy.requests)
        assert time.time() - started < 3, "healthy hooks waited for hostile ones"
        assert served_in < 1.0
        # The hostile ones are cut off by the 3 s total timeout and the size cap.
        deadline = time.time() + 15
        from ckanext.webhooks.model import Webhook
        while True:
            model.Session.remove()
            hooks = [model.Session.get(Webhook, h) for h in hostile_ids]
            if all(h.delivery_count for h in hooks):
                break
            assert time.time() < deadline, [(h.id, h.delivery_count) for h in hooks]
            time.sleep(0.3)
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
        deadline = time.time() + 30
        while _pending():
            assert time.time() < deadline, "the queue did not return to zero"
            time.sleep(0.5)
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
