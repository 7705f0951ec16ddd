"""Owned delivery: a claimed delivery belongs to one worker until that worker
records it or dies. Real workers, receivers and PostgreSQL: leases renewed
under answers that outlast them, a stuck worker's late outcomes left alone,
a plugin failing for one delivery, overlapping batches recorded at once, and
workers stopped with SIGTERM in the middle of a fan-out.

"Nothing more arrives" is shown, never waited for: the queue table is empty
(nothing is left that could be sent) and every attempt is in the log."""
from __future__ import annotations

import logging

import collections
import os
import random
import signal
import subprocess
import threading
import time
import uuid

import pytest
import sqlalchemy as sa

from ckan import model
from ckan.tests import factories

from . import processes
from .waiting import until
from .test_chaos import FAST, _add_hooks, _pending, _queue, _update

pytestmark = pytest.mark.usefixtures("no_leftover_hooks")


@pytest.fixture
def dataset(with_plugins, organization):
    return factories.Dataset(owner_org=organization["id"])


# The receivers of these tests answer slowly on purpose, all of them on one
# address: room for all of their requests at once in the sender's slow lane.
SLOW_OK = {"ckanext.webhooks.slow_lane_per_host": "16"}
# Exactly once is asserted: no attempt may time out on a loaded machine (a
# timed-out attempt is retried, and may have arrived: a duplicate by design).
PATIENT = {"ckanext.webhooks.timeout": "10"}


_wait = until


def _queue_empty() -> bool:
    return _pending() == 0


def _hooks(ids: list[str]) -> dict[str, tuple[int, int]]:
    """hook id -> (delivery_count, success_count)."""
    with model.meta.engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT id, delivery_count, success_count FROM webhooks WHERE id = ANY(:ids)"),
            {"ids": ids}).all()
    return {row.id: (row.delivery_count, row.success_count) for row in rows}


def _attempts(ids: list[str]) -> collections.Counter:
    """(hook id, event id) -> attempts in the delivery log."""
    with model.meta.engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT hook_id, event_id FROM webhooks_attempt WHERE hook_id = ANY(:ids)"),
            {"ids": ids}).all()
    return collections.Counter((row.hook_id, row.event_id) for row in rows)


def _receipts(receiver, prefix: str) -> collections.Counter:
    """(path, webhook-id) -> times received."""
    return collections.Counter((r.path, r.headers["webhook-id"]) for r in receiver.requests
                               if r.path.startswith(prefix))


def _claim_tokens() -> list:
    with model.meta.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT DISTINCT claim_token FROM webhooks_delivery")).scalars().all()


def _queue_rows() -> list:
    with model.meta.engine.connect() as conn:
        return [tuple(row) for row in conn.execute(sa.text(
            "SELECT claim_token, attempts, due - now() FROM webhooks_delivery"))]


def _signal_group(proc: processes.Process, sig: int) -> None:
    os.killpg(proc.proc.pid, sig)


def _attempts_made(proc: processes.Process) -> int:
    """Delivery attempts a worker logged (drain tasks and fan-out tasks)."""
    total = 0
    for line in proc.output().splitlines():
        if "delivery attempts made: " in line:
            total += int(line.rsplit(" ", 1)[1])
        elif " attempted here" in line:
            total += int(line.rsplit(", ", 1)[1].split()[0])
    return total


# --- point 2: a lease never runs out under work still within its deadline ------

