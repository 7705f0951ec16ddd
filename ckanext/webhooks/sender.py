"""HTTP delivery attempts: POST bodies to checked addresses, bounded in time and
size, many at once over pooled keep-alive connections.

One asyncio event loop per process (on its own thread) runs every attempt.
Each connection is an :class:`asyncio.Protocol`; the answer is parsed by
``httptools`` (bindings to llhttp, Node.js's HTTP parser), and the request head
is written in one piece from parts already checked (the address by
:mod:`guard`, the headers are ours). It costs a fraction of the CPU of h11
over asyncio streams, which it replaced, and of aiohttp (``bench/`` and the
README measure both).

* Each attempt resolves the hook's address (:class:`guard.Resolver`: off the
  loop, cached a few seconds, its own timeout) and connects to an address
  :mod:`guard` checked, never to the name (the Host header and TLS
  SNI/verification still use the name). A name that does not resolve is a
  ``dns_error`` (retried), one that resolves to a refused address a
  ``refused_address``.
* The Standard Webhooks headers are made (:mod:`signing`) right before the
  request is written: ``webhook-timestamp`` is the time it leaves.
* Redirects are not followed: a 3xx is a failed attempt.
* https: TLS 1.2 or later, the certificate verified against ``ca_bundle``
  (``ckanext.webhooks.ca_bundle``) or else certifi's bundle, and its host
  name checked against the hook's name (an IP address for a literal). A
  certificate that does not verify fails the attempt as ``tls_error``,
  nothing sent.
* ``total_timeout`` bounds, from the moment it is submitted, resolving and
  waiting for a slot (see :class:`_Gates`): an attempt that never got a slot
  ends as ``timeout`` without being sent (``waited_for_slot``; the queue gives
  it back without counting it). From its slot on, a second ``total_timeout``
  bounds connecting (also bounded by ``connect_timeout``), sending and
  reading, however the receiver trickles its answer: a request is never cut
  short because it queued, so queueing never sends anything twice.
* At most ``max_bytes`` of the answer's body and ``MAX_HEAD_BYTES`` of its head
  are read; a longer answer's connection is closed rather than drained.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import email.utils
import functools
import logging
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional
from urllib.parse import quote

import httptools

from . import guard, signing

log = logging.getLogger(__name__)

MAX_IDLE_PER_HOST = 64
MAX_POOLS = 1000
MAX_HEAD_BYTES = 16384
# What may appear in the request line's target and in a header (RFC 9110/9112).
_TARGET_OK = re.compile(r"[\x21-\x7e]+")
_NAME_OK = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE_OK = re.compile(r"[\t\x20-\x7e]*")


@dataclass
class Outcome:
    status: Optional[int]
    # The error kind when no usable HTTP status was received: timeout (also
    # for an attempt that never got a slot before its deadline: not sent),
    # connect_error, connection_error, tls_error, invalid_request,
    # refused_address, dns_error (the name did not resolve now: retried, never
    # a 4xx) or internal_error (a fault of ours with this request: retried).
    error: Optional[str]
    duration: float
    body: bytes = b""
    retry_after: Optional[float] = None
    # False when the request was never written to a connection (it could not
    # be resolved, checked or signed, or waited for a slot or a connection
    # until its deadline): the receiver cannot have seen it.
    sent: bool = True
    # True when the deadline passed while it waited for a slot of this worker
    # (resolved and ready, never sent): this worker's congestion, not the
    # receiver's failure; the queue gives it back without counting an attempt.
    waited_for_slot: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _Failed(Exception):
    def __init__(self, kind: str, status: Optional[int] = None) -> None:
        super().__init__(kind)
        self.kind, self.status = kind, status


class _Answer:
    """What was read of one response: status, capped body, Retry-After."""
    __slots__ = ("status", "body", "retry_after")

    def __init__(self, status: int, body: bytes, retry_after: Optional[str]) -> None:
        self.status, self.body, self.retry_after = status, body, retry_after


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to a receiver, one request at a time.

    The parser's callbacks (``on_*``) collect the answer; ``waiter`` gets an
    :class:`_Answer` or a :class:`_Failed`. Bytes nobody asked for, a broken or
    oversized answer, or a close before the answer ends, make the connection
    unusable.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: Optional[asyncio.Future] = None
        self.lost = False
        self._reset()

    def _reset(self) -> None:
        self.received = 0          # bytes of the current answer, head included
        self.head_size = 0         # bytes of the head's complete lines so far
        self.status: Optional[int] = None
        self.head_done = False
        self.framed = False        # Content-Length or Transfer-Encoding was given
        self.chunks: list[bytes] = []
        self.size = 0
        self.capped = False
        self.retry_after: Optional[bytes] = None
        self.reusable = False

    @property
    def usable(self) -> bool:
        return not self.lost and not self.transport.is_closing()

    def request(self, data: bytes) -> asyncio.Future:
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            self.close()  # an answer nobody asked for: the stream cannot be trusted
            return
        self.received += len(data)
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            return self._fail("connection_error")
        if self.waiter.done():
            return
        if self.capped:
            self._answer()
        elif not self.head_done and self.received > MAX_HEAD_BYTES:
            self._fail("connection_error")  # a head line longer than the limit

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.lost = True
        if self.waiter is None or self.waiter.done():
            return
        if self.head_done and not self.framed:
            self._answer()  # an answer delimited by the close of the connection
        else:  # nothing at all: the receiver closed an idle connection we reused
            self._fail("stale_connection" if not self.received else "connection_error")

    # --- httptools callbacks -----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.waiter.done():  # a second answer to one request
            self._fail("connection_error")

    def on_status(self, reason: bytes) -> None:
        self.head_size += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD_BYTES:
            raise _Failed("connection_error")  # stops the parser: see data_received
        lowered = name.lower()
        if lowered == b"retry-after":
            self.retry_after = value
        elif lowered in (b"content-length", b"transfer-encoding"):
            self.framed = True

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.head_done = self.status >= 200

    def on_body(self, body: bytes) -> None:
        take = self.max_bytes + 1 - self.size
        if take > 0:
            self.chunks.append(body[:take])
            self.size += min(len(body), take)
        if self.size > self.max_bytes:
            self.capped = True

    def on_message_complete(self) -> None:
        if self.status is not None and self.status < 200:
            self._reset()  # 100 Continue and friends: the real answer follows
            return
        if not self.waiter.done():
            self.reusable = self.parser.should_keep_alive()  # _answer drops a capped one
            self._answer()

    # --- outcomes ------------------------------------------------------------------

    def _answer(self) -> None:
        if self.capped:
            self.reusable = False
        if not self.reusable:
            self.close()  # never drain a hostile answer
        retry_after = self.retry_after.decode("latin-1") if self.retry_after else None
        self.waiter.set_result(_Answer(self.status, b"".join(self.chunks)[: self.max_bytes],
                                       retry_after))

    def _fail(self, kind: str) -> None:
        self.reusable = False
        self.close()
        if not self.waiter.done():
            self.waiter.set_exception(_Failed(kind))


def _request_head(target: guard.Target, length: int, headers: Optional[dict[str, str]],
                  event_id: Optional[str] = None) -> bytes:
    """The request line and the headers known before sending, checked; the
    signing headers (if any) and the blank line are added at write time."""
    path = target.path if target.path.isascii() else quote(
        target.path, safe="!#$%&'()*+,/:;=?@[]~")
    fields = (headers or {}).items()
    if not _TARGET_OK.fullmatch(path) or not _field_ok("Host", target.host_header) \
            or not all(_field_ok(*field) for field in fields) \
            or (event_id is not None and not _VALUE_OK.fullmatch(event_id)):
        raise _Failed("invalid_request")  # never sent: it would split the request
    return (f"POST {path} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            f"Content-Length: {length:d}\r\nConnection: keep-alive\r\n"
            + "".join(f"{name}: {value}\r\n" for name, value in fields)).encode("ascii")


@functools.lru_cache(maxsize=4096)
def _field_ok(name: str, value: str) -> bool:
    """Could the header be written as it is (no line break, nothing outside
    ASCII)? The same few come back at every request: checked once each."""
    return bool(_NAME_OK.fullmatch(name) and _VALUE_OK.fullmatch(value))


@dataclass(frozen=True)
class Request:
    """One request to send.

    ``address``: a hook's address (the sender parses, resolves and checks it
    at the attempt, see :mod:`guard`) or a :class:`guard.Target` checked
    already. With ``event_id``, the sender adds the Standard Webhooks headers
    (``webhook-id``, ``webhook-timestamp``, and ``webhook-signature`` when
    there are ``secrets``), made right before the request is written.
    ``headers``: further headers (all of them, without ``event_id``).
    ``health``: what the caller knows of the receiver, ``"fast"`` (its last
    attempt was answered) or ``"slow"`` (it timed out or failed to connect),
    e.g. from the hook's statistics; used only while this process knows
    nothing of the receiver itself (after a start), see :class:`_Gates`.
    """
    address: "str | guard.Target"
    body: bytes
    event_id: Optional[str] = None
    secrets: tuple[str, ...] = ()
    headers: Optional[dict[str, str]] = None
    health: Optional[str] = None


def _as_request(item) -> Request:
    if isinstance(item, Request):
        return item
    target, body, headers = item  # the (target, body, headers) form of earlier versions
    return Request(target, body, headers=headers)


# --- who may send when: the healthy pool and the slow lane ----------------------

FAST, NEW, SLOW = "fast", "new", "slow"
_NETWORK_FAILURES = frozenset({"timeout", "connect_error", "connection_error", "tls_error"})
FAST_MEMORY = 86400.0  # how long a receiver that answered quickly counts as proven
MAX_HOSTS = 10000      # receivers whose health is remembered (least recently used go)


class _Host:
    """A receiver (address and port): its health, its requests in flight and waiting."""
    __slots__ = ("key", "name", "state", "until", "active", "slots", "waiters", "nwait",
                 "wclass", "queued", "failing")

    def __init__(self, key, name: str) -> None:
        self.key, self.name = key, name
        self.state: Optional[str] = None   # FAST or SLOW until ``until``; else NEW
        self.until = 0.0
        self.active = 0                    # slots held, in whichever lane
        self.slots: set = set()
        self.waiters: "collections.deque[asyncio.Future]" = collections.deque()
        self.nwait = 0                     # waiters not cancelled
        self.wclass: Optional[str] = None  # the class they are counted under
        self.queued: Optional[str] = None  # the rotation the host is in
        self.failing = False               # slow, and its last request did not get an answer


class _Slot:
    __slots__ = ("host", "lane", "granted")

    def __init__(self, host: _Host, lane: str, granted: float) -> None:
        self.host, self.lane, self.granted = host, lane, granted


class _Gates:
    """Who may send when (the policy is in the README, "Delivery").

    Receivers are *fast* (answered within ``slow_after`` lately), *new*
    (nothing known) or *slow* (timed out, failed to connect or answered late
    within the last ``slow_seconds``). Fast and new ones share the healthy
    pool (``capacity`` slots); new ones get at most three quarters of it and
    ``probe`` slots each, and fast ones go first, so proven receivers are
    never queued behind unknown ones. Slow ones never take a healthy slot:
    they have the slow lane (``slow_capacity`` slots), ``per_host`` each
    while they answer (late), ``slow_per_host`` while they do not (*failing*:
    a timeout or failed connection, or no answer yet after ``slow_after``).
    A request still running ``slow_after`` seconds after it got a healthy
    slot marks its receiver slow and failing and moves, with the receiver's
    other requests, to the slow lane, freeing the healthy slots. Waiting
    receivers are served in turn (round robin), each receiver's requests in
    order. A process that knows nothing of a receiver (it has just started)
    takes the caller's ``health`` hint of a request, if any, for
    ``slow_seconds``. Runs inside the sender's event loop only.
    """

    def __init__(self, capacity: int, per_host: int, slow_capacity: int, slow_per_host: int,
                 slow_after: float, slow_seconds: float) -> None:
        self.capacity = max(1, capacity)
        self.new_capacity = max(1, self.capacity - self.capacity // 4)
        self.per_host = max(1, per_host)
        self.probe = 1  # a receiver not heard from yet: one request until it answers
        self.slow_capacity = max(1, slow_capacity)
        self.slow_per_host = max(1, slow_per_host)
        self.slow_after = slow_after
        self.slow_seconds = slow_seconds
        self._tick = max(0.05, slow_after / 4)
        self.healthy_slots: set[_Slot] = set()
        self._watch: Optional[asyncio.TimerHandle] = None
        self.used = {FAST: 0, NEW: 0, SLOW: 0}
        self.waiting = {FAST: 0, NEW: 0, SLOW: 0}
        self.ready: dict[str, collections.deque] = {
            FAST: collections.deque(), NEW: collections.deque(), SLOW: collections.deque()}
        self.hosts: "collections.OrderedDict[tuple, _Host]" = collections.OrderedDict()
        # Names of the receivers in the slow lane, for other threads (replaced, never changed).
        self.slow_names: dict[str, float] = {}

    # --- classes and limits -------------------------------------------------------

    def _class(self, host: _Host, now: float) -> str:
        if host.state is not None and host.until > now:
            return host.state
        host.state = None
        return NEW

    def _limit(self, cls: str, host: _Host) -> int:
        if cls == SLOW:  # answering late: its full share; not answering: a small one
            return self.slow_per_host if host.failing else self.per_host
        return self.per_host if cls == FAST else self.probe

    def _room(self, cls: str) -> bool:
        if cls == SLOW:
            return self.used[SLOW] < self.slow_capacity
        healthy = self.used[FAST] + self.used[NEW]
        return healthy < self.capacity and (cls == FAST or self.used[NEW] < self.new_capacity)

    def _host(self, key, name: str) -> _Host:
        host = self.hosts.get(key)
        if host is None:
            host = self.hosts[key] = _Host(key, name)
            for _ in range(4):  # forget the least recently used, unless busy
                if len(self.hosts) <= MAX_HOSTS:
                    break
                old = next(iter(self.hosts.values()))
                if old.active or old.waiters:
                    self.hosts.move_to_end(old.key)
                else:
                    del self.hosts[old.key]
        else:
            self.hosts.move_to_end(key)
        return host

    # --- acquiring and releasing --------------------------------------------------

    async def acquire(self, key, name: str, hint: Optional[str] = None) -> _Slot:
        loop = asyncio.get_running_loop()
        host = self._host(key, name)
        cls = self._class(host, loop.time())
        if cls == NEW and hint in (FAST, SLOW):  # the caller's knowledge, for a while
            host.failing = hint == SLOW
            self._mark(host, hint, loop.time() + self.slow_seconds, loop.time())
            cls = hint
        if not host.waiters and not self.ready[cls] and host.active < self._limit(cls, host) \
                and self._room(cls):
            return self._grant(host, cls, loop)
        waiter = loop.create_future()
        host.waiters.append(waiter)
        host.nwait += 1
        if host.wclass is None:
            host.wclass = cls
        self.waiting[host.wclass] += 1
        self._file(host, loop.time())
        self._pump(loop)
        try:
            return await waiter
        except asyncio.CancelledError:  # the attempt's deadline, while waiting
            if waiter.cancelled():
                self._unwait(host)
            elif waiter.done():  # granted in the same instant: give it back
                self.release(waiter.result(), None)
            raise

    def _unwait(self, host: _Host) -> None:
        host.nwait -= 1
        self.waiting[host.wclass] -= 1
        if not host.nwait:
            host.wclass = None

    def _file(self, host: _Host, now: float) -> None:
        """Put a host with waiters in the rotation of its class (once)."""
        cls = self._class(host, now)
        if host.nwait and host.wclass != cls:
            self.waiting[host.wclass] -= host.nwait
            self.waiting[cls] += host.nwait
            host.wclass = cls
        if host.queued is not None and host.queued != cls:
            try:
                self.ready[host.queued].remove(host)
            except ValueError:
                pass
            host.queued = None
        if host.queued is None and host.waiters:
            host.queued = cls
            self.ready[cls].append(host)

    def _pump(self, loop) -> None:
        """Grant free slots to waiting requests: fast receivers first, then new
        ones, each rotation round robin; the slow lane on its own."""
        now = loop.time()
        again = True
        while again:
            again = False
            for cls in (FAST, NEW, SLOW):
                rotation = self.ready[cls]
                while rotation and self._room(cls):
                    host = rotation.popleft()
                    host.queued = None
                    while host.waiters and host.waiters[0].done():
                        host.waiters.popleft()  # cancelled, counted already
                    if not host.waiters:
                        continue
                    actual = self._class(host, now)
                    if actual != cls:  # its health changed while it waited
                        self._file(host, now)
                        # Once more if it went to a rotation served already.
                        again = again or actual == FAST or (actual == NEW and cls == SLOW)
                        continue
                    if host.active >= self._limit(cls, host):
                        continue  # filed again when one of its requests ends
                    waiter = host.waiters.popleft()
                    self._unwait(host)
                    waiter.set_result(self._grant(host, cls, loop))
                    if host.waiters:
                        host.queued = cls
                        rotation.append(host)

    def _grant(self, host: _Host, cls: str, loop) -> _Slot:
        self.used[cls] += 1
        host.active += 1
        slot = _Slot(host, cls, loop.time())
        host.slots.add(slot)
        if cls != SLOW and self.slow_after:
            self.healthy_slots.add(slot)
            if self._watch is None:
                self._watch = loop.call_later(self._tick, self._watch_healthy, loop)
        return slot

    def _watch_healthy(self, loop) -> None:
        """Every ``slow_after``/4 while healthy slots are held: a request
        that has held one for ``slow_after`` sends its receiver to the slow lane."""
        self._watch = None
        too_old = loop.time() - self.slow_after
        for slot in [s for s in self.healthy_slots if s.granted <= too_old]:
            if slot.lane != SLOW:  # not moved already, with another of its receiver's
                self._too_slow(slot)
        if self.healthy_slots:
            self._watch = loop.call_later(self._tick, self._watch_healthy, loop)

    def release(self, slot: _Slot, outcome: Optional["Outcome"]) -> None:
        """A request has ended (``outcome`` None: it never started)."""
        loop = asyncio.get_running_loop()
        host = slot.host
        self.healthy_slots.discard(slot)
        host.slots.discard(slot)
        self.used[slot.lane] -= 1
        host.active -= 1
        if outcome is not None:
            self._observe(host, outcome, loop.time() - slot.granted, loop.time())
        if host.waiters:
            self._file(host, loop.time())
        self._pump(loop)

    # --- health ------------------------------------------------------------------

    def _observe(self, host: _Host, outcome: "Outcome", took: float, now: float) -> None:
        if outcome.status is not None:
            host.failing = False
            if took < self.slow_after or not self.slow_after:
                self._mark(host, FAST, now + FAST_MEMORY, now)
            else:
                self._mark(host, SLOW, now + self.slow_seconds, now)
        elif outcome.error in _NETWORK_FAILURES:
            host.failing = True
            self._mark(host, SLOW, now + self.slow_seconds, now)

    def _mark(self, host: _Host, state: str, until: float, now: float) -> None:
        was = self._class(host, now)
        host.state, host.until = state, until
        listed = self.slow_names.get(host.name)
        if (state == SLOW and (listed is None or listed < until - 1.0)) or \
                (state != SLOW and listed is not None):
            names = {n: t for n, t in self.slow_names.items() if t > now}
            if state == SLOW:
                names[host.name] = until
            else:
                names.pop(host.name, None)
            self.slow_names = names  # replaced, never changed: other threads read it
        if was != state and host.waiters:
            self._file(host, now)

    def _too_slow(self, slot: _Slot) -> None:
        """A request has had a healthy slot for ``slow_after`` seconds: its
        receiver goes to the slow lane, with its requests in flight."""
        loop = asyncio.get_running_loop()
        host = slot.host
        host.failing = True  # until it answers
        self._mark(host, SLOW, loop.time() + self.slow_seconds, loop.time())
        for moved in host.slots:
            if moved.lane != SLOW:
                self.used[moved.lane] -= 1
                self.used[SLOW] += 1
                moved.lane = SLOW
                self.healthy_slots.discard(moved)
        self._pump(loop)

    def free(self) -> int:
        return max(0, self.capacity - self.used[FAST] - self.used[NEW]
                   - self.waiting[FAST] - self.waiting[NEW])


class Sender:
    """Sends deliveries; one per process, safe to call from any thread.

    Every wait of an attempt is bounded: DNS and the gates by
    ``total_timeout`` from :meth:`submit` (an attempt still waiting for a slot
    then ends as ``timeout`` without being sent), connect, send and answer by
    ``total_timeout`` from its slot. An exception while preparing, signing or sending one
    request is that request's outcome (``internal_error``), never the batch's.
    """

    def __init__(self, connect_timeout: float = 5.0, total_timeout: float = 15.0,
                 max_bytes: int = 20480, concurrency: int = 64, per_host: int = 16,
                 dns_timeout: float = 5.0, slow_after: float = 2.0,
                 slow_lane_seconds: float = 60.0, slow_lane_concurrency: int = 32,
                 slow_lane_per_host: int = 2, allowed_networks: Optional[list] = None,
                 ca_bundle: Optional[str] = None) -> None:
        self.connect_timeout = connect_timeout
        self.total_timeout = total_timeout
        self.max_bytes = max_bytes
        self.concurrency = concurrency
        # At most this many connections to one receiver at a time: polite, and
        # a receiver serving a thread per connection does better with fewer.
        self.per_host = per_host
        self.allowed_networks = allowed_networks
        self._gates = _Gates(concurrency, per_host, slow_lane_concurrency, slow_lane_per_host,
                             slow_after, slow_lane_seconds)
        self._resolver = guard.Resolver(timeout=dns_timeout, slow_seconds=slow_lane_seconds)
        self._idle: "collections.OrderedDict[tuple, list[_Connection]]" = \
            collections.OrderedDict()
        # A PEM file of the CAs https receivers' certificates are verified
        # against; None: certifi's bundle.
        self.ca_bundle = ca_bundle
        self._ssl: Optional[ssl.SSLContext] = None
        if ca_bundle:
            self._ssl_context()  # a missing or broken bundle fails here, not each attempt
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="ckanext-webhooks-sender")
        self._thread.start()

    @classmethod
    def from_config(cls, **overrides) -> "Sender":
        """A sender with the ``ckanext.webhooks.*`` settings of the CKAN config."""
        from . import settings
        options = dict(
            connect_timeout=settings.connect_timeout(),
            total_timeout=settings.timeout(),
            max_bytes=settings.max_response_bytes(),
            concurrency=settings.concurrency(),
            per_host=settings.connections_per_host(),
            dns_timeout=settings.dns_timeout(),
            slow_after=settings.slow_after(),
            slow_lane_seconds=settings.slow_lane_seconds(),
            slow_lane_concurrency=settings.slow_lane_concurrency(),
            slow_lane_per_host=settings.slow_lane_per_host(),
            ca_bundle=settings.ca_bundle())
        options.update(overrides)
        return cls(**options)

    # --- the blocking API used by the dispatcher ---------------------------

    def post(self, request, body: bytes = b"", headers: Optional[dict[str, str]] = None
             ) -> Outcome:
        """One request: a :class:`Request`, or (target or address, body, headers)."""
        if not isinstance(request, Request):
            request = Request(request, body, headers=headers)
        return self.post_many([request])[0]

    def post_many(self, requests: Iterable) -> list[Outcome]:
        return self.submit(requests).result()

    def submit(self, requests: Iterable, allowed: Optional[list] = None
               ) -> "concurrent.futures.Future[list[Outcome]]":
        """Start sending :class:`Request` objects (or (target, body, headers));
        the future's result lists the outcomes in order, within about twice
        ``total_timeout`` seconds, and is never an exception.

        Addresses are parsed here, in the caller's thread (with the CKAN
        config's ``allowed_networks`` unless ``allowed`` or the sender's own
        say otherwise), and resolved and checked in the event loop."""
        started = time.monotonic()
        items: list = []
        rules = guard.address_rules()
        for item in requests:
            try:
                request = _as_request(item)
                if isinstance(request.address, guard.Target):
                    items.append((request, request.address, None))
                else:
                    items.append((request, guard.parse(request.address, rules), None))
            except guard.Refused:
                items.append((item, None, Outcome(None, "refused_address", 0.0, sent=False)))
            except Exception:  # noqa: BLE001 - this request's outcome, not the batch's
                log.exception("could not prepare a request")
                items.append((item, None, Outcome(None, "internal_error", 0.0, sent=False)))
        if allowed is None:
            allowed = self.allowed_networks
        if allowed is None and any(isinstance(parsed, tuple) for _, parsed, _ in items):
            allowed = guard.allowed_networks()
        allowed = list(allowed or [])
        return asyncio.run_coroutine_threadsafe(
            self._post_many(items, (allowed, tuple(allowed)), started), self._loop)

    def free_capacity(self) -> int:
        """Slots of the healthy pool that no request holds or waits for (a
        snapshot; the claim side may size its batches by it)."""
        return self._gates.free()

    def slow_hosts(self) -> frozenset[str]:
        """Names of the receivers now in the slow lane (a snapshot)."""
        now = time.monotonic()
        return frozenset(n for n, t in self._gates.slow_names.items() if t > now)

    def saturated_slow_hosts(self) -> frozenset[str]:
        """The slow lane's receivers while requests already wait for it: new
        work for them is better claimed by a process whose lane has room."""
        if self._gates.waiting[SLOW] == 0:
            return frozenset()
        return self.slow_hosts()

    def stats(self) -> dict:
        """Slots used and requests waiting, per class (a snapshot)."""
        gates = self._gates
        return {"used": dict(gates.used), "waiting": dict(gates.waiting),
                "capacity": gates.capacity, "slow_capacity": gates.slow_capacity,
                "free": gates.free(), "slow_hosts": len(self.slow_hosts())}

    def close(self) -> None:
        async def _close():
            for conns in self._idle.values():
                for conn in conns:
                    conn.close()
            self._idle.clear()
        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._resolver.close()

    # --- inside the event loop ------------------------------------------------

    async def _post_many(self, items: list, allowed: tuple[list, tuple], started: float
                         ) -> list[Outcome]:
        deadline = started + self.total_timeout
        return await asyncio.gather(*(
            self._attempt(request, parsed, allowed, started, deadline) if early is None
            else _done(early) for request, parsed, early in items))

    async def _attempt(self, request: Request, parsed, allowed: tuple[list, tuple],
                       started: float, deadline: float) -> Outcome:
        slot, outcome, wrote, head_ready = None, None, [False], [False]
        try:
            # A deadline on this task, not a task of its own as wait_for would make.
            async with asyncio.timeout_at(deadline):
                if isinstance(parsed, guard.Target):
                    target = parsed
                else:
                    target = await self._resolver.target(parsed, allowed[0], deadline,
                                                         allowed[1])
                head = _request_head(target, len(request.body), request.headers,
                                     request.event_id)
                if request.event_id is not None:
                    signing.check_secrets(request.secrets)
                head_ready[0] = True
                slot = await self._gates.acquire((target.addresses[0], target.port),
                                                 target.host, request.health)
            # From its slot on, the attempt has the whole timeout to itself:
            # time spent queued in this worker never cuts short a request the
            # receiver already has (that would send it twice).
            async with asyncio.timeout(self.total_timeout):
                answer = await self._exchange(target, request, head, wrote)
            outcome = Outcome(answer.status, None, time.monotonic() - started, answer.body,
                              _retry_after(answer.retry_after))
        except (asyncio.TimeoutError, TimeoutError):
            outcome = Outcome(None, "timeout", time.monotonic() - started,
                              waited_for_slot=slot is None and head_ready[0])
        except _Failed as failure:
            outcome = Outcome(failure.status, failure.kind, time.monotonic() - started)
        except guard.Unresolvable:
            outcome = Outcome(None, "dns_error", time.monotonic() - started)
        except guard.Refused:
            outcome = Outcome(None, "refused_address", time.monotonic() - started)
        except Exception:  # noqa: BLE001 - this request's outcome, never the batch's
            log.exception("delivery attempt failed unexpectedly")
            outcome = Outcome(None, "internal_error", time.monotonic() - started)
        finally:
            if outcome is not None:
                outcome.sent = wrote[0]
            if slot is not None:
                try:
                    self._gates.release(slot, outcome)
                except Exception:  # noqa: BLE001 - never the batch's failure
                    log.exception("could not release a delivery slot")
        return outcome

    def _render(self, head: bytes, request: Request) -> bytes:
        """The request's bytes, its Standard Webhooks headers made now."""
        if request.event_id is None:
            return head + b"\r\n" + request.body
        fields = signing.headers(request.event_id, request.body, request.secrets)
        return (head + "".join(f"{name}: {value}\r\n" for name, value in fields.items()
                               ).encode("ascii") + b"\r\n" + request.body)

    async def _exchange(self, target: guard.Target, request: Request, head: bytes,
                        wrote: list) -> _Answer:
        key = (target.scheme, target.addresses[0], target.port, target.host)
        conn = self._take_idle(key)
        if conn is not None:
            try:
                return await self._round_trip(conn, key, head, request, wrote)
            except _Failed as failure:
                if failure.kind != "stale_connection":
                    raise
                # The receiver closed an idle keep-alive connection: once more, fresh.
        conn = await self._connect(target)
        try:
            return await self._round_trip(conn, key, head, request, wrote)
        except _Failed as failure:
            if failure.kind == "stale_connection":
                raise _Failed("connection_error")
            raise

    async def _connect(self, target: guard.Target) -> _Connection:
        ip = str(target.addresses[0])
        ssl_context = self._ssl_context() if target.scheme == "https" else None
        try:
            _, conn = await asyncio.wait_for(self._loop.create_connection(
                lambda: _Connection(self.max_bytes), ip, target.port, ssl=ssl_context,
                server_hostname=target.host if ssl_context else None), self.connect_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise _Failed("timeout")
        except ssl.SSLError:
            raise _Failed("tls_error")
        except OSError:
            raise _Failed("connect_error")
        return conn

    async def _round_trip(self, conn: _Connection, key, head: bytes, request: Request,
                          wrote: list) -> _Answer:
        try:
            # Signed here, right before the write: the timestamp is the sending time.
            data = self._render(head, request)
            wrote[0] = True
            answer = await conn.request(data)
        except BaseException:  # failed, or cancelled by the total timeout: unusable
            conn.close()
            raise
        if conn.reusable and conn.usable:
            self._give_back(key, conn)
        return answer

    def _take_idle(self, key) -> Optional[_Connection]:
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            if conn.usable:
                return conn
            conn.close()
        return None

    def _give_back(self, key, conn: _Connection) -> None:
        conns = self._idle.setdefault(key, [])
        self._idle.move_to_end(key)
        if len(conns) >= MAX_IDLE_PER_HOST:
            conn.close()
            return
        conns.append(conn)
        while len(self._idle) > MAX_POOLS:  # many distinct hosts: forget the oldest
            _, old = self._idle.popitem(last=False)
            for stale in old:
                stale.close()

    def _ssl_context(self) -> ssl.SSLContext:
        """Certificates and host names verified (the default context: TLS 1.2
        or later), against ``ca_bundle`` or else certifi's bundle."""
        if self._ssl is None:
            cafile = self.ca_bundle
            if not cafile:
                import certifi
                cafile = certifi.where()
            self._ssl = ssl.create_default_context(cafile=cafile)
            # Upstream Python's default, which Debian's python3 leaves to OpenSSL's.
            self._ssl.minimum_version = max(self._ssl.minimum_version, ssl.TLSVersion.TLSv1_2)
        return self._ssl


async def _done(outcome: Outcome) -> Outcome:
    return outcome


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_web_sender: Optional[Sender] = None
_web_sender_lock = threading.Lock()


def web_sender() -> Sender:
    """The sender of the web process (verification handshakes and pings)."""
    global _web_sender
    with _web_sender_lock:
        if _web_sender is None:
            _web_sender = Sender.from_config(concurrency=8)
    return _web_sender
