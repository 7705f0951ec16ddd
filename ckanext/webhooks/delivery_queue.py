"""The durable delivery queue (``webhooks_delivery``): claim due deliveries
under a lease, record their outcomes with the retry and pruning policy,
requeue, and hand claimed work back.

* :func:`claim` takes due rows (``FOR UPDATE SKIP LOCKED``) under a fresh
  claim token and moves ``due`` forward by a lease, which :data:`leases`
  renews while the worker works on them, so work held by a dead worker comes
  back by itself.
* :func:`record` writes a batch's outcomes in bulk, on the rows that still
  carry its token: rows delivered or given up are deleted, failed ones get
  their next ``due`` from the retry schedule, hooks get their statistics, and
  hooks that answer 410 or too many 4xx are deleted.
"""
from __future__ import annotations

import json
import logging
import os
import random
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional

import sqlalchemy as sa

from ckan import model

from . import audience, crypto, guard, metrics, settings
from .ids import fingerprint
from .model import NOTIFY_CHANNEL
from .sender import Outcome

log = logging.getLogger(__name__)


# --- leases -------------------------------------------------------------------
#
# A claim gives its batch a fresh token and a lease (``due`` moved forward).
# While the worker works on the batch a thread of its own renews the lease,
# so the lease never runs out under work still within its deadline however
# long the gates, DNS, connects and answers take; a worker that dies stops
# renewing, and its work is taken over ``lease_seconds`` later. Outcomes are
# recorded, and leases renewed, only on rows that still carry the worker's
# token: a worker that lost its lease (stuck, or cut off from the database)
# never overwrites the state of the one that took the work over.

# A batch is renewed for at most this long after its claim: preparing it, its
# attempts (each within two ``timeout``: one to get a slot, one from it), and
# recording it. A worker that has not recorded a batch by then is presumed
# stuck and lets it go.
PREPARE_LIMIT = 120.0
RECORD_SLACK = 30.0


def hold_limit() -> float:
    """Seconds a batch may be held, from its claim to its outcomes recorded."""
    return PREPARE_LIMIT + 2 * settings.timeout() + RECORD_SLACK


class Leases:
    """The claim tokens this process holds, renewed by a thread of its own
    (with a database connection of its own) until released or held too long."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tick = threading.Condition(self._lock)
        self._until: dict[str, float] = {}
        self._lease = 60.0
        self._thread: Optional[threading.Thread] = None

    def hold(self, token: str, lease: float) -> None:
        with self._lock:
            self._until[token] = time.monotonic() + hold_limit()
            self._lease = lease
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="ckanext-webhooks-leases")
                self._thread.start()

    def release(self, *tokens: str) -> None:
        with self._lock:
            for token in tokens:
                self._until.pop(token, None)

    def _after_fork(self) -> None:
        """A forked process holds nothing of its parent's, and has no thread yet."""
        self.__init__()

    def _run(self) -> None:
        while True:
            with self._lock:
                self._tick.wait(self._lease / 3)
                now = time.monotonic()
                tokens = sorted(t for t, until in self._until.items() if until > now)
                lease = self._lease
            if tokens:
                try:
                    renew(tokens, lease)
                except Exception as error:  # noqa: BLE001 - try again at the next tick
                    log.warning("could not renew the leases of %d batch(es): %s",
                                len(tokens), error)


leases = Leases()
os.register_at_fork(after_in_child=leases._after_fork)

# Rows of the given claim tokens, locked in key order (every writer of
# webhooks_delivery locks in this order, so none waits on another in a cycle)
# or skipped when another transaction holds them (``{skip}``).
_OWNED = """(SELECT event_id, hook_id FROM webhooks_delivery
              WHERE claim_token = ANY(:tokens)
              ORDER BY event_id COLLATE "C", hook_id COLLATE "C" FOR UPDATE{skip})"""