def test_answers_outlasting_the_lease_arrive_exactly_once(private_stack, receiver, dataset):
    """The receiver answers after 4 s, the lease is 1 s, the timeout 10 s: two
    workers (four processes) are there to take over any lease that ran out,
    yet every hook receives its delivery once: the lease is renewed while the
    requests are on the wire."""
    receiver.delay_for["/slow"] = 4.0
    settings = {**FAST, **_queue(), **SLOW_OK, "ckanext.webhooks.lease_seconds": "1",
                "ckanext.webhooks.timeout": "10", "ckanext.webhooks.batch_size": "4"}
    _, ini, first = private_stack(settings, web=False)
    second = processes.start_worker(ini, concurrency=2, name="worker-second")
    try:
        hooks = _add_hooks(receiver, 12, "/slow")
        _update(dataset["id"])
        receiver.wait_for(lambda rs: len({r.path for r in rs}) >= 12, timeout=30)
        # Recorded only after the answers, 4 lease lengths later: until then
        # any due row would be claimed by one of the four idle processes.
        _wait(_queue_empty, 30, "the deliveries were recorded")
        receipts = _receipts(receiver, "/slow")
        print(f"\nanswers after 4 s, lease 1 s: {len(receipts)} deliveries, "
              f"{sum(receipts.values())} receipts")
        assert len(receipts) == 12 and set(receipts.values()) == {1}
        assert set(_attempts(hooks).values()) == {1}
        assert set(_hooks(hooks).values()) == {(1, 1)}
    finally:
        second.stop()


# --- point 2: a worker that lost its lease never overwrites --------------------

def test_a_stuck_workers_late_outcomes_are_not_recorded(private_stack, receiver, dataset):
    """Worker A sends, then is frozen (SIGSTOP) past its lease; worker B takes
    the deliveries over and sends them again (A may have died, for all B
    knows). A wakes up while B's requests are on the wire and tries to record
    its own outcomes: it finds the rows carrying B's token and leaves them,
    and the hooks' statistics, to B."""
    receiver.delay_for["/late"] = 6.0
    settings = {**FAST, **_queue(), **SLOW_OK, "ckanext.webhooks.lease_seconds": "2",
                "ckanext.webhooks.timeout": "30"}
    _, ini, worker_a = private_stack(settings, web=False)
    worker_b = None
    hooks = _add_hooks(receiver, 8, "/late")
    try:
        _update(dataset["id"])
        receiver.wait_for(lambda rs: len(rs) >= 8, timeout=30)
        _signal_group(worker_a, signal.SIGSTOP)  # before its answers come back
        [token_a] = _claim_tokens()
        worker_b = processes.start_worker(ini, concurrency=1, name="worker-b")
        try:
            receiver.wait_for(lambda rs: len(rs) >= 16, timeout=30)  # B sent them again
        except AssertionError as error:
            raise AssertionError(f"{error}\nqueue: {_queue_rows()}\nworker B:\n"
                                 f"{worker_b.output()[-3000:]}") from None
        [token_b] = _claim_tokens()
        assert token_b not in (None, token_a)
        _signal_group(worker_a, signal.SIGCONT)  # while B waits for its answers
        _wait(lambda: "another worker took the deliveries over" in worker_a.output(), 30,
              "worker A tried to record and found the deliveries taken over")
        _wait(_queue_empty, 30, "worker B recorded the deliveries")
        receipts = _receipts(receiver, "/late")
        print(f"\nstuck worker: {len(receipts)} deliveries, {sum(receipts.values())} receipts "
              f"(each sent by A, then by B)")
        assert set(receipts.values()) == {2}
        assert set(_hooks(hooks).values()) == {(1, 1)}, "only B's outcomes count"
        assert set(_attempts(hooks).values()) == {2}, "both attempts are in the log"
    finally:
        _signal_group(worker_a, signal.SIGCONT)
        if worker_b is not None:
            worker_b.stop()


