"""The retry rules of the README's *Delivery guarantees*, each proven by what
the attempt log (``webhooks_attempt``), the delivery queue
(``webhooks_delivery``) and the receiver saw, never by waiting and seeing
nothing: a delivery that will not be tried again is one whose queue row is
gone (the row and the attempt's log entry are written in one transaction), so
its log is final.

* which answers are retried: 3xx, 408, 425, 429, 5xx, network errors and
  timeouts; other 4xx are not;
* the schedule: the README's delays are the declared default, each with 0 to
  20 % jitter (the computation over 10,000 draws); the attempts of a delivery
  are spaced at least by the schedule, and after the last one it is abandoned;
* ``Retry-After`` lengthens a wait, never shortens it, and is capped at 24 h;
* a 2xx resets ``consecutive_failures`` and ``consecutive_4xx``;
* every retry carries the same body and ``webhook-id``, even when the dataset
  changed between the attempts.

The end-to-end tests use the suite's worker and ``test.ini``'s short schedule
(``0 1 1 2 2``); the network faults use a worker of their own with short
timeouts.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import re
import socket
import struct
import threading
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from ckan import model
from ckan.tests import factories

from ckanext.webhooks import delivery_queue, settings
from ckanext.webhooks.delivery_queue import HookRow, Job
from ckanext.webhooks.ids import fingerprint
from ckanext.webhooks.sender import Outcome, _retry_after

from .waiting import until

PACKAGE = Path(__file__).parents[1]
README = PACKAGE.parents[1] / "README.rst"
SCHEDULE_KEY = "ckanext.webhooks.retry_schedule"



# --- the schedule, the jitter and Retry-After, as computed ----------------------

UNITS = {"s": 1, "min": 60, "h": 3600}


def _readme_retries() -> str:
    text = " ".join(README.read_text().split())
    found = re.search(r"\* \*\*Retries\.\*\* (.+?) \* \*\*", text)
    assert found, "the README has no *Retries* paragraph"
    return found.group(1)


def _readme_schedule() -> tuple[list[float], float]:
    """The delays before each attempt (seconds) and the jitter (a fraction),
    as the README's *Retries* paragraph states them."""
    found = re.search(r"retried on the Standard Webhooks schedule: (.+?) "
                      r"\(plus up to (\d+) % jitter", _readme_retries())
    assert found, "the README no longer states the retry schedule"
    delays = []
    for item in found.group(1).split(", "):
        if item == "immediately":
            delays.append(0.0)
            continue
        amount, unit = item.split(" ")
        delays.append(float(amount) * UNITS[unit])
    return delays, int(found.group(2)) / 100


def _readme_retry_after_cap() -> float:
    """How long a Retry-After may make a wait, as the README says."""
    found = re.search(r"``Retry-After`` answer can lengthen a wait, up to (\d+) (s|min|h)\b",
                      _readme_retries())
    assert found, "the README does not say how far Retry-After may lengthen a wait"
    return float(found.group(1)) * UNITS[found.group(2)]


def _declared_default() -> str:
    declaration = yaml.safe_load((PACKAGE / "config_declaration.yaml").read_text())
    [option] = [option for group in declaration["groups"] for option in group["options"]
                if option["key"] == SCHEDULE_KEY]
    return option["default"]


def test_the_default_schedule_is_the_readmes(monkeypatch):
    """immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h: ten
    attempts, as settings reads the declared default."""
    readme, _ = _readme_schedule()
    assert readme == [0, 5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400]
    from ckan.plugins import toolkit
    monkeypatch.setitem(toolkit.config, SCHEDULE_KEY, _declared_default())
    assert settings.retry_schedule() == readme


def _job(attempts: int, outcome: Outcome | None) -> Job:
    return Job("msg_x", "hook-x", attempts, HookRow("hook-x", "http://x.test/", None, None),
               outcome=outcome)


DRAWS = 10_000


@pytest.mark.parametrize("attempt", range(1, 10), ids=lambda n: f"after-attempt-{n}")
def test_each_wait_is_the_readmes_delay_plus_0_to_20_percent(attempt):
    """Over 10,000 draws of the wait after an attempt that failed (503): every
    draw lies in [delay, delay * 1.2], and the jitter spreads over the whole
    range (each tenth of it gets about a tenth of the draws)."""
    schedule, jitter = _readme_schedule()
    delay = schedule[attempt]
    waits = [delivery_queue._retry_delay(_job(attempt, Outcome(503, None, 0.1)), schedule)
             for _ in range(DRAWS)]
    factors = [wait / delay for wait in waits]
    assert min(factors) >= 1.0 and max(factors) <= 1.0 + jitter
    # Both ends are reached (10,000 uniform draws miss a 0.5 % edge with
    # probability e^-50) ...
    assert min(factors) < 1.0 + jitter * 0.005 and max(factors) > 1.0 + jitter * 0.995
    # ... and every tenth of the range holds 7-13 % of them (10 % expected,
    # 0.3 % standard deviation): no clumping on a few values.
    tenths = [0] * 10
    for factor in factors:
        tenths[min(9, int((factor - 1.0) / jitter * 10))] += 1
    assert all(0.07 * DRAWS <= count <= 0.13 * DRAWS for count in tenths), tenths
    assert len(set(waits)) > 0.99 * DRAWS


