"""The HTTP sender against real (hostile) servers on 127.0.0.2."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from ckanext.webhooks import guard
from ckanext.webhooks.sender import Sender

from .receiver import SilentHosts
from .waiting import until

ALLOWED = [guard.ipaddress.ip_network("127.0.0.2/32")]
# How far past its timeout an attempt may end on a loaded 2-core machine. The
# servers that test a timeout hold on far longer than timeout + this margin,
# so an attempt that was not cut still fails the bound.
TIMEOUT_MARGIN = 6.0


class RawServer:
    """A TCP server on 127.0.0.2 whose every connection runs ``behaviour``."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.connections = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.2", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self.behaviour(conn)
        except OSError:
            pass
        finally:
            conn.close()

    def url(self, path="/x"):
        return f"http://127.0.0.2:{self.port}{path}"

    def close(self):
        self._stop = True
        self.sock.close()


def _read_request(conn) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    while len(body) < length:
        body += conn.recv(65536)
    return data


def _answer_with(raw: bytes):
    """A server behaviour: every request on a connection gets ``raw``."""
    def behaviour(conn):
        while _read_request(conn):
            conn.sendall(raw)
    return behaviour


_ok_keepalive = _answer_with(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


@pytest.fixture
def server(request):
    servers = []

    def make(behaviour):
        srv = RawServer(behaviour)
        servers.append(srv)
        return srv
    yield make
    for srv in servers:
        srv.close()


def _post(sender, url, body=b"{}"):
    return sender.post(guard.resolve(url, ALLOWED), body, {"Content-Type": "application/json"})


def test_keep_alive_connections_are_reused(server):
    srv = server(_ok_keepalive)
    sender = Sender(total_timeout=5)
    outcomes = [_post(sender, srv.url(f"/p{n}")) for n in range(20)]
    assert all(o.ok and o.body == b"ok" for o in outcomes)
    assert srv.connections == 1


def test_receiver_that_never_answers_is_cut_at_the_total_timeout(server):
    srv = server(lambda conn: (_read_request(conn), time.sleep(30)))  # hangs: the subject
    sender = Sender(total_timeout=1.5)
    started = time.monotonic()
    outcome = _post(sender, srv.url())
    took = time.monotonic() - started
    assert outcome.error == "timeout" and outcome.status is None
    # Not before the timeout, and long before the server would have answered.
    assert 1.4 <= took < 1.5 + TIMEOUT_MARGIN, took  # (timers may fire a ms early)


# Trickling receivers (the pauses are the subject): a byte every 0.2 s for
# 25 s of head, never ended, or a body of a byte every 0.1 s for 100 s. No
# pause is long enough for a read timeout; only the total timeout cuts them.
def _trickle_headers(conn):
    _read_request(conn)
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


def _trickle_body(conn):
    _read_request(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
    for _ in range(1000):
        conn.sendall(b"x")
        time.sleep(0.1)


@pytest.mark.parametrize("trickle", [_trickle_headers, _trickle_body],
                         ids=["headers", "body"])
def test_receiver_trickling_its_answer_is_cut(server, trickle):
    srv = server(trickle)
    sender = Sender(total_timeout=1.5)
    started = time.monotonic()
    outcome = _post(sender, srv.url())
    took = time.monotonic() - started
    assert not outcome.ok and outcome.error == "timeout"
    assert 1.4 <= took < 1.5 + TIMEOUT_MARGIN, took  # (timers may fire a ms early)


def test_huge_answer_is_capped_and_its_connection_dropped(server):
    chunks = 800  # 50 MB
    sent, ended = [], []

    def huge(conn):
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 52428800\r\n\r\n")
        chunk = b"x" * 65536
        try:
            for n in range(chunks):
                conn.sendall(chunk)
                sent.append(n)
        except OSError as error:  # the client closed the connection on it
            ended.append(error)
            raise
        ended.append(None)  # all of it went out: it was read in full
    srv = server(huge)
    sender = Sender(total_timeout=5, max_bytes=20480)
    outcome = _post(sender, srv.url())
    assert outcome.ok and len(outcome.body) == 20480
    # The sender closed the connection with the rest of the answer unread:
    # the server's writes failed long before its 50 MB were out.
    until(lambda: ended, 10, "the server's writes to end")
    assert isinstance(ended[0], OSError) and len(sent) < chunks, (len(sent), ended)
    # The next attempt opens a new connection: the half-read one was closed.
    _post(sender, srv.url())
    assert srv.connections == 2


def test_connection_closed_mid_response(server):
    def rude(conn):
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    srv = server(rude)
    outcome = _post(Sender(total_timeout=5), srv.url())
    assert not outcome.ok and outcome.error == "connection_error"


def test_redirects_are_not_followed(server):
    target = server(_ok_keepalive)

    def redirect(conn):
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " +
                     target.url().encode() + b"\r\nContent-Length: 0\r\n\r\n")
    srv = server(redirect)
    outcome = _post(Sender(total_timeout=5), srv.url())
    assert outcome.status == 307 and not outcome.ok
    assert target.connections == 0


def test_connection_refused():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.2", 0))
        url = f"http://127.0.0.2:{sock.getsockname()[1]}/x"
    outcome = _post(Sender(total_timeout=5), url)
    assert outcome.error == "connect_error"


def test_retry_after_is_parsed(server):
    def busy(conn):
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 429 Too Many\r\nRetry-After: 120\r\nContent-Length: 0\r\n\r\n")
    outcome = _post(Sender(total_timeout=5), server(busy).url())
    assert outcome.status == 429 and outcome.retry_after == 120


def test_request_carries_host_header_of_the_name_not_the_ip(server):
    seen = []

    def record(conn):
        seen.append(_read_request(conn))
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    srv = server(record)
    target = guard.Target("http", "receiver.test", srv.port, "/cb?x=1",
                          (guard.ipaddress.ip_address("127.0.0.2"),))
    outcome = Sender(total_timeout=5).post(target, b"{}", {"Content-Type": "application/json"})
    assert outcome.status == 204
    head = seen[0].split(b"\r\n\r\n")[0].decode()
    assert head.startswith("POST /cb?x=1 HTTP/1.1")
    assert f"Host: receiver.test:{srv.port}" in head


@pytest.mark.parametrize("raw,answer", [
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok",
     (202, b"ok")),  # the interim answer is skipped
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
     (200, b"abcde")),
], ids=["100-continue", "chunked"])
def test_answer_is_read_and_the_connection_kept(server, raw, answer):
    srv = server(_answer_with(raw))
    sender = Sender(total_timeout=5)
    outcomes = [_post(sender, srv.url()) for _ in range(3)]
    assert [(o.status, o.body) for o in outcomes] == [answer] * 3
    assert srv.connections == 1