def test_a_worker_frozen_inside_a_transaction_gives_up_its_locks(
        monkeypatch, only_my_workers, receiver, dataset):
    """A worker process frozen between a statement and its COMMIT holds its row
    locks for as long as its connection lives, and claims skip locked rows:
    the deliveries could never be taken over. A worker's connections tell
    the server to end a transaction idle longer than a batch may be held (1 s
    here), and the rows are claimed by another process."""
    from ckanext.webhooks import delivery_queue, fanout, worker
    [hook] = _add_hooks(receiver, 1, "/frozen")
    monkeypatch.setattr(worker, "hold_limit", lambda: 1.0)
    worker._end_abandoned_transactions()
    try:
        model.meta.engine.dispose()  # the test process's connections: new, with the limit
        _update(dataset["id"])
        assert fanout.fan_out()[1] == 1  # the suite's worker is frozen: fanned out here
        frozen = model.meta.engine.connect()
        assert frozen.execute(sa.text("SHOW idle_in_transaction_session_timeout")).scalar() == "1s"
        frozen.execute(sa.text("BEGIN"))
        locked = frozen.execute(sa.text(
            "SELECT hook_id FROM webhooks_delivery WHERE hook_id = :h FOR UPDATE"),
            {"h": hook}).scalars().all()
        assert locked == [hook]
        # The lock holds while the transaction lives: a claim skips the row.
        assert delivery_queue.claim(10)[0] == []
        [job] = _wait(lambda: delivery_queue.claim(10)[0], 30,
                      "the frozen transaction was ended and the delivery claimed")
        delivery_queue.leases.release(job.claim_token)
        assert job.hook_id == hook
        # The server ended it: PostgreSQL says why and closes the connection,
        # which the client reports as closed (over TLS, as Debian's default
        # is, "SSL connection has been closed unexpectedly").
        with pytest.raises(sa.exc.OperationalError,
                           match="idle-in-transaction timeout|connection (has been )?closed|"
                                 "server closed the connection"):
            frozen.execute(sa.text("SELECT 1"))
    finally:
        sa.event.remove(model.meta.engine, "connect", worker.limit_idle_transactions)
        model.Session.rollback()
        model.meta.engine.dispose()


# --- point 4: a failure preparing one delivery is that delivery's alone ----------

def test_a_plugin_raising_for_one_hook_spoils_only_its_delivery(private_stack, receiver,
                                                                dataset):
    """webhooks_veto raises for one hook: the rest of the batch is delivered
    and recorded; that one is retried on the schedule, given up and logged,
    with the hook's fingerprint and never its id or address."""
    from ckanext.webhooks.ids import fingerprint
    settings = {**FAST, **_queue(), **PATIENT, "ckan.plugins": "webhooks webhooks_test_plugin",
                "ckanext.webhooks.retry_schedule": "0 1 1"}
    _, _, worker = private_stack(settings, web=False)
    [bad] = _add_hooks(receiver, 1, "/veto-raises")
    good = _add_hooks(receiver, 10, "/fine")
    _update(dataset["id"])
    receiver.wait_for(lambda rs: len({r.path for r in rs}) >= 10, timeout=30)
    _wait(lambda: "(it could not be prepared)" in worker.output(), 30,
          "the failing delivery was given up")
    _wait(_queue_empty, 10, "every delivery recorded")
    output = worker.output()
    receipts = _receipts(receiver, "/")
    assert len(receipts) == 10 and set(receipts.values()) == {1}
    assert all(path.startswith("/fine/") for path, _ in receipts)
    assert set(_hooks(good).values()) == {(1, 1)}
    assert _hooks([bad]) == {bad: (0, 0)}, "not counted against the hook"
    failures = [line for line in output.splitlines() if "could not prepare event" in line]
    print(f"\nplugin raising for one of 11 hooks: 10 delivered, the 11th tried "
          f"{len(failures)} times and given up")
    assert len(failures) == 3  # one per attempt of the schedule
    assert all(fingerprint(bad) in line for line in failures)
    assert "RuntimeError: test plugin failed for" in output
    assert output.count(", in webhooks_veto") == 1  # the traceback, once per process
    assert bad not in output and "/veto-raises" not in output