HOUR = 3600.0


@pytest.mark.parametrize("attempt,retry_after,low,high", [
    (1, None, 5, 6),                    # the schedule alone: 5 s + jitter
    (1, 2, 5, 6),                       # a shorter Retry-After never shortens it
    (1, HOUR, HOUR, HOUR),              # a longer one lengthens it, exactly
    (1, 10**7, "cap", "cap"),           # up to the README's cap
    (9, 10**7, 86400, 86400 * 1.2),     # the schedule's own, longer, wait stays
], ids=["none", "shorter", "longer", "capped", "schedule-longer"])
def test_retry_after_lengthens_a_wait_up_to_a_cap(attempt, retry_after, low, high):
    schedule, _ = _readme_schedule()
    cap = _readme_retry_after_cap()
    low, high = (cap if bound == "cap" else bound for bound in (low, high))
    waits = {delivery_queue._retry_delay(
        _job(attempt, Outcome(429, None, 0.1, retry_after=retry_after)), schedule)
        for _ in range(200)}
    assert low <= min(waits) and max(waits) <= high


def test_retry_after_is_read_as_seconds_or_an_http_date():
    in_an_hour = email.utils.format_datetime(
        dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=1), usegmt=True)
    assert _retry_after("120") == 120 and _retry_after(" 7 ") == 7
    assert HOUR - 60 < _retry_after(in_an_hour) <= HOUR
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # past: no longer wait
    assert _retry_after("soon") is None and _retry_after("-5") is None
    assert _retry_after(None) is None


def test_which_outcomes_are_retried():
    """Every status and error kind the sender reports, as the README sorts them."""
    def kind(status=None, error=None):
        return delivery_queue._classify(Outcome(status, error, 0.1))
    for status in range(200, 600):
        expected = ("ok" if status < 300 else "gone" if status == 410
                    else "client" if 400 <= status < 500 and status not in (408, 425, 429)
                    else "retry")
        assert kind(status) == expected, status
    for error in ("timeout", "connect_error", "connection_error", "tls_error", "dns_error",
                  "internal_error"):
        assert kind(error=error) == "retry", error
    assert kind(error="refused_address") == "client"


# --- helpers for the end-to-end tests ---------------------------------------------

def _name(prefix: str = "retry") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def _log(hook_id: str) -> list:
    """The hook's attempt log, oldest first."""
    with model.meta.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT event_id, attempt, status, error, at FROM webhooks_attempt "
            "WHERE hook_id = :h ORDER BY id"), {"h": hook_id}).all()


def _queued(hook_id: str) -> list:
    """The hook's rows in the delivery queue: what may still be attempted."""
    with model.meta.engine.connect() as conn:
        return conn.execute(sa.text(
            "SELECT event_id, attempts, due, claim_token, last_status FROM webhooks_delivery "
            "WHERE hook_id = :h"), {"h": hook_id}).all()


def _wait_logged(hook_id: str, count: int, timeout: float = 30.0) -> list:
    """The hook's attempt log once it holds ``count`` attempts."""
    def enough():
        rows = _log(hook_id)
        return rows if len(rows) >= count else None
    return until(enough, timeout, lambda: f"{count} logged attempts; have {_log(hook_id)}")


def _final(hook_id: str, count: int, timeout: float = 30.0) -> list:
    """The hook's attempt log once it holds ``count`` attempts and nothing of
    the hook is queued any more: no further attempt can happen."""
    def settled():
        rows = _log(hook_id)
        return rows if len(rows) >= count and not _queued(hook_id) else None
    return until(settled, timeout,
                 lambda: f"a final log of {count}; have {_log(hook_id)}, queued "
                         f"{_queued(hook_id)}")


def _attempts(rows) -> list[tuple]:
    return [(row.attempt, row.status, row.error) for row in rows]