def renew(tokens: list[str], lease: float) -> int:
    """Move the lease end of the rows still carrying these tokens to ``lease``
    seconds from now; returns the rows renewed. Rows another transaction is
    recording are skipped (never waited for).

    One statement in autocommit: its row locks end with the statement, on the
    server, whatever becomes of this process. A process frozen between an
    ``UPDATE`` and its ``COMMIT`` would hold them until its connection died,
    and no other worker could take its deliveries over (``SKIP LOCKED``)."""
    with model.meta.engine.connect().execution_options(
            isolation_level="AUTOCOMMIT") as conn:
        return conn.execute(sa.text(f"""
            UPDATE webhooks_delivery d SET due = now() + make_interval(secs => :lease)
              FROM {_OWNED.format(skip=" SKIP LOCKED")} o
             WHERE d.event_id = o.event_id AND d.hook_id = o.hook_id
        """), {"tokens": tokens, "lease": lease}).rowcount


def hand_back(tokens: list[str]) -> None:
    """Give claimed work back, due now, for any worker to take at once; the
    attempts it was claimed for are not counted. In a transaction of its own."""
    session = model.Session
    session.rollback()
    session.execute(sa.text(f"""
        UPDATE webhooks_delivery d
           SET claim_token = NULL, due = now(), attempts = greatest(d.attempts - 1, 0)
          FROM {_OWNED.format(skip="")} o
         WHERE d.event_id = o.event_id AND d.hook_id = o.hook_id
    """), {"tokens": tokens})
    session.execute(sa.text("SELECT pg_notify(:channel, '')"), {"channel": NOTIFY_CHANNEL})
    session.commit()


# --- claims -------------------------------------------------------------------

@dataclass
class Job:
    event_id: str
    hook_id: str
    attempts: int
    hook: "HookRow"
    audience: str = ""            # whose rendering it carries ('' = anonymous)
    delivered_topic: Optional[str] = None  # set when a visibility change changed the topic
    reason: Optional[str] = None  # why a dataset/create or dataset/delete was sent
    target: Optional[guard.Target] = None
    body: str = ""
    headers: Optional[dict] = None
    outcome: Optional[Outcome] = None
    drop: Optional[str] = None  # why nothing is sent (and nothing retried)
    topic: str = ""
    claim_token: str = ""         # its claim's: only its holder records its outcome
    # Its hook's audience as of the claim; None when the reader is no longer
    # active (a deleted or blocked user).
    reader_now: Optional[str] = None
    created: Optional[float] = None  # its event's commit (epoch seconds), for the metrics
    # Preparing it raised: nothing was sent; retried on the schedule, not
    # counted against the hook.
    prepare_error: Optional[str] = None


class HookRow(NamedTuple):
    """What a delivery needs of its hook, read with the claim."""
    id: str
    address: str
    secret: Optional[str]
    user_id: Optional[str]
    token_id: Optional[str] = None
    previous_secret: Optional[str] = None  # still signing during a rotation

    @property
    def signing_secrets(self) -> tuple[str, ...]:
        """Decrypted (raises crypto.SecretUnreadable rather than sign nothing)."""
        return tuple(crypto.unseal(s) for s in (self.secret, self.previous_secret) if s)


_DUE = """SELECT event_id, hook_id FROM webhooks_delivery
                 WHERE due <= now()
                 ORDER BY due LIMIT :limit FOR UPDATE SKIP LOCKED"""
# The same, leaving out the hooks of receivers this process cannot serve soon.
_DUE_ELSEWHERE = """SELECT d.event_id, d.hook_id FROM webhooks_delivery d
                 WHERE d.due <= now() AND NOT EXISTS (
                       SELECT 1 FROM webhooks s WHERE s.id = d.hook_id
                          AND s.host = ANY(CAST(:skip AS text[])))
                 ORDER BY d.due LIMIT :limit FOR UPDATE OF d SKIP LOCKED"""


# What a claim returns of each delivery (``d``) and its hook (``w``), in the
# order :func:`jobs_from_rows` reads them.
CLAIMED_COLUMNS = f"""d.event_id, d.hook_id, d.attempts, d.audience, d.topic, d.reason,
        w.address, w.secret, w.user_id, w.token_id,
        CASE WHEN w.previous_secret_until > now() THEN w.previous_secret
        END AS previous_secret,
        CASE WHEN {audience.READER_ACTIVE_SQL} THEN {audience.AUDIENCE_SQL} END AS reader_now"""