def _claimed(hooks: list[str], tokens: dict[str, str], count: int = 0) -> None:
    """Hooks (with ``count`` deliveries and successes so far), fanned-out
    events, and a delivery of every event to every hook, claimed under the
    event's token in ``tokens`` and due in an hour (no worker takes them)."""
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO webhooks (id, topics, address, host, site, created, delivery_count,
                                  success_count)
            SELECT id, ARRAY['dataset/update'], 'http://127.0.0.2/' || id, '127.0.0.2',
                   '127.0.0.2', now(),
                   :count, :count
              FROM unnest(CAST(:ids AS text[])) AS t(id)"""), {"ids": hooks, "count": count})
        conn.execute(sa.text("""
            INSERT INTO webhooks_event (id, topic, object_id, created, fanned_out)
            SELECT id, 'dataset/update', 'x', now(), now()
              FROM unnest(CAST(:ids AS text[])) AS t(id)"""), {"ids": list(tokens)})
        conn.execute(sa.text("""
            INSERT INTO webhooks_delivery (event_id, hook_id, attempts, due, claim_token)
            SELECT t.e, h, 1, now() + interval '1 hour', t.token
              FROM unnest(CAST(:events AS text[]), CAST(:tokens AS text[])) AS t(e, token),
                   unnest(CAST(:hooks AS text[])) h
        """), {"events": list(tokens), "tokens": list(tokens.values()), "hooks": hooks})


def test_a_failure_of_a_whole_batch_is_that_batchs_alone(only_my_workers, with_plugins,
                                                        monkeypatch, caplog):
    """Preparing a batch raises before any delivery of it is decided (here the
    readers' lookup): each of its deliveries is retried on the schedule, not
    counted against its hook, and the drain goes on (nothing is raised)."""
    from ckanext.webhooks import delivery_queue, prepare
    from ckanext.webhooks.ids import fingerprint
    hooks = [f"own-{uuid.uuid4().hex}" for _ in range(3)]
    event = f"msg_own{uuid.uuid4().hex}"
    _claimed(hooks, {event: "token-batch"})
    jobs = [delivery_queue.Job(event, hook, 1, delivery_queue.HookRow(hook, "", None, None),
                            claim_token="token-batch") for hook in hooks]

    # An earlier test may have loaded an ini's logging section (fileConfig
    # disables the loggers it does not name): hear this module's log again.
    for name in ("ckanext", "ckanext.webhooks", "ckanext.webhooks.prepare"):
        monkeypatch.setattr(logging.getLogger(name), "disabled", False)
        monkeypatch.setattr(logging.getLogger(name), "propagate", True)
    caplog.set_level(logging.INFO, logger="ckanext.webhooks.prepare")

    def lookup_fails(audiences):
        raise RuntimeError(f"no readers for {hooks[0]}")
    monkeypatch.setattr(prepare.audience, "reader_names", lookup_fails)
    assert prepare.prepare_batch(jobs) == []
    assert {job.prepare_error for job in jobs} == {"internal_error"}
    assert "could not prepare event" in caplog.text and "and 2 other(s)" in caplog.text
    assert fingerprint(hooks[0]) in caplog.text and hooks[0] not in caplog.text
    delivery_queue.record(jobs)
    model.Session.remove()
    with model.meta.engine.connect() as conn:
        rows = conn.execute(sa.text("""
            SELECT claim_token, due > now() AS later, last_error FROM webhooks_delivery
             WHERE event_id = :e"""), {"e": event}).all()
    assert [tuple(row) for row in rows] == [(None, True, "internal_error")] * 3
    assert set(_hooks(hooks).values()) == {(0, 0)}
    prepare._prepare_failed([], RuntimeError("after every delivery was decided"))
    assert "could not prepare a batch (no delivery affected)" in caplog.text


# --- point 6: overlapping batches recorded at once --------------------------------

def test_overlapping_batches_are_recorded_without_deadlocks(private_stack, dataset):
    """Two workers (four processes, small batches) deliver five events to the
    same 300 hooks; batches of different events share hooks and are recorded
    at the same time. No deadlock, every hook counts five successes, and as
    many deliveries as the log has attempts."""
    from .receiver import Receiver
    receivers = [Receiver().start(), Receiver(host="127.0.0.3").start()]
    settings = {**FAST, **_queue(), **PATIENT, "ckanext.webhooks.batch_size": "25"}
    _, ini, first = private_stack(settings, web=False)
    second = processes.start_worker(ini, concurrency=2, name="worker-overlap")
    try:
        hooks = [h for i, r in enumerate(receivers) for h in _add_hooks(r, 150, f"/o{i}")]
        for _ in range(5):
            _update(dataset["id"])
        for receiver in receivers:
            receiver.wait_for(
                lambda rs: len({(r.path, r.headers["webhook-id"]) for r in rs}) >= 750,
                timeout=90)
        _wait(_queue_empty, 30, "every delivery recorded")
        logs = first.output() + second.output()
        counts = _hooks(hooks)
        print(f"\noverlapping batches: {len(hooks)} hooks x 5 events, (deliveries, "
              f"successes) per hook {sorted(set(counts.values()))}; attempts made by the "
              f"first worker {_attempts_made(first)}, by the second {_attempts_made(second)}")
        assert "deadlock" not in logs.lower()
        logged = collections.Counter(hook for hook, _ in _attempts(hooks).elements())
        assert counts == {hook: (logged[hook], 5) for hook in hooks}
    finally:
        second.stop()
        for receiver in receivers:
            receiver.stop()


def test_concurrent_records_over_the_same_hooks_in_any_order(only_my_workers, with_plugins):
    """Eight batches over the same 200 hooks, each in another order, recorded
    by eight threads at once (each its own database connection): all commit,
    with the right counts, and none is left to the deadlock detector."""
    from ckanext.webhooks import delivery_queue
    from ckanext.webhooks.sender import Outcome
    hooks = [f"own-{uuid.uuid4().hex}" for _ in range(200)]
    events = [f"msg_own{uuid.uuid4().hex}" for _ in range(8)]
    _claimed(hooks, {event: f"token-{event}" for event in events})
    batches = []
    for event in events:
        order = random.sample(hooks, len(hooks))
        batches.append([delivery_queue.Job(event, hook, 1,
                                           delivery_queue.HookRow(hook, "", None, None),
                                           claim_token=f"token-{event}", topic="dataset/update",
                                           outcome=Outcome(200, None, 0.01))
                        for hook in order])
    start, errors = threading.Barrier(len(batches)), []

    def record(batch):
        try:
            start.wait()
            delivery_queue.record(batch)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
            model.Session.rollback()
        finally:
            model.Session.remove()

    threads = [threading.Thread(target=record, args=(b,)) for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert set(_hooks(hooks).values()) == {(8, 8)}
    assert _pending() == 0


def test_statistics_count_past_two_to_the_31(only_my_workers, with_plugins):
    """delivery_count and success_count are 64-bit."""
    from ckanext.webhooks import delivery_queue
    from ckanext.webhooks.sender import Outcome
    hook, event = f"own-{uuid.uuid4().hex}", f"msg_own{uuid.uuid4().hex}"
    _claimed([hook], {event: "token-big"}, count=2 ** 31 - 1)
    delivery_queue.record([delivery_queue.Job(event, hook, 1,
                                              delivery_queue.HookRow(hook, "", None, None),
                                              claim_token="token-big", topic="dataset/update",
                                              outcome=Outcome(200, None, 0.01))])
    model.Session.remove()
    assert _hooks([hook]) == {hook: (2 ** 31, 2 ** 31)}


# --- point 7: SIGTERM under load ------------------------------------------------------

def test_sigterm_mid_fan_out_sends_nothing_twice_and_loses_nothing(private_stack, receiver,
                                                                   dataset):
    """SIGTERM to the worker's process group (as systemd stops a service) while
    it delivers 1,000 hooks: it claims no more, finishes and records what is on
    the wire, and exits; a new worker sends the rest. Every hook receives its
    delivery exactly once."""
    receiver.delay_for["/t/"] = 0.005
    settings = {**FAST, **_queue(), **PATIENT, "ckanext.webhooks.batch_size": "50"}
    _, ini, worker = private_stack(settings, web=False)
    _add_hooks(receiver, 1000, "/t")
    _update(dataset["id"])
    receiver.wait_for(lambda rs: len(rs) >= 150, timeout=30)
    stopped_at = time.monotonic()
    worker.stop(timeout=30)  # SIGTERM to every process of it; SIGKILL after 30 s
    stop_seconds = time.monotonic() - stopped_at
    received_by_then = len(receiver.requests)
    output = worker.output()
    assert worker.proc.returncode == 0, output[-3000:]
    assert "SIGTERM: finishing the deliveries on the wire" in output
    assert received_by_then < 1000, "the fan-out finished before SIGTERM: nothing was tested"
    # Nothing of the stopped worker is still claimed: a new one can take it all now.
    assert _claim_tokens() in ([], [None])
    replacement = processes.start_worker(ini, concurrency=2, name="worker-after-sigterm")
    try:
        receiver.wait_for(lambda rs: len({r.path for r in rs}) >= 1000, timeout=60)
        _wait(_queue_empty, 30, "every delivery recorded")
        receipts = _receipts(receiver, "/t/")
        print(f"\nSIGTERM mid fan-out: {received_by_then} received when the worker was told "
              f"to stop, it exited {stop_seconds:.1f} s later; {len(receipts)} hooks, "
              f"{sum(receipts.values())} receipts, duplicates "
              f"{sum(receipts.values()) - len(receipts)}")
        assert len(receipts) == 1000 and set(receipts.values()) == {1}
        assert "Traceback" not in output and "WorkerLostError" not in output
    finally:
        replacement.stop()


def test_a_second_sigterm_hands_the_work_back_at_once(private_stack, receiver, dataset):
    """A second SIGTERM stops the worker without waiting for its answers: the
    deliveries it held go back to the queue, due now, instead of waiting for
    their lease (a minute) to run out; a new worker sends them all."""
    receiver.delay_for["/h/"] = 3.0
    settings = {**FAST, **_queue(), **SLOW_OK, "ckanext.webhooks.lease_seconds": "60",
                "ckanext.webhooks.timeout": "10"}
    _, ini, worker = private_stack(settings, web=False)
    _add_hooks(receiver, 10, "/h")
    _update(dataset["id"])
    receiver.wait_for(lambda rs: len(rs) >= 10, timeout=30)
    _signal_group(worker, signal.SIGTERM)
    _wait(lambda: "SIGTERM: finishing the deliveries on the wire" in worker.output(), 10,
          "the first SIGTERM was deferred")
    _signal_group(worker, signal.SIGTERM)
    _wait(lambda: worker.proc.poll() is not None, 15, "the worker exited")
    output = worker.output()
    assert "stopping at once: 1 batch(es) handed back" in output, output[-3000:]
    with model.meta.engine.connect() as conn:
        held = conn.execute(sa.text(
            "SELECT count(*) FROM webhooks_delivery WHERE claim_token IS NOT NULL "
            "OR due > now()")).scalar()
    assert held == 0 and _pending() == 10
    replacement = processes.start_worker(ini, concurrency=1, name="worker-after-second")
    try:
        receiver.wait_for(lambda rs: len(rs) >= 20, timeout=30)
        _wait(_queue_empty, 20, "every delivery recorded")
        receipts = _receipts(receiver, "/h/")
        print(f"\nsecond SIGTERM: 10 deliveries handed back, {sum(receipts.values())} receipts")
        assert len(receipts) == 10 and set(receipts.values()) == {2}
    finally:
        replacement.stop()


def test_sigterm_to_pool_processes_alone(private_stack, receiver, dataset):
    """SIGTERM to the worker's pool processes only (an operator's kill, the
    pool ending one): the one delivering records what it has on the wire,
    asks for the rest to be drained, and exits; the worker starts a new pool
    process, which goes on. Every hook receives its delivery exactly once."""
    receiver.delay_for["/p/"] = 0.005
    settings = {**FAST, **_queue(), **PATIENT, "ckanext.webhooks.batch_size": "50"}
    _, _, worker = private_stack(settings, web=False)
    _add_hooks(receiver, 600, "/p")
    _update(dataset["id"])
    receiver.wait_for(lambda rs: len(rs) >= 100, timeout=30)
    children = [int(pid) for pid in subprocess.run(
        ["pgrep", "-P", str(worker.proc.pid)], capture_output=True, text=True).stdout.split()]
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    received_by_then = len(receiver.requests)
    receiver.wait_for(lambda rs: len({r.path for r in rs}) >= 600, timeout=60)
    _wait(_queue_empty, 30, "every delivery recorded")
    receipts = _receipts(receiver, "/p/")
    output = worker.output()
    print(f"\nSIGTERM to {len(children)} pool process(es): {received_by_then} received by "
          f"then; {len(receipts)} hooks, {sum(receipts.values())} receipts")
    assert worker.alive()
    assert "SIGTERM: finishing the deliveries on the wire" in output
    assert received_by_then < 600, "the fan-out finished before SIGTERM: nothing was tested"
    assert len(receipts) == 600 and set(receipts.values()) == {1}