def _same_delivery(requests) -> None:
    """Every request is the same delivery: one webhook-id, one body, byte for
    byte. (Counted, not shown: a body names its hook's id.)"""
    ids, bodies = len({r.headers["webhook-id"] for r in requests}), len({r.body for r in requests})
    assert (ids, bodies) == (1, 1), f"{ids} webhook-id(s), {bodies} different bodies"


# --- end to end, on the suite's worker ---------------------------------------------

RETRIED = [301, 302, 303, 307, 308, 408, 425, 429, 500, 502, 503, 504]
NOT_RETRIED = [400, 401, 403, 404, 405, 409, 413, 422, 451]


@pytest.fixture
def nothing_left_queued(no_leftover_hooks):
    """Some tests leave a delivery queued for an hour or a day: drop it (with
    every hook) afterwards, so that no later test meets it."""
    yield
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM webhooks"))


@pytest.mark.usefixtures("worker", "nothing_left_queued")
class TestEndToEnd:
    def test_which_answers_are_retried(self, anon, admin, receiver, organization):
        """One event to a hook per status, each answering that status once
        and 200 after: 3xx, 408, 425, 429 and 5xx are tried again and
        delivered; other 4xx are attempted once and the delivery is over
        (nothing of it left in the queue). A 3xx is never followed."""
        hooks = {}
        for status in RETRIED + NOT_RETRIED:
            path = f"/status/{status}"
            receiver.scripts[path] = [status, 200]
            if 300 <= status < 400:
                receiver.headers_for[path] = {"Location": receiver.url("/moved")}
            hooks[status] = anon.action.webhook_create(topic="dataset/create",
                                                       address=receiver.url(path))
        admin.action.package_create(name=_name(), owner_org=organization["id"])

        for status in RETRIED:
            rows = _final(hooks[status], 2)
            assert _attempts(rows) == [(1, status, None), (2, 200, None)], status
            assert len({row.event_id for row in rows}) == 1
            requests = receiver.on(f"/status/{status}")
            assert [r.status for r in requests] == [status, 200]
            _same_delivery(requests)
            stats = anon.action.webhook_show(id=hooks[status])["statistics"]
            assert (stats["deliveries"], stats["successes"], stats["pending_deliveries"]) \
                == (2, 1, 0), status
        for status in NOT_RETRIED:
            rows = _final(hooks[status], 1)
            assert _attempts(rows) == [(1, status, None)], status
            assert [r.status for r in receiver.on(f"/status/{status}")] == [status]
            stats = anon.action.webhook_show(id=hooks[status])["statistics"]
            assert (stats["deliveries"], stats["consecutive_4xx"],
                    stats["pending_deliveries"]) == (1, 1, 0), status
        assert receiver.on("/moved") == []

    def test_a_delivery_is_abandoned_after_the_last_attempt(self, anon, admin, receiver,
                                                           organization, worker):
        """A receiver answering 503 for ever gets one attempt per entry of
        the schedule, spaced at least by it; then the delivery is abandoned:
        nothing of it is queued, the worker says it gave up, and the hook
        shows the failures with nothing pending."""
        schedule = settings.retry_schedule()
        receiver.scripts["/down"] = [503]
        hook = anon.action.webhook_create(topic="dataset/create",
                                          address=receiver.url("/down"))
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        rows = _final(hook, len(schedule), timeout=60)
        assert _attempts(rows) == [(n, 503, None) for n in range(1, len(schedule) + 1)]
        [event_id] = {row.event_id for row in rows}
        for before, after, delay in zip(rows, rows[1:], schedule[1:]):
            # A retry is due ``delay`` (plus jitter) after the failure's record.
            assert (after.at - before.at).total_seconds() >= delay
        requests = receiver.on("/down")
        assert len(requests) == len(schedule)
        _same_delivery(requests)
        gave_up = (f"giving up on event {event_id} for {fingerprint(hook)} "
                   f"after {len(schedule)} attempts")
        until(lambda: gave_up in worker.output(), 10, "the worker's giving-up line")
        shown = anon.action.webhook_show(id=hook)
        assert shown["state"] == "failing"
        stats = shown["statistics"]
        assert (stats["deliveries"], stats["successes"], stats["consecutive_failures"],
                stats["last_status"], stats["pending_deliveries"]) == \
            (len(schedule), 0, len(schedule), 503, 0)

    def test_retry_after_lengthens_a_wait_and_is_capped(self, anon, admin, receiver,
                                                        organization):
        """The schedule alone retries after 1-1.2 s here. A 429 asking for 3 s
        is retried no sooner; one asking for an hour (in seconds or as an
        HTTP date) is queued for an hour; one asking for ten days is queued
        for 24 h. (``due`` and the log's ``at`` are written in one
        transaction: their difference is the wait chosen.)"""
        in_two_hours = email.utils.format_datetime(
            dt.datetime.now(dt.timezone.utc) + dt.timedelta(hours=2), usegmt=True)
        asks = {"/ra/short": "3", "/ra/hour": "3600", "/ra/date": in_two_hours,
                "/ra/ten-days": str(10 * 86400)}
        hooks = {}
        for path, retry_after in asks.items():
            receiver.scripts[path] = [429, 200] if path == "/ra/short" else [429]
            receiver.headers_for[path] = {"Retry-After": retry_after}
            hooks[path] = anon.action.webhook_create(topic="dataset/create",
                                                     address=receiver.url(path))
        admin.action.package_create(name=_name(), owner_org=organization["id"])

        first, second = _final(hooks["/ra/short"], 2)
        assert _attempts([first, second]) == [(1, 429, None), (2, 200, None)]
        assert (second.at - first.at).total_seconds() >= 3
        _same_delivery(receiver.on("/ra/short"))

        def wait_chosen(path):
            [attempt] = _wait_logged(hooks[path], 1)
            [queued] = _queued(hooks[path])
            assert (queued.attempts, queued.last_status, queued.claim_token) == (1, 429, None)
            return (queued.due - attempt.at).total_seconds()
        assert wait_chosen("/ra/hour") == HOUR
        assert 2 * HOUR - 120 <= wait_chosen("/ra/date") <= 2 * HOUR
        assert wait_chosen("/ra/ten-days") == _readme_retry_after_cap()

    def test_a_2xx_resets_the_failure_counts(self, anon, admin, receiver, organization):
        """A 503 (its retry an hour away), then two 404s: three failures in a
        row, the last two 4xx; the next event's 200 resets both counts."""
        receiver.scripts["/counts"] = [503, 404, 404, 200]
        receiver.headers_for["/counts"] = {"Retry-After": "3600"}
        hook = anon.action.webhook_create(topic="dataset/create",
                                          address=receiver.url("/counts"))

        def after_next_event(count):
            admin.action.package_create(name=_name(), owner_org=organization["id"])
            _wait_logged(hook, count)
            shown = anon.action.webhook_show(id=hook)
            stats = shown["statistics"]
            return (stats["consecutive_failures"], stats["consecutive_4xx"],
                    shown["state"], stats["last_status"])
        assert after_next_event(1) == (1, 0, "failing", 503)
        assert after_next_event(2) == (2, 1, "failing", 404)
        assert after_next_event(3) == (3, 2, "failing", 404)
        assert after_next_event(4) == (0, 0, "healthy", 200)
        assert anon.action.webhook_show(id=hook)["statistics"]["failing_since"] is None

    def test_every_retry_carries_the_same_body_and_id(self, anon, admin, receiver,
                                                      organization):
        """A dataset/create answered 503 twice, then 200; before each retry
        the dataset is changed (and the change delivered to another hook).
        Every attempt carries the first rendering, byte for byte, and the
        same webhook-id. Each 503 asks for
        an hour: the test moves the retry's ``due`` to now once the change
        is out, so the order is certain (the retry itself is the worker's)."""
        receiver.scripts["/created"] = [503, 503, 200]
        receiver.headers_for["/created"] = {"Retry-After": "3600"}
        hook = anon.action.webhook_create(topic="dataset/create",
                                          address=receiver.url("/created"))
        anon.action.webhook_create(topic="dataset/update", address=receiver.url("/changes"))
        dataset = admin.action.package_create(name=_name(), title="As created",
                                              owner_org=organization["id"])
        for attempt, title in ((1, "Changed once"), (2, "Changed twice")):
            _wait_logged(hook, attempt)
            admin.action.package_patch(id=dataset["id"], title=title)
            [update] = receiver.wait_count("/changes", attempt)[attempt - 1:]
            assert update.json["data"]["title"] == title
            [queued] = _queued(hook)
            assert (queued.attempts, queued.claim_token) == (attempt, None), \
                "the retry was taken before the change: nothing tested"
            with model.meta.engine.begin() as conn:
                conn.execute(sa.text("UPDATE webhooks_delivery SET due = now() "
                                     "WHERE hook_id = :h AND claim_token IS NULL"),
                             {"h": hook})
        rows = _final(hook, 3)
        assert _attempts(rows) == [(1, 503, None), (2, 503, None), (3, 200, None)]
        requests = receiver.on("/created")
        assert [r.status for r in requests] == [503, 503, 200]
        _same_delivery(requests)
        assert requests[0].json["data"]["title"] == "As created"