def jobs_from_rows(rows, token: str) -> list[Job]:
    """The jobs of claimed rows (:data:`CLAIMED_COLUMNS` first)."""
    # Unpacked as tuples: a Row's attribute access costs about a microsecond
    # a column, a dozen per delivery.
    return [Job(event_id, hook_id, attempts,
                HookRow(hook_id, address, secret, user_id, token_id, previous_secret),
                audience_key, topic, reason, claim_token=token, reader_now=reader_now)
            for (event_id, hook_id, attempts, audience_key, topic, reason, address, secret,
                 user_id, token_id, previous_secret, reader_now, *_) in rows]


@dataclass
class FirstClaim:
    """A claim made by the statement that queues a fan-out's deliveries, for
    the process that fans out and sends right after: up to ``limit`` of them,
    none for ``skip_hosts``. One statement and one commit fewer on the way
    from an event to its first deliveries. :func:`hold` it once committed."""
    limit: int
    skip_hosts: list[str]
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    lease: float = field(default_factory=lambda: settings.lease_seconds())
    jobs: list[Job] = field(default_factory=list)

    def room(self) -> int:
        return self.limit - len(self.jobs)

    def forget(self, event_id: str) -> None:
        """That event's fan-out was rolled back, and its claim with it."""
        self.jobs = [job for job in self.jobs if job.event_id != event_id]

    def hold(self) -> list[Job]:
        """Its jobs, their lease renewed from now on (see :data:`leases`)."""
        if self.jobs:
            leases.hold(self.token, self.lease)
        return self.jobs


def claim(limit: int, skip_hosts: Iterable[str] = ()) -> tuple[list[Job], bool]:
    """Lease up to ``limit`` due deliveries, with their hooks, in one statement,
    under a fresh claim token; this process renews the lease until it releases
    the token (:data:`leases`). Rows whose lease ran out are due again. Due
    rows of a paused hook (queued in a race with the pause) are held instead.
    Rows of ``skip_hosts`` (receivers whose slow lane is full here) are left
    to other processes. Returns the jobs, and whether more may be due (the
    statement took as many rows as it could)."""
    session = model.Session
    token = secrets.token_hex(16)
    lease = settings.lease_seconds()
    skip = sorted(skip_hosts)
    rows = session.execute(sa.text(f"""
        UPDATE webhooks_delivery d
           SET due = CASE WHEN w.active THEN now() + make_interval(secs => :lease)
                          ELSE 'infinity' END,
               attempts = d.attempts + CASE WHEN w.active THEN 1 ELSE 0 END,
               claim_token = CASE WHEN w.active THEN :token END
          FROM ({_DUE_ELSEWHERE if skip else _DUE}) c, webhooks w
         WHERE d.event_id = c.event_id AND d.hook_id = c.hook_id AND w.id = d.hook_id
        RETURNING {CLAIMED_COLUMNS}, w.active
    """), {"lease": lease, "limit": limit, "token": token, "skip": skip}).all()
    session.commit()
    more = len(rows) >= limit
    jobs = jobs_from_rows([row for row in rows if row.active], token)
    if jobs:
        leases.hold(token, lease)
    return jobs, more


# --- recording outcomes -----------------------------------------------------

_RETRYABLE_4XX = {408, 425, 429}


def _classify(outcome: Outcome) -> str:
    """'ok', 'gone' (410), 'client' (other 4xx: not retried), or 'retry'.

    A name that did not resolve (``dns_error``), a timeout (also one that
    never got a slot) or an ``internal_error`` is 'retry': a network
    condition, never counted as a 4xx. A name resolving to a refused address
    is 'client' at every attempt."""
    if outcome.ok:
        return "ok"
    if outcome.status == 410:
        return "gone"
    if outcome.status is not None and 400 <= outcome.status < 500 \
            and outcome.status not in _RETRYABLE_4XX:
        return "client"
    if outcome.error == "refused_address":
        return "client"
    return "retry"


