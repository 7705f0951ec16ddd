"""Delivery queue and pruning, on top of the database (fan-out, which fills
the queue, is :mod:`fanout`).

The Celery tasks in :mod:`tasks` are thin: they call these functions. The
database is the source of truth:

* :func:`drain` claims due rows (``FOR UPDATE SKIP LOCKED``; the claim gives
  them a fresh token and moves ``due`` forward by a lease, which the worker
  renews while it works on them, so work held by a dead worker comes back by
  itself), sends them concurrently, and records the outcomes in bulk on the
  rows that still carry its token: rows delivered or given up are deleted,
  failed ones get their next ``due`` from the retry schedule, hooks get their
  statistics, and hooks that answer 410 or too many 4xx are deleted.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import json
import logging
import mmap
import os
import random
import secrets
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple, Optional

import sqlalchemy as sa

from ckan import model
from ckan.plugins import PluginImplementations

from . import audience, guard, payload, settings, signing, topics
from .delivery import Outcome, Request, Sender
from .ids import fingerprint
from .interfaces import IWebhooks
from .model import WebhookEvent

log = logging.getLogger(__name__)
# The channel the outbox trigger (migration 01) notifies and workers LISTEN on.
NOTIFY_CHANNEL = "ckanext_webhooks_events"


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


def _hold_limit() -> float:
    return PREPARE_LIMIT + 2 * settings.timeout() + RECORD_SLACK


class _Leases:
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
            self._until[token] = time.monotonic() + _hold_limit()
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


_leases = _Leases()
os.register_at_fork(after_in_child=_leases._after_fork)

# Rows of the given claim tokens, locked in key order (every writer of
# webhooks_delivery locks in this order, so none waits on another in a cycle)
# or skipped when another transaction holds them (``{skip}``).
_OWNED = """(SELECT event_id, hook_id FROM webhooks_delivery
              WHERE claim_token = ANY(:tokens)
              ORDER BY event_id COLLATE "C", hook_id COLLATE "C" FOR UPDATE{skip})"""


def renew(tokens: list[str], lease: float) -> int:
    """Move the lease end of the rows still carrying these tokens to ``lease``
    seconds from now, in a transaction of its own; returns the rows renewed.
    Rows another transaction is recording are skipped (never waited for)."""
    with model.meta.engine.begin() as conn:
        return conn.execute(sa.text(f"""
            UPDATE webhooks_delivery d SET due = now() + make_interval(secs => :lease)
              FROM {_OWNED.format(skip=" SKIP LOCKED")} o
             WHERE d.event_id = o.event_id AND d.hook_id = o.hook_id
        """), {"tokens": tokens, "lease": lease}).rowcount


def _hand_back(tokens: list[str]) -> None:
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


# --- shutdown -------------------------------------------------------------------
#
# Once a worker is asked to stop, drain() claims nothing more: the batches on
# the wire finish (within the timeout) and are recorded, so a restart neither
# sends twice nor loses anything. Celery's warm shutdown happens in the
# worker's main process: it sets this flag in memory that the pool processes
# share (they are forked from it after this module is imported). 1: warm
# shutdown, 2: cold (the pool is being terminated).
_worker_stopping = mmap.mmap(-1, 1)
_stop_here = threading.Event()  # this process was asked to stop (SIGTERM)
_in_pool_process = False        # a Celery pool process (set by celery_app)


def worker_stopping(cold: bool = False) -> None:
    """The worker is shutting down: claim no more (every process of it)."""
    _worker_stopping[0] = max(_worker_stopping[0], 2 if cold else 1)


def in_pool_process() -> None:
    global _in_pool_process
    _in_pool_process = True


def stopping() -> bool:
    return bool(_worker_stopping[0]) or _stop_here.is_set()


@contextlib.contextmanager
def sigterm_deferred():
    """Around a task in a pool process. SIGTERM (systemd stopping the service,
    a deploy, the pool being terminated) would end the process at once, with
    requests on the wire and their outcomes unrecorded (and sent again when
    their lease ran out). Under this it only asks :func:`drain` to stop; once
    the task is done it takes its course, unless the pool is closing in a warm
    shutdown (the process then ends when the pool tells it to). A second
    SIGTERM, or one during a cold shutdown, takes its course at once."""
    previous = signal.getsignal(signal.SIGTERM) \
        if threading.current_thread() is threading.main_thread() else None
    if not _in_pool_process or previous in (None, signal.SIG_IGN):
        yield
        return
    state = {"deferred": False, "passed_on": False}

    def on_sigterm(signum, frame):
        if state["deferred"] or _worker_stopping[0] == 2:
            state["passed_on"] = True
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signum)
            return
        state["deferred"] = True
        _stop_here.set()
        log.info("SIGTERM: finishing the deliveries on the wire, claiming no more")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        if state["deferred"] and not state["passed_on"] and _worker_stopping[0] != 1:
            signal.raise_signal(signal.SIGTERM)


# --- per-process state ------------------------------------------------------

_sender: Optional[Sender] = None
_state_lock = threading.Lock()
_events: "collections.OrderedDict[str, _DetachedEvent]" = collections.OrderedDict()
_envelopes: "collections.OrderedDict[tuple, str]" = collections.OrderedDict()


def _process_sender() -> Sender:
    global _sender
    with _state_lock:
        if _sender is None:
            # Timeouts, DNS, the healthy pool and the slow lane: see Sender.from_config.
            _sender = Sender.from_config()
    return _sender


# --- delivery queue ---------------------------------------------------------

@dataclass
class _Job:
    event_id: str
    hook_id: str
    attempts: int
    hook: "_HookRow"
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
    # Preparing it raised: nothing was sent; retried on the schedule, not
    # counted against the hook.
    prepare_error: Optional[str] = None


class _HookRow(NamedTuple):
    """What a delivery needs of its hook, read with the claim."""
    id: str
    address: str
    secret: Optional[str]
    user_id: Optional[str]
    token_id: Optional[str] = None


def claim(limit: int) -> list[_Job]:
    """Lease up to ``limit`` due deliveries, with their hooks, in one statement,
    under a fresh claim token; this process renews the lease until it releases
    the token (:data:`_leases`). Rows whose lease ran out are due again."""
    session = model.Session
    token = secrets.token_hex(16)
    lease = settings.lease_seconds()
    rows = session.execute(sa.text("""
        UPDATE webhooks_delivery d
           SET due = now() + make_interval(secs => :lease), attempts = d.attempts + 1,
               claim_token = :token
          FROM (SELECT event_id, hook_id FROM webhooks_delivery
                 WHERE due <= now()
                 ORDER BY due LIMIT :limit FOR UPDATE SKIP LOCKED) c, webhooks h
         WHERE d.event_id = c.event_id AND d.hook_id = c.hook_id AND h.id = d.hook_id
        RETURNING d.event_id, d.hook_id, d.attempts, d.audience, d.topic, d.reason,
                  h.address, h.secret, h.user_id, h.token_id
    """), {"lease": lease, "limit": limit, "token": token}).all()
    session.commit()
    if rows:
        _leases.hold(token, lease)
    return [_Job(r.event_id, r.hook_id, r.attempts,
                 _HookRow(r.hook_id, r.address, r.secret, r.user_id, r.token_id),
                 r.audience, r.topic, r.reason, claim_token=token) for r in rows]


MAX_BATCHES_IN_FLIGHT = 4
# More, while the sender has free slots for healthy receivers: batches held
# by slow receivers must not keep new work from the healthy ones.
MAX_BATCHES_WITH_FREE_SLOTS = 16
POLL_SECONDS = 0.25  # how often a drain with batches in flight looks for new work


def drain(budget: float = 30.0) -> tuple[int, bool]:
    """Deliver due work until none is left or ``budget`` seconds have passed.

    Several batches are on the wire at once and each is recorded as soon as
    it completes, so a receiver that keeps one batch waiting for its timeout
    does not hold up the batches after it. Once the worker is asked to stop
    (:func:`stopping`) nothing more is claimed, and the batches on the wire
    are finished and recorded before it returns.
    Returns (attempts made, whether due work may remain).
    """
    from .fanout import fan_out
    started = time.monotonic()
    total, in_flight, exhausted = 0, [], False
    try:
        while True:
            if not stopping() and time.monotonic() - started < budget:
                if in_flight:
                    # While batches wait on slow receivers, new events and
                    # newly due work go out beside them, not after them.
                    fan_out()
                exhausted = False
                while len(in_flight) < MAX_BATCHES_IN_FLIGHT or (
                        len(in_flight) < MAX_BATCHES_WITH_FREE_SLOTS
                        and _process_sender().free_capacity() > 0):
                    jobs = claim(settings.batch_size())
                    if not jobs:
                        exhausted = True
                        break
                    in_flight.append(_send(jobs, _prepare_batch(jobs)))
                    total += len(jobs)
            if not in_flight:
                if stopping() and not exhausted:
                    log.info("stopping: %d attempt(s) made and recorded, the rest "
                             "left to other workers", total)
                return total, not exhausted
            futures = [f for _, _, f in in_flight if f is not None]
            if futures:
                concurrent.futures.wait(futures, timeout=POLL_SECONDS,
                                        return_when=concurrent.futures.FIRST_COMPLETED)
            for batch in [b for b in in_flight if b[2] is None or b[2].done()]:
                _finish(*batch)
                in_flight.remove(batch)
                _leases.release(batch[0][0].claim_token)
    except BaseException as error:
        if in_flight and not isinstance(error, Exception):
            # Made to stop at once (a second SIGTERM): what is not recorded
            # goes back to the queue now rather than when its lease runs out.
            try:
                _hand_back([b[0][0].claim_token for b in in_flight])
                log.info("stopping at once: %d batch(es) handed back", len(in_flight))
            except Exception as hand_back_error:  # noqa: BLE001 - their leases run out
                log.warning("could not hand back unrecorded work: %s", hand_back_error)
        raise
    finally:  # whatever is left unrecorded is not renewed: its lease runs out
        _leases.release(*(b[0][0].claim_token for b in in_flight))


def _prepare_batch(jobs: list[_Job]) -> list[_Job]:
    """:func:`_prepare`, with a failure of the batch as a whole (rather than of
    one delivery) confined to the batch: each of its deliveries not decided yet
    is retried on the schedule, and the drain goes on with other batches."""
    try:
        return _prepare(jobs)
    except Exception as error:  # noqa: BLE001
        _prepare_failed([job for job in jobs if job.outcome is None and job.drop is None
                         and job.prepare_error is None], error)
        return []


_failure_traces: dict[tuple, None] = {}


def _prepare_failed(jobs: list[_Job], error: Exception) -> None:
    """Preparing these deliveries raised (a plugin, authorization, rendering):
    nothing was sent, and each is retried on the schedule like a failed attempt
    (not counted against its hook), then given up. Logged with the hooks'
    fingerprints, never their ids (nor addresses or secrets, scrubbed from the
    message); the traceback once per process and distinct stack."""
    model.Session.rollback()  # its read transaction may be broken: go on in a new one
    text = "".join(traceback.format_exception_only(type(error), error)).strip()
    for job in jobs:
        job.prepare_error = "internal_error"
        for secret, stand_in in ((job.hook_id, fingerprint(job.hook_id)),
                                 (job.hook.address, "<address>"), (job.hook.secret, "<secret>")):
            if secret:
                text = text.replace(secret, stand_in)
    stack = tuple((frame.filename, frame.lineno)
                  for frame in traceback.extract_tb(error.__traceback__))
    if len(_failure_traces) > 100:
        _failure_traces.clear()
    trace = ""
    if stack not in _failure_traces:
        _failure_traces[stack] = None
        trace = "\n" + "".join(traceback.format_list(traceback.extract_tb(error.__traceback__)))
    if not jobs:
        log.error("could not prepare a batch (no delivery affected): %s%s", text, trace)
        return
    log.error("could not prepare event %s for %s%s (attempt %d): %s%s", jobs[0].event_id,
              fingerprint(jobs[0].hook_id),
              f" and {len(jobs) - 1} other(s)" if len(jobs) > 1 else "",
              jobs[0].attempts, text, trace)


def _prepare(jobs: list[_Job]) -> list[_Job]:
    """Decide, for each claimed job, whether and what to send; returns the sendable.

    Each body is the one rendered for the delivery's own audience. Access is
    checked again now: it can withhold a delivery (access lost since fan-out,
    a token revoked, a user blocked) but never widen one.
    """
    session = model.Session
    readers = _readers_now(jobs)
    names = audience.reader_names(key for key, _ in readers.values())
    extensions = list(PluginImplementations(IWebhooks))
    sendable = []
    for job in jobs:
        try:
            hook = job.hook
            event = _event(job.event_id)
            if event is None:
                job.drop = "gone"
                continue
            job.topic = job.delivered_topic or event.topic
            key, active = readers.get(hook.id, (None, False))
            reader = names.get(key) if active else None
            if reader is None:
                job.drop = "reader_gone"
                continue
            if key != job.audience:  # its body was rendered for another reader
                job.drop = "reader_changed"
                continue
            check = _access_check(event, job.topic)
            if check is not None and not _may_still_read(reader, key, event, check):
                job.drop = "not_visible"
                continue
            envelope = _envelope(event, key, job.topic, job.reason)
            if envelope is None:
                job.drop = "no_view"
                continue
            # The address is resolved and checked by the sender, at the attempt.
            job.body = payload.body_for(envelope, hook.id)
            if extensions:
                job.body = _through_plugins(extensions, job.body, hook)
                if job.body is None:
                    job.drop = "vetoed"
                    continue
            sendable.append(job)
        except Exception as error:  # noqa: BLE001 - it fails alone; the batch goes on
            _prepare_failed([job], error)
    session.rollback()  # end the read transaction before the slow part
    return sendable


def _readers_now(jobs: list[_Job]) -> dict[str, tuple[str, bool]]:
    """hook id -> (its audience now, whether its reader is still active)."""
    rows = model.Session.execute(sa.text(f"""
        SELECT w.id, {audience.AUDIENCE_SQL} AS audience,
               {audience.READER_ACTIVE_SQL} AS active
          FROM webhooks w WHERE w.id = ANY(:ids)
    """), {"ids": list({job.hook_id for job in jobs})}).all()
    return {row.id: (row.audience, row.active) for row in rows}


ACCESS_CHECK_TTL = 1.0  # seconds an access check at delivery is reused for
_access_checks: "collections.OrderedDict[tuple, tuple[bool, float]]" = \
    collections.OrderedDict()


def _may_still_read(reader: str, key: str, event, check: tuple[str, str]) -> bool:
    """May the reader still see what this delivery shows? Judged by CKAN's
    authorization at most ACCESS_CHECK_TTL ago: consecutive batches of one
    event share the answer instead of asking once per batch and audience."""
    cache_key = (event.id, key, check)
    cached = _access_checks.get(cache_key)
    if cached is not None and cached[1] > time.monotonic():
        return cached[0]
    allowed = audience.may_read(reader, check[0], check[1], event.package_id)
    _access_checks[cache_key] = (allowed, time.monotonic() + ACCESS_CHECK_TTL)
    _access_checks.move_to_end(cache_key)
    while len(_access_checks) > 4096:
        _access_checks.popitem(last=False)
    return allowed


def _access_check(event, topic: str) -> Optional[tuple[str, str]]:
    """What the reader must still be allowed to see for this delivery to go:
    (action, id), or None for a delete (it says no more than the reader saw)."""
    if topic in (topics.DATASET_CREATE, topics.DATASET_UPDATE):
        return ("package_show", event.package_id)
    if topic in (topics.RESOURCE_CREATE, topics.RESOURCE_UPDATE):
        return ("resource_show", event.object_id)
    if topic in topics.TOPICS or not event.package_id:
        return None
    return ("package_show", event.package_id)  # a plugin's topic about a dataset


def _through_plugins(extensions, body: str, hook) -> Optional[str]:
    """Let IWebhooks plugins veto or change one delivery; None means vetoed."""
    data = json.loads(body)
    info = {"id": hook.id, "address": hook.address, "user_id": hook.user_id,
            "topic": data["topic"]}
    for plugin in extensions:
        if plugin.webhooks_veto(data, info):
            return None
        data = plugin.webhooks_payload(data, info)
    return json.dumps(data, separators=(",", ":"), default=str)


def _send(jobs: list[_Job], sendable: list[_Job]):
    """Hand the sendable jobs to the sender: it resolves and checks each address,
    and signs each request right before writing it. A job that cannot even be
    handed over has that as its outcome (``internal_error``, retried)."""
    requests, handed = [], []
    for job in sendable:
        try:
            requests.append(Request(job.hook.address, job.body.encode("utf-8"), job.event_id,
                                    signing.secrets_of(job.hook.secret)))
            handed.append(job)
        except Exception:  # noqa: BLE001 - this delivery's outcome, not the batch's
            log.exception("could not hand event %s for %s to the sender", job.event_id,
                          fingerprint(job.hook_id))
            job.outcome = Outcome(None, "internal_error", 0.0, sent=False)
    future = _process_sender().submit(requests) if requests else None
    return jobs, handed, future


def _finish(jobs: list[_Job], sendable: list[_Job], future) -> None:
    if future is not None:
        for job, outcome in zip(sendable, future.result()):
            job.outcome = outcome
    _record(jobs)


def _event(event_id: str) -> Optional["_DetachedEvent"]:
    cached = _events.get(event_id)
    if cached is not None:
        _events.move_to_end(event_id)
        return cached
    event = model.Session.get(WebhookEvent, event_id)
    if event is None:
        return None
    _events[event_id] = cached = _DetachedEvent(event)
    while len(_events) > 256:
        _events.popitem(last=False)
    return cached


def _envelope(event: "_DetachedEvent", key: str, topic: str, reason: Optional[str]
              ) -> Optional[str]:
    """The body shared by every hook of one audience, topic and reason; None
    when the audience has no rendering of the event."""
    cache_key = (event.id, key, topic, reason)
    cached = _envelopes.get(cache_key)
    if cached is not None:
        _envelopes.move_to_end(cache_key)
        return cached
    data = payload.delivery_data(event, topic, lambda: _rendering(event.id, key))
    if data is None:
        return None
    envelope = payload.event_envelope(
        event, json.dumps(data, separators=(",", ":"), default=str), topic, reason)
    _envelopes[cache_key] = envelope
    while len(_envelopes) > 256:
        _envelopes.popitem(last=False)
    return envelope


def _rendering(event_id: str, key: str) -> Optional[Any]:
    """The stored rendering of an event for an audience, or None."""
    return model.Session.execute(sa.text(
        "SELECT data FROM webhooks_rendering WHERE event_id = :e AND audience = :a "
        "AND data IS NOT NULL"), {"e": event_id, "a": key}).scalar()


class _DetachedEvent:
    """The fields of an event that deliveries need, safe to keep in a cache."""

    def __init__(self, event: WebhookEvent) -> None:
        self.id = event.id
        self.topic = event.topic
        self.object_id = event.object_id
        self.package_id = event.package_id
        self.created = event.created
        self.snapshot = event.snapshot
        self.data = event.data


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


def _retry_delay(job: _Job, schedule: list[float]) -> float:
    delay = schedule[job.attempts] * random.uniform(1.0, 1.2)
    if job.outcome is not None and job.outcome.retry_after:
        delay = max(delay, min(job.outcome.retry_after, 86400.0))
    return delay


def _record(jobs: list[_Job]) -> None:
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
    owned = {(row.event_id, row.hook_id) for row in session.execute(
        sa.text(_OWNED.format(skip="")), {"tokens": [token]})}
    mine = [job for job in jobs if (job.event_id, job.hook_id) in owned]
    if len(mine) < len(jobs):
        _report_lost([job for job in jobs if (job.event_id, job.hook_id) not in owned])
    schedule = settings.retry_schedule()
    finished, retries, handed_back = [], [], []
    per_hook: dict[str, dict] = {}
    for job in mine:
        if job.prepare_error is not None:  # nothing was sent
            if job.attempts < len(schedule):
                retries.append({"e": job.event_id, "h": job.hook_id,
                                "delay": _retry_delay(job, schedule), "status": None,
                                "error": job.prepare_error})
            else:
                log.warning("giving up on event %s for %s after %d attempts (it could not "
                            "be prepared)", job.event_id, fingerprint(job.hook_id),
                            job.attempts)
                finished.append({"e": job.event_id, "h": job.hook_id})
            continue
        if job.outcome is None:  # dropped: nothing was sent
            finished.append({"e": job.event_id, "h": job.hook_id})
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
        else:
            if kind == "retry":
                log.warning("giving up on event %s for %s after %d attempts",
                            job.event_id, fingerprint(job.hook_id), job.attempts)
            finished.append({"e": job.event_id, "h": job.hook_id})

    attempts = [attempt_row(job.hook_id, job.event_id, job.topic, job.attempts, job.outcome,
                            job.reason)
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
    doomed = []
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
                doomed.append((row.id, f"answered 4xx {row.consecutive_4xx} times in a row"))
    session.commit()
    for hook_id, reason in sorted(doomed):
        _delete_hook(hook_id, reason)
        session.commit()


def _report_lost(lost: list[_Job]) -> None:
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
                outcome: Outcome, reason: Optional[str] = None) -> dict:
    """One delivery log entry, as :func:`log_attempts` takes it."""
    body = outcome.body.decode("utf-8", "replace").replace("\x00", "\ufffd") \
        if outcome.body else None  # text PostgreSQL can store
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
        "DELETE FROM webhooks WHERE id = :id RETURNING topic, address"), {"id": hook_id}
    ).first()
    if row is not None:
        log.info("pruned webhook %s (%s, %s): %s", fingerprint(hook_id), row.topic,
                 _host(row.address), reason)


def _host(address: str) -> str:
    try:
        return guard.parse(address)[1]
    except guard.Refused:
        return "?"


# --- sweeping and pruning -----------------------------------------------------

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


def prune() -> dict[str, int]:
    """Delete stale hooks and old fanned-out events; returns what was removed."""
    session = model.Session
    stale_days = settings.stale_after_days()
    stale = session.execute(sa.text("""
        DELETE FROM webhooks
         WHERE id IN (SELECT id FROM webhooks
                       WHERE failing_since < now() - make_interval(secs => :secs)
                       ORDER BY id COLLATE "C" FOR UPDATE)
        RETURNING id, topic, address
    """), {"secs": stale_days * 86400}).all()
    for row in stale:
        log.info("pruned webhook %s (%s, %s): only failures for %g days",
                 fingerprint(row.id), row.topic, _host(row.address), stale_days)
    retention = settings.log_retention_days()
    attempts = session.execute(sa.text("""
        DELETE FROM webhooks_attempt WHERE at < now() - make_interval(secs => :secs)
    """), {"secs": retention * 86400}).rowcount
    events = session.execute(sa.text("""
        DELETE FROM webhooks_event e
         WHERE fanned_out < now() - make_interval(secs => :secs)
           AND NOT EXISTS (SELECT 1 FROM webhooks_delivery d WHERE d.event_id = e.id)
    """), {"secs": retention * 86400}).rowcount
    session.commit()
    return {"stale_hooks": len(stale), "old_events": events, "old_attempts": attempts}