def test_answer_ended_by_closing_the_connection(server):
    def http10(conn):
        _read_request(conn)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nthe whole body")
    srv = server(http10)
    sender = Sender(total_timeout=5)
    first, second = _post(sender, srv.url()), _post(sender, srv.url())
    assert (first.status, first.body) == (200, b"the whole body") == (second.status,
                                                                     second.body)
    assert srv.connections == 2  # never reused


def test_connection_close_answer_is_not_reused(server):
    srv = server(_answer_with(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                              b"Content-Length: 0\r\n\r\n"))
    sender = Sender(total_timeout=5)
    assert all(_post(sender, srv.url()).ok for _ in range(3))
    assert srv.connections == 3


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n",  # endless head
    b"SMTP ready\r\n\r\n",                                         # not HTTP
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",  # smuggling
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
], ids=["huge-head", "not-http", "two-lengths", "upgrade"])
def test_broken_answers_fail_the_attempt_and_drop_the_connection(server, raw):
    srv = server(_answer_with(raw))
    sender = Sender(total_timeout=5)
    first, second = _post(sender, srv.url()), _post(sender, srv.url())
    # A connection_error, not a timeout: the server keeps the connection open,
    # so an attempt that did not see the answer as broken would have timed out.
    assert (first.status, first.error) == (None, "connection_error") == (second.status,
                                                                         second.error)
    assert srv.connections == 2