def _retry_delay(job: Job, schedule: list[float]) -> float:
    delay = schedule[job.attempts] * random.uniform(1.0, 1.2)
    if job.outcome is not None and job.outcome.retry_after:
        delay = max(delay, min(job.outcome.retry_after, 86400.0))
    return delay


def record(jobs: list[Job]) -> None:
    """:func:`record_once`, tried again while the database is away (a restart,
    a fail-over) for up to ``RECORD_SLACK`` seconds. The batch's lease is
    still renewed meanwhile, so its outcomes land as this worker's once the
    database is back, instead of the lease running out and the deliveries,
    already made, being sent again."""
    deadline = time.monotonic() + RECORD_SLACK
    pause = 0.25
    while True:
        try:
            record_once(jobs)
            return
        except sa.exc.DBAPIError as error:
            rollback_quietly()
            if not connection_lost(error) or time.monotonic() + pause > deadline:
                raise
            log.warning("could not record %d outcome(s): the database is away (%s); "
                        "trying again", len(jobs), type(error.orig).__name__)
            time.sleep(pause)
            pause = min(2 * pause, 4.0)


def connection_lost(error: sa.exc.DBAPIError) -> bool:
    """The database went away (a restart, a fail-over), rather than refused the statement."""
    return error.connection_invalidated or isinstance(error, sa.exc.OperationalError)


def rollback_quietly() -> None:
    """End the session's transaction; with the connection gone, the next use reconnects."""
    try:
        model.Session.rollback()
    except Exception:  # noqa: BLE001 - the connection is gone already
        pass