# --- network faults, on a worker with short timeouts -------------------------------

class FaultyServer:
    """A TCP server on 127.0.0.2 whose successive connections act as ``plan``
    says, then answer 200 to every request: ``silent`` (read the request,
    never answer), ``reset`` (read it, then reset the connection). Created
    bound but not listening when ``listening`` is false: connections are
    refused until :meth:`listen`. Records every request it read, raw."""

    def __init__(self, plan: list[str], listening: bool = True) -> None:
        self.plan = list(plan)
        self.requests: list[bytes] = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.2", 0))
        self.port = self.sock.getsockname()[1]
        self._closed = threading.Event()
        if listening:
            self.listen()

    def url(self, path: str = "/x") -> str:
        return f"http://127.0.0.2:{self.port}{path}"

    def listen(self) -> None:
        self.sock.listen(16)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            behaviour = self.plan.pop(0) if self.plan else "ok"
            threading.Thread(target=self._serve, args=(conn, behaviour), daemon=True).start()

    def _serve(self, conn: socket.socket, behaviour: str) -> None:
        try:
            with conn:
                while (request := self._read(conn)):
                    self.requests.append(request)
                    if behaviour == "silent":
                        conn.settimeout(30)
                        conn.recv(1)  # until the sender gives up and closes
                        return
                    if behaviour == "reset":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                        return  # closing with linger 0 sends a reset
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except OSError:
            pass

    @staticmethod
    def _read(conn: socket.socket) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return b""
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].lower()
        length = int(re.search(rb"content-length:\s*(\d+)", head).group(1))
        while len(data.split(b"\r\n\r\n", 1)[1]) < length:
            data += conn.recv(65536)
        return data

    def close(self) -> None:
        self._closed.set()
        self.sock.close()


