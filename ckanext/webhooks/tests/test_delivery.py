"""The HTTP sender against real (hostile) servers on 127.0.0.2."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from ckanext.webhooks import guard
from ckanext.webhooks.delivery import Sender

ALLOWED = [guard.ipaddress.ip_network("127.0.0.2/32")]


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
    srv = server(lambda conn: (_read_request(conn), time.sleep(30)))
    sender = Sender(total_timeout=1.5)
    started = time.monotonic()
    outcome = _post(sender, srv.url())
    assert outcome.error == "timeout" and outcome.status is None
    assert time.monotonic() - started < 3


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
    assert not outcome.ok and outcome.error == "timeout"
    assert time.monotonic() - started < 3


def test_huge_answer_is_capped_and_its_connection_dropped(server):
    def huge(conn):
        _read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 52428800\r\n\r\n")
        chunk = b"x" * 65536
        for _ in range(800):
            conn.sendall(chunk)
    srv = server(huge)
    sender = Sender(total_timeout=5, max_bytes=20480)
    started = time.monotonic()
    outcome = _post(sender, srv.url())
    assert outcome.ok and len(outcome.body) == 20480
    assert time.monotonic() - started < 3
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
    started = time.monotonic()
    first, second = _post(sender, srv.url()), _post(sender, srv.url())
    assert (first.status, first.error) == (None, "connection_error") == (second.status,
                                                                         second.error)
    assert time.monotonic() - started < 3
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