def record_once(jobs: list[Job]) -> None:
    """Record one claimed batch's outcomes in one transaction, as far as this
    worker still holds it: rows whose claim token changed were taken over by
    another worker (this one's lease ran out) and are left to it, as are their
    hooks' statistics; the attempts are logged all the same (they were made).

    Every writer locks in the same order, so concurrent batches over the same
    hooks never deadlock: the batch's hooks by id, then its deliveries by
    (event, hook). Hooks to prune are deleted after the commit, each in a
    transaction of its own.
    """
    if not jobs:
        return
    session = model.Session
    token = jobs[0].claim_token
    session.execute(sa.text("""
        SELECT 1 FROM webhooks WHERE id = ANY(:ids) ORDER BY id COLLATE "C" FOR NO KEY UPDATE
    """), {"ids": sorted({job.hook_id for job in jobs})}).all()
    owned = {(event_id, hook_id) for event_id, hook_id in session.execute(
        sa.text(_OWNED.format(skip="")), {"tokens": [token]})}
    mine = [job for job in jobs if (job.event_id, job.hook_id) in owned]
    if len(mine) < len(jobs):
        _report_lost([job for job in jobs if (job.event_id, job.hook_id) not in owned])
    schedule = settings.retry_schedule()
    finished, retries, handed_back = [], [], []
    per_hook: dict[str, dict] = {}
    observed: list[tuple] = []  # (outcome, topic, duration, since commit) for the metrics
    now = time.time()
    for job in mine:
        if job.prepare_error is not None:  # nothing was sent
            if job.attempts < len(schedule):
                retries.append({"e": job.event_id, "h": job.hook_id,
                                "delay": _retry_delay(job, schedule), "status": None,
                                "error": job.prepare_error})
                observed.append(("retry", job.topic, None, None))
            else:
                log.warning("giving up on event %s for %s after %d attempts (it could not "
                            "be prepared)", job.event_id, fingerprint(job.hook_id),
                            job.attempts)
                finished.append({"e": job.event_id, "h": job.hook_id})
                observed.append(("given_up", job.topic, None, None))
            continue
        if job.outcome is None:  # dropped: nothing was sent
            finished.append({"e": job.event_id, "h": job.hook_id})
            observed.append(("withheld", job.topic, None, None))
            continue
        if job.outcome.waited_for_slot:  # never sent: not an attempt, not a failure
            handed_back.append({"e": job.event_id, "h": job.hook_id})
            continue
        kind = _classify(job.outcome)
        stats = per_hook.setdefault(job.hook_id, {
            "id": job.hook_id, "n": 0, "ok": 0, "reset": False, "fail_tail": 0,
            "tail_4xx": 0, "status": None, "error": None, "gone": False})
        stats["n"] += 1
        stats["status"], stats["error"] = job.outcome.status, job.outcome.error
        if kind == "ok":
            stats.update(ok=stats["ok"] + 1, reset=True, fail_tail=0, tail_4xx=0)
        else:
            stats["fail_tail"] += 1
            stats["tail_4xx"] = stats["tail_4xx"] + 1 if kind == "client" else 0
            stats["gone"] = stats["gone"] or kind == "gone"
        if kind == "retry" and job.attempts < len(schedule):
            retries.append({"e": job.event_id, "h": job.hook_id,
                            "delay": _retry_delay(job, schedule),
                            "status": job.outcome.status, "error": job.outcome.error})
            outcome = "retry"
        else:
            if kind == "retry":
                log.warning("giving up on event %s for %s after %d attempts",
                            job.event_id, fingerprint(job.hook_id), job.attempts)
            finished.append({"e": job.event_id, "h": job.hook_id})
            outcome = {"ok": "success", "retry": "given_up"}.get(kind, "refused")
        observed.append((outcome, job.topic, job.outcome.duration,
                         now - job.created if job.created else None))

    keep = settings.log_body_bytes()
    attempts = [attempt_row(job.hook_id, job.event_id, job.topic, job.attempts, job.outcome,
                            job.reason, keep)
                for job in jobs if job.outcome is not None and job.prepare_error is None
                and not job.outcome.waited_for_slot]
    if attempts:
        log_attempts(attempts)
    if finished:
        session.execute(sa.text("""
            DELETE FROM webhooks_delivery d USING jsonb_to_recordset(CAST(:rows AS jsonb))
                AS v(e text, h text)
             WHERE d.event_id = v.e AND d.hook_id = v.h AND d.claim_token = :token
        """), {"rows": json.dumps(finished), "token": token})
    if retries:
        session.execute(sa.text("""
            UPDATE webhooks_delivery d
               SET due = now() + make_interval(secs => v.delay),
                   last_status = v.status, last_error = v.error, claim_token = NULL
              FROM jsonb_to_recordset(CAST(:rows AS jsonb))
                AS v(e text, h text, delay float8, status int, error text)
             WHERE d.event_id = v.e AND d.hook_id = v.h AND d.claim_token = :token
        """), {"rows": json.dumps(retries), "token": token})
    if handed_back:
        session.execute(sa.text("""
            UPDATE webhooks_delivery d
               SET due = now() + interval '1 second', attempts = d.attempts - 1,
                   claim_token = NULL
              FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(e text, h text)
             WHERE d.event_id = v.e AND d.hook_id = v.h AND d.claim_token = :token
        """), {"rows": json.dumps(handed_back), "token": token})
    doomed, to_pause = [], []
    if per_hook:
        updated = session.execute(sa.text("""
            UPDATE webhooks w
               SET delivery_count = w.delivery_count + v.n,
                   success_count = w.success_count + v.ok,
                   last_delivery = now(), last_status = v.status, last_error = v.error,
                   consecutive_failures = CASE WHEN v.reset THEN v.fail_tail
                                               ELSE w.consecutive_failures + v.fail_tail END,
                   consecutive_4xx = CASE WHEN v.reset OR v.tail_4xx < v.fail_tail THEN v.tail_4xx
                                          ELSE w.consecutive_4xx + v.tail_4xx END,
                   failing_since = CASE WHEN v.fail_tail = 0 THEN NULL
                                        WHEN v.reset THEN now()
                                        ELSE coalesce(w.failing_since, now()) END
              FROM jsonb_to_recordset(CAST(:rows AS jsonb))
                AS v(id text, n int, ok int, reset bool, fail_tail int, tail_4xx int,
                     status int, error text, gone bool)
             WHERE w.id = v.id
            RETURNING w.id, w.consecutive_4xx, v.gone
        """), {"rows": json.dumps(list(per_hook.values()))}).all()
        limit = settings.max_consecutive_4xx()
        for row in updated:
            if row.gone:
                doomed.append((row.id, "answered 410 Gone"))
            elif row.consecutive_4xx >= limit:
                to_pause.append((row.id, f"answered 4xx {row.consecutive_4xx} times in a row"))
    session.commit()
    for outcome, topic, duration, since_commit in observed:
        metrics.recorded(outcome, topic, duration, since_commit)
    for hook_id, reason in sorted(doomed):
        _delete_hook(hook_id, reason)
        session.commit()
    for hook_id, reason in sorted(to_pause):
        pause(hook_id, reason)
        session.commit()


