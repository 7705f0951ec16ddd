"""One HTTP delivery attempt: POST a body to a checked address, bounded in time
and size, over pooled keep-alive connections (urllib3).

* The connection goes to an address :mod:`guard` checked, never to the name
  (the Host header and TLS SNI/verification still use the name).
* Redirects are not followed: a 3xx is a failed attempt.
* ``connect_timeout`` bounds the TCP/TLS connect; ``total_timeout`` bounds the
  whole attempt. Socket timeouts alone cannot do the latter (a receiver that
  trickles a byte a second never trips them), so a watchdog thread shuts down
  the socket of any request that outlives its deadline.
* At most ``max_bytes`` of the answer are read; a longer answer's connection
  is closed rather than drained.
"""
from __future__ import annotations

import email.utils
import socket
import threading
import time
from dataclasses import dataclass
from typing import Optional

import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.exceptions import (
    ConnectTimeoutError, HTTPError, NewConnectionError, ProtocolError,
    ReadTimeoutError, SSLError,
)

from . import guard

_request_deadline = threading.local()


@dataclass
class Outcome:
    status: Optional[int]
    error: Optional[str]          # error kind when no HTTP status was received
    duration: float
    body: bytes = b""
    retry_after: Optional[float] = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class _Watchdog:
    """Shuts down the sockets of requests that outlive their deadline."""

    def __init__(self) -> None:
        self._armed: dict[int, tuple[float, HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def arm(self, conn: HTTPConnection, deadline: float) -> None:
        with self._lock:
            self._armed[id(conn)] = (deadline, conn)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="ckanext-webhooks-watchdog")
                self._thread.start()

    def disarm(self, conn: HTTPConnection) -> None:
        with self._lock:
            self._armed.pop(id(conn), None)

    def _run(self) -> None:
        while True:
            time.sleep(0.1)
            now = time.monotonic()
            with self._lock:
                late = [conn for deadline, conn in self._armed.values() if deadline <= now]
                for conn in late:
                    self._armed.pop(id(conn), None)
            for conn in late:
                sock = getattr(conn, "sock", None)
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


_watchdog = _Watchdog()


class _GuardedMixin:
    """Arms the watchdog when a request starts on this connection."""

    def request(self, *args, **kwargs):  # type: ignore[override]
        deadline = getattr(_request_deadline, "value", None)
        if deadline is not None:
            _watchdog.arm(self, deadline)  # type: ignore[arg-type]
        return super().request(*args, **kwargs)  # type: ignore[misc]

    def connect(self):  # type: ignore[override]
        deadline = getattr(_request_deadline, "value", None)
        if deadline is not None:
            _watchdog.arm(self, deadline)  # type: ignore[arg-type]
        return super().connect()  # type: ignore[misc]


class _GuardedHTTPConnection(_GuardedMixin, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_GuardedMixin, HTTPSConnection):
    pass


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class Sender:
    """Sends deliveries; one per worker process, shared by its threads."""

    def __init__(self, connect_timeout: float = 5.0, total_timeout: float = 15.0,
                 max_bytes: int = 20480, pool_size: int = 64) -> None:
        self.connect_timeout = connect_timeout
        self.total_timeout = total_timeout
        self.max_bytes = max_bytes
        self.pool_size = pool_size
        self._pools: dict[tuple, urllib3.HTTPConnectionPool] = {}
        self._lock = threading.Lock()

    def _pool(self, target: guard.Target, ip: str) -> urllib3.HTTPConnectionPool:
        key = (target.scheme, ip, target.port, target.host)
        pool = self._pools.get(key)
        if pool is None:
            with self._lock:
                pool = self._pools.get(key)
                if pool is None:
                    kwargs = dict(maxsize=self.pool_size, block=False, retries=False)
                    if target.scheme == "https":
                        import certifi
                        pool = _HTTPSPool(ip, target.port, server_hostname=target.host,
                                          assert_hostname=target.host,
                                          cert_reqs="CERT_REQUIRED",
                                          ca_certs=certifi.where(), **kwargs)
                    else:
                        pool = _HTTPPool(ip, target.port, **kwargs)
                    if len(self._pools) > 1000:  # bound memory: many distinct hosts
                        for old in list(self._pools.values())[:500]:
                            old.close()
                        self._pools = dict(list(self._pools.items())[500:])
                    self._pools[key] = pool
        return pool

    def post(self, target: guard.Target, body: bytes, headers: dict[str, str]) -> Outcome:
        start = time.monotonic()
        deadline = start + self.total_timeout
        ip = str(target.addresses[0])
        headers = dict(headers, Host=target.host_header)
        pool = self._pool(target, ip)
        _request_deadline.value = deadline
        response = None
        try:
            response = pool.urlopen(
                "POST", target.path, body=body, headers=headers,
                redirect=False, retries=False, assert_same_host=False,
                preload_content=False, release_conn=False,
                timeout=urllib3.Timeout(connect=self.connect_timeout,
                                        read=self.total_timeout),
            )
            data = response.read(self.max_bytes + 1, decode_content=False) or b""
            capped = len(data) > self.max_bytes
            complete = not capped and _at_eof(response)
            outcome = Outcome(response.status, None, time.monotonic() - start,
                              data[: self.max_bytes],
                              _retry_after(response.headers.get("Retry-After")))
            if time.monotonic() > deadline:
                outcome = Outcome(None, "timeout", time.monotonic() - start)
                complete = False
            elif not capped and not complete:  # the peer hung up mid-answer
                outcome = Outcome(None, "connection_error", time.monotonic() - start)
            if not complete:
                response.close()  # closes the connection; never drain a hostile answer
            return outcome
        except NewConnectionError:  # before ConnectTimeoutError: urllib3 subclasses it
            return Outcome(None, "connect_error", time.monotonic() - start)
        except (ConnectTimeoutError, ReadTimeoutError, socket.timeout, TimeoutError):
            return Outcome(None, "timeout", time.monotonic() - start)
        except SSLError:
            return Outcome(None, "tls_error", time.monotonic() - start)
        except (ProtocolError, HTTPError, OSError) as error:
            kind = "timeout" if time.monotonic() >= deadline else "connection_error"
            if isinstance(error, ProtocolError) and time.monotonic() < deadline:
                kind = "connection_error"
            return Outcome(None, kind, time.monotonic() - start)
        finally:
            _request_deadline.value = None
            if response is not None:
                conn = getattr(response, "connection", None)
                if conn is not None:
                    _watchdog.disarm(conn)
                response.release_conn()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()


def _at_eof(response) -> bool:
    """Was the whole answer read, as long as its Content-Length said?"""
    remaining = response.length_remaining
    if remaining == 0:
        return True
    if remaining is not None:  # fewer bytes than announced: cut short
        return False
    # No Content-Length (chunked or close-delimited): done only if nothing is left.
    try:
        return response.read(1, decode_content=False) == b""
    except Exception:  # noqa: BLE001
        return False


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