def _split(raw: bytes) -> tuple[dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}, body


def _add_hook(address: str, dataset_id: str) -> str:
    """A hook on ``dataset/update`` of one dataset, stored directly: a closed
    port could not answer the verification handshake."""
    hook_id = f"retry-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO webhooks (id, topics, address, host, site, dataset_id, created)
            VALUES (:id, ARRAY['dataset/update'], :address, '127.0.0.2', '127.0.0.2',
                    :dataset, now())
        """), {"id": hook_id, "address": address, "dataset": dataset_id})
    return hook_id


@pytest.mark.usefixtures("no_leftover_hooks")
def test_network_errors_and_timeouts_are_retried(private_stack, with_plugins, organization):
    """A closed port (``connect_error``), a connection reset after the request
    was read (``connection_error``) and a receiver that never answers
    (``timeout``): each attempt fails as such, the delivery is tried again
    and delivered, with the same body and webhook-id as the failed attempt."""
    private_stack({
        "ckanext.webhooks.celery.queue": f"retry-rules-{uuid.uuid4().hex[:8]}",
        "ckanext.webhooks.timeout": "2", "ckanext.webhooks.connect_timeout": "1",
        "ckanext.webhooks.sweep_interval": "1",
        "ckanext.webhooks.retry_schedule": " ".join(["0"] + ["1"] * 9),
    }, web=False)
    dataset = factories.Dataset(owner_org=organization["id"])
    closed = FaultyServer([], listening=False)
    reset, silent = FaultyServer(["reset"]), FaultyServer(["silent"])
    servers = {"connect_error": closed, "connection_error": reset, "timeout": silent}
    hooks = {kind: _add_hook(server.url(f"/{kind}"), dataset["id"])
             for kind, server in servers.items()}
    try:
        package = model.Package.get(dataset["id"])
        package.notes = "retry me"
        model.Session.commit()
        model.Session.remove()
        [refused] = _wait_logged(hooks["connect_error"], 1)
        assert (refused.status, refused.error) == (None, "connect_error")
        assert closed.requests == []
        closed.listen()  # the receiver comes up: the next attempt gets through

        for kind, server in servers.items():
            rows = _final(hooks[kind], 2)
            assert (rows[0].status, rows[0].error) == (None, kind), kind
            assert (rows[-1].status, rows[-1].error) == (200, None), kind
            assert len({row.event_id for row in rows}) == 1
            # The failed attempt reached the receiver (but the closed port's).
            assert len(server.requests) == (1 if server is closed else 2), kind
            seen = [_split(raw) for raw in server.requests]
            ids, bodies = len({h["webhook-id"] for h, _ in seen}), len({b for _, b in seen})
            assert (ids, bodies) == (1, 1), f"{kind}: {ids} webhook-id(s), {bodies} bodies"
            assert seen[0][0]["webhook-id"] == rows[0].event_id
    finally:
        for server in servers.values():
            server.close()