def _report_lost(lost: list[Job]) -> None:
    """Outcomes of deliveries this worker no longer holds: deleted meanwhile
    (their hook was deleted), or taken over after its lease ran out."""
    taken = model.Session.execute(sa.text("""
        SELECT count(*) FROM webhooks_delivery d
          JOIN jsonb_to_recordset(CAST(:rows AS jsonb)) AS v(e text, h text)
            ON d.event_id = v.e AND d.hook_id = v.h
    """), {"rows": json.dumps([{"e": job.event_id, "h": job.hook_id} for job in lost])}
    ).scalar_one()
    if taken:
        log.warning("%d outcome(s) not recorded: another worker took the deliveries over "
                    "after this one's lease ran out", taken)


def attempt_row(hook_id: str, event_id: str, topic: str, attempt: int,
                outcome: Outcome, reason: Optional[str] = None,
                keep: Optional[int] = None) -> dict:
    """One delivery log entry, as :func:`log_attempts` takes it: the first
    ``keep`` (``log_body_bytes``) bytes of the answer (the sender read more
    to decide)."""
    if keep is None:
        keep = settings.log_body_bytes()
    kept = outcome.body[:keep] if outcome.body else b""
    body = kept.decode("utf-8", "replace").replace("\x00", "\ufffd") \
        if kept else None  # text PostgreSQL can store
    return {"h": hook_id, "e": event_id, "t": topic, "n": attempt, "s": outcome.status,
            "x": outcome.error, "d": int(outcome.duration * 1000), "r": body, "why": reason}


def log_attempts(rows: list[dict]) -> None:
    """Append attempts (see :func:`attempt_row`) to the delivery log, in the
    caller's transaction."""
    model.Session.execute(sa.text("""
        INSERT INTO webhooks_attempt (hook_id, event_id, topic, at, attempt, status, error,
                                      duration_ms, response, reason)
        SELECT v.h, v.e, v.t, now(), v.n, v.s, v.x, v.d, v.r, v.why
          FROM jsonb_to_recordset(CAST(:rows AS jsonb))
            AS v(h text, e text, t text, n int, s int, x text, d int, r text, why text)
         WHERE EXISTS (SELECT 1 FROM webhooks w WHERE w.id = v.h)
    """), {"rows": json.dumps(rows)})


def _delete_hook(hook_id: str, reason: str) -> None:
    row = model.Session.execute(sa.text(
        "DELETE FROM webhooks WHERE id = :id RETURNING topics, address"), {"id": hook_id}
    ).first()
    if row is not None:
        log.info("pruned webhook %s (%s, %s): %s", fingerprint(hook_id), " ".join(row.topics),
                 host_of(row.address), reason)


# --- pause and resume -----------------------------------------------------------

def pause(hook_id: str, reason: Optional[str] = None) -> bool:
    """Pause a hook in the caller's transaction: it hears nothing more and its
    pending deliveries are held (``due`` infinity; one on the wire now is
    recorded as usual, and held if it is to be retried). ``reason``: None when
    its owner paused it, else the rule that did (see :mod:`maintenance`).
    Returns whether it was active."""
    paused = model.Session.execute(sa.text("""
        UPDATE webhooks SET active = false, paused_at = now(), pause_reason = :reason
         WHERE id = :id AND active RETURNING topics, address
    """), {"id": hook_id, "reason": reason}).first()
    if paused is None:
        return False
    _hold(hook_id)
    if reason:
        log.info("paused webhook %s (%s, %s): %s", fingerprint(hook_id),
                 " ".join(paused.topics), host_of(paused.address), reason)
    return True