def test_a_second_unasked_answer_drops_the_connection(server):
    srv = server(_answer_with(b"HTTP/1.1 204 No Content\r\n\r\n"
                              b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"))
    sender = Sender(total_timeout=5)
    first, second = _post(sender, srv.url()), _post(sender, srv.url())
    # Whichever way the bytes arrive, no answer is taken for the wrong request.
    assert first.status in (204, None) and second.status in (204, None)
    assert 200 not in (first.status, second.status)
    assert srv.connections == 2


def test_non_ascii_path_is_percent_encoded(server):
    seen = []

    def record(conn):
        seen.append(_read_request(conn))
        conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    srv = server(record)
    assert _post(Sender(total_timeout=5), srv.url("/hook/café?q=ü&x=%41")).status == 204
    assert seen[0].startswith(b"POST /hook/caf%C3%A9?q=%C3%BC&x=%41 HTTP/1.1\r\n")


@pytest.mark.parametrize("headers", [
    {"X-Evil": "a\r\nX-Injected: 1"}, {"X-Evil": "a\nb"}, {"Bad Name": "x"}, {"X-Nul": "\x00"},
], ids=["crlf", "lf", "space-in-name", "nul"])
def test_header_injection_is_never_sent(server, headers):
    srv = server(_ok_keepalive)
    outcome = Sender(total_timeout=5).post(guard.resolve(srv.url(), ALLOWED), b"{}", headers)
    assert (outcome.status, outcome.error) == (None, "invalid_request")
    assert srv.connections == 0


# --- fresh signatures, deadlines, isolation, DNS (the sender's own policy) ----------

def _recording_server(server, hold_first: float = 0.0):
    """A receiver recording (request, receipt time); it holds its first answer
    ``hold_first`` seconds (a slow receiver: the pause is the subject) and
    records when it let it go in ``seen.released``."""
    seen = _Seen()

    def behaviour(conn):
        while True:
            data = _read_request(conn)
            if not data:
                return
            seen.append((data, time.time()))
            if len(seen) == 1 and hold_first:
                time.sleep(hold_first)
                seen.released = time.time()
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    return server(behaviour), seen


class _Seen(list):
    released: float = 0.0


def _headers_of(raw: bytes) -> tuple[dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")[1:]
    return {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}, body


def test_signature_is_made_when_the_request_is_sent(server):
    """Point 3: a request that waited behind a slow answer of the same
    receiver carries the timestamp of its sending, not of its submission."""
    import base64
    import os
    from standardwebhooks.webhooks import Webhook
    from ckanext.webhooks.sender import Request
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    srv, seen = _recording_server(server, hold_first=3.0)
    sender = Sender(total_timeout=10, per_host=1, slow_lane_per_host=1)
    target = guard.resolve(srv.url(), ALLOWED)
    submitted = time.time()
    outcomes = sender.post_many([Request(target, b'{"n": 1}', "msg_first", (secret,)),
                                 Request(target, b'{"n": 2}', "msg_second", (secret,))])
    assert [o.status for o in outcomes] == [204, 204]
    (first, _), (second, received) = seen
    # One connection to the receiver: the second request left only after the
    # first answer was let go, 3 s after the batch was submitted.
    assert received >= seen.released >= submitted + 3.0, \
        "the second request did not wait: nothing tested"
    headers, body = _headers_of(second)
    assert headers["webhook-id"] == "msg_second"
    # Signed between the first answer's release and the receipt (whole seconds).
    assert int(seen.released) <= int(headers["webhook-timestamp"]) <= received
    Webhook(secret).verify(body, headers)  # the signature covers the fresh timestamp


def test_signing_with_several_secrets():
    import base64
    import os
    from standardwebhooks.webhooks import Webhook
    from ckanext.webhooks import signing
    old, new = ("whsec_" + base64.b64encode(os.urandom(32)).decode() for _ in range(2))
    headers = signing.headers("msg_x", b'{"a": 1}', [old, new])
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        Webhook(secret).verify(b'{"a": 1}', headers)
    assert "webhook-signature" not in signing.headers("msg_x", b"{}", None)


def test_waiting_for_a_slot_past_the_deadline_is_a_timeout_never_sent():
    """Every wait is inside the attempt's deadline: requests queued behind a
    silent receiver end as timeouts without being sent."""
    hosts = SilentHosts(1)
    try:
        sender = Sender(total_timeout=1.5, per_host=1, slow_lane_per_host=1)
        target = guard.resolve(hosts.urls()[0], ALLOWED)
        outcomes = sender.post_many([(target, b"{}", {}) for _ in range(3)])
        assert [(o.error, o.sent, o.waited_for_slot) for o in outcomes] == \
            [("timeout", True, False), ("timeout", False, True), ("timeout", False, True)]
        # The receiver has read all there was on the one connection once it
        # saw it closed: the other two never left.
        until(lambda: hosts.closed, 10, "the timed-out connection closed")
        assert (hosts.requests, hosts.closed) == (1, 1)
    finally:
        hosts.close()


def test_a_request_that_cannot_be_signed_or_built_fails_alone(server):
    """Point 4: an exception while preparing or signing one request is that
    request's outcome; the others of the batch are sent."""
    import base64
    import os
    from ckanext.webhooks.sender import Request
    srv, seen = _recording_server(server)
    target = guard.resolve(srv.url(), ALLOWED)
    good = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    outcomes = Sender(total_timeout=5).post_many([
        Request(target, b"{}", "msg_bad", ("whsec_not-base64!",)),
        object(),  # not a request at all
        Request(target, b"{}", "msg_good", (good,)),
    ])
    assert [(o.status, o.error, o.sent) for o in outcomes] == [
        (None, "internal_error", False), (None, "internal_error", False), (204, None, True)]
    assert len(seen) == 1 and b"msg_good" in seen[0][0]


@pytest.mark.parametrize("known", ["proven", "hinted"])
def test_slow_receivers_do_not_delay_healthy_ones(known):
    """Point 1: a healthy receiver is served while 150 requests to 50 silent
    receivers (many more than the pool's 16 slots, submitted first) are still
    on the wire. ``proven``: the receiver answered promptly before; ``hinted``:
    the sender has just started and knows nothing, but the caller says the
    silent ones timed out last time (the hook's statistics)."""
    from ckanext.webhooks.sender import Request
    hosts = SilentHosts(50)
    answered = []

    def fast(conn):
        while _read_request(conn):
            answered.append(hosts.closed)  # slow connections closed by then
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    srv = RawServer(fast)
    try:
        sender = Sender(total_timeout=5, concurrency=16, per_host=4)
        ok = guard.resolve(srv.url(), ALLOWED)
        if known == "proven":
            assert sender.post(ok, b"{}", {}).status == 204
            answered.clear()
        slow = [guard.resolve(url, ALLOWED) for url in hosts.urls()]
        hint = "slow" if known == "hinted" else None
        future = sender.submit([Request(t, b"{}", health=hint) for t in slow for _ in range(3)]
                               + [(ok, b"{}", {}) for _ in range(20)])
        outcomes = future.result()
        assert [o.status for o in outcomes[-20:]] == [204] * 20
        assert {o.error for o in outcomes[:-20]} == {"timeout"}
        assert hosts.requests > 0, "no slow request was sent: nothing tested"
        assert answered == [0] * 20  # every healthy answer before any slow one ended
        assert sender.slow_hosts() == frozenset({"127.0.0.2"})
    finally:
        hosts.close()
        srv.close()


def test_resolution_failures_hangs_and_refused_names(server):
    """Point 5, in the sender: a name that does not resolve is a dns_error
    (retryable), whatever the resolver said; a hanging resolver delays only
    its own name (one lookup in flight per name); a name resolving to a
    refused address is refused_address. Names are answered by the test DNS
    stand-in (tests/netguard/sitecustomize.py, driven by tests/dns_standin.py):
    no query leaves the machine."""
    from . import dns_standin as dns
    srv, seen = _recording_server(server)
    down, missing, hangs, evil, ok = (dns.name(n) for n in
                                      ("down", "missing", "hangs", "evil", "ok"))
    dns.fail(down, "EAI_AGAIN")
    dns.hang(hangs)
    dns.answer(evil, "127.0.0.1")
    dns.answer(ok, "127.0.0.2")
    sender = Sender(total_timeout=5, dns_timeout=1, allowed_networks=ALLOWED)
    try:
        def url(host):
            return f"http://{host}:{srv.port}/x"
        future = sender.submit([(url(hangs), b"{}", {}) for _ in range(3)]
                               + [(url(h), b"{}", {}) for h in (down, missing, evil, ok)])
        hung, hung2, hung3, failed, unknown, refused, fine = future.result()
        assert fine.status == 204
        assert dns.lookups(hangs) == [("start", "")]  # still hanging: one lookup, not three
        assert {hung.error, hung2.error, hung3.error} == {"dns_error"}
        assert (failed.error, unknown.error, refused.error) == \
            ("dns_error", "dns_error", "refused_address")
        assert len(seen) == 1 and seen[0][0].startswith(b"POST /x")
        assert f"Host: {ok}:{srv.port}".encode() in seen[0][0]
        assert sender.post(url(ok), b"{}").status == 204
        assert [kind for kind, _ in dns.lookups(ok)] == ["start", "end"]  # cached
        dns.answer(hangs, "127.0.0.2")  # the resolver recovers
        assert sender.post(url(hangs), b"{}").status == 204
        with pytest.raises(guard.Unresolvable):
            guard.resolve(url(down), ALLOWED)  # input validation refuses it
    finally:
        dns.answer(hangs, "127.0.0.2")
        sender.close()