def _hold(hook_id: str) -> None:
    model.Session.execute(sa.text("""
        UPDATE webhooks_delivery d SET due = 'infinity'
          FROM (SELECT event_id, hook_id FROM webhooks_delivery
                 WHERE hook_id = :id AND claim_token IS NULL
                 ORDER BY event_id COLLATE "C", hook_id COLLATE "C" FOR UPDATE) o
         WHERE d.event_id = o.event_id AND d.hook_id = o.hook_id
    """), {"id": hook_id})


def resume(hook_id: str) -> bool:
    """Resume a paused hook in the caller's transaction: its failure counts
    start afresh and its held deliveries are due now (PostgreSQL notifies the
    workers when the transaction commits). Returns whether it was paused."""
    resumed = model.Session.execute(sa.text("""
        UPDATE webhooks SET active = true, paused_at = NULL, pause_reason = NULL,
                            consecutive_failures = 0, consecutive_4xx = 0,
                            failing_since = NULL
         WHERE id = :id AND NOT active RETURNING id
    """), {"id": hook_id}).first()
    if resumed is None:
        return False
    model.Session.execute(sa.text("""
        UPDATE webhooks_delivery d SET due = now()
          FROM (SELECT event_id, hook_id FROM webhooks_delivery
                 WHERE hook_id = :id AND due = 'infinity'
                 ORDER BY event_id COLLATE "C", hook_id COLLATE "C" FOR UPDATE) o
         WHERE d.event_id = o.event_id AND d.hook_id = o.hook_id
    """), {"id": hook_id})
    model.Session.execute(sa.text("SELECT pg_notify(:channel, '')"),
                          {"channel": NOTIFY_CHANNEL})
    return True


def host_of(address: str) -> str:
    try:
        return guard.parse(address)[1]
    except guard.Refused:
        return "?"

# --- requeueing ---------------------------------------------------------------

def requeue(deliveries: Iterable[tuple[str, str]]) -> None:
    """Queue each (hook id, event id) delivery again, due now, and commit;
    PostgreSQL notifies the workers' listeners when the transaction commits.

    A delivery a worker holds right now is left to it (it is being sent: it
    is not sent a second time at once; if it fails it is retried on the
    schedule). Locks are taken in the order every writer uses: the hooks by
    id, then the deliveries by (event, hook).
    """
    deliveries = sorted(set(deliveries), key=lambda d: (d[1], d[0]))
    model.Session.execute(sa.text("""
        SELECT 1 FROM webhooks WHERE id = ANY(:ids) ORDER BY id COLLATE "C" FOR KEY SHARE
    """), {"ids": sorted({hook_id for hook_id, _ in deliveries})}).all()
    for hook_id, event_id in deliveries:
        # As it was last sent (a visibility change may have turned it into a
        # dataset/create or dataset/delete), for the hook's reader as it is now.
        model.Session.execute(sa.text(f"""
            INSERT INTO webhooks_delivery (event_id, hook_id, attempts, due, audience,
                                           topic, reason)
            SELECT :event_id, w.id, 0, now(), {audience.AUDIENCE_SQL}, a.topic, a.reason
              FROM webhooks w LEFT JOIN LATERAL (
                   SELECT topic, reason FROM webhooks_attempt
                    WHERE hook_id = w.id AND event_id = :event_id
                    ORDER BY at DESC LIMIT 1) a ON true
             WHERE w.id = :hook_id
            ON CONFLICT (event_id, hook_id) DO UPDATE SET due = now()
                WHERE webhooks_delivery.claim_token IS NULL
        """), {"event_id": event_id, "hook_id": hook_id})
    model.Session.execute(sa.text("SELECT pg_notify(:channel, '')"),
                          {"channel": NOTIFY_CHANNEL})
    model.Session.commit()


def due_count(cap: int = 100000) -> int:
    return model.Session.execute(sa.text(
        "SELECT count(*) FROM (SELECT 1 FROM webhooks_delivery WHERE due <= now() "
        "LIMIT :cap) t"), {"cap": cap}).scalar_one()
