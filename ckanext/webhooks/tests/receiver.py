"""A real HTTP receiver for the tests, on a loopback alias (127.0.0.2).

Records every request (path, headers, body, time) and answers by a per-path
script: a list of status codes used in turn (the last one repeats).
:class:`SilentHosts` are many receivers that never answer.
"""
from __future__ import annotations

import json
import random
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


@dataclass
class Received:
    path: str
    headers: dict
    body: bytes
    at: float
    status: int = 0

    @property
    def json(self) -> dict:
        return json.loads(self.body)


@dataclass
class Receiver:
    host: str = "127.0.0.2"
    bind_port: int = 0  # 0: any free port
    # Share of deliveries answered 503 at random (a flaky receiver).
    fail_ratio: float = 0.0
    # Seconds to wait before answering, by path prefix.
    delay_for: dict[str, float] = field(default_factory=dict)
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[int]] = field(default_factory=dict)
    headers_for: dict[str, dict] = field(default_factory=dict)
    # How a path answers verification challenges: echo (default), json, 403, wrong.
    verify_mode: dict[str, str] = field(default_factory=dict)
    verifications: list[Received] = field(default_factory=list)
    _server: Optional[ThreadingHTTPServer] = None
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path = self.path
                challenge = self.headers.get("webhook-challenge")
                if challenge is not None:
                    return self._answer_challenge(path, body, challenge)
                with receiver._cond:
                    receiver.requests.append(
                        Received(path, {k.lower(): v for k, v in self.headers.items()},
                                 body, time.monotonic()))
                    script = receiver.scripts.get(path) or [200]
                    status = script.pop(0) if len(script) > 1 else script[0]
                    if receiver.fail_ratio and random.random() < receiver.fail_ratio:
                        status = 503
                    receiver.requests[-1].status = status
                    receiver._cond.notify_all()
                for prefix, seconds in receiver.delay_for.items():
                    if path.startswith(prefix):
                        time.sleep(seconds)
                reply = b'{"ok": true}'
                self.send_response(status)
                for key, value in receiver.headers_for.get(path, {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def _answer_challenge(self, path, body, challenge):
                with receiver._cond:
                    receiver.verifications.append(
                        Received(path, {k.lower(): v for k, v in self.headers.items()},
                                 body, time.monotonic()))
                mode = receiver.verify_mode.get(path, "echo")
                status, reply = 200, challenge.encode()
                if mode == "json":
                    reply = json.dumps({"challenge": challenge}).encode()
                elif mode == "wrong":
                    reply = b"not-the-challenge"
                elif mode.isdigit():
                    status, reply = int(mode), b"no"
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 1024
            allow_reuse_address = True

            def handle_error(self, request, client_address):
                pass  # clients hanging up are no test failure

        self._server = Server((self.host, self.bind_port), Handler)
        self.bind_port = self._server.server_address[1]
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str = "/hook") -> str:
        return f"http://{self.host}:{self.port}{path}"

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()

    def on(self, path: str) -> list[Received]:
        with self._cond:
            return [r for r in self.requests if r.path == path]

    def wait_for(self, predicate: Callable[[list[Received]], bool],
                 timeout: float = 20.0) -> list[Received]:
        """Wait until predicate(all requests) holds; returns the requests."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.requests):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"receiver: condition not met within {timeout}s; got "
                        f"{[(r.path, r.body[:80]) for r in self.requests]}")
                self._cond.wait(remaining)
            return list(self.requests)

    def wait_count(self, path: str, count: int, timeout: float = 20.0) -> list[Received]:
        self.wait_for(lambda rs: sum(r.path == path for r in rs) >= count, timeout)
        return self.on(path)


class SilentHosts:
    """``count`` receivers on ``host`` (a port each) that take requests and
    never answer; one thread for all. Counts requests and closed connections."""

    def __init__(self, count: int, host: str = "127.0.0.2"):
        self.host = host
        self.selector = selectors.DefaultSelector()
        self.listeners = []
        for _ in range(count):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sock.listen(64)
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, "listen")
            self.listeners.append(sock)
        self.requests = 0
        self.closed = 0
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def urls(self, path="/slow"):
        return [f"http://{self.host}:{s.getsockname()[1]}{path}" for s in self.listeners]

    def _run(self):
        try:
            self._serve()
        finally:
            for key in list(self.selector.get_map().values()):
                key.fileobj.close()
            self.selector.close()

    def _serve(self):
        while not self._stop:
            for key, _ in self.selector.select(0.2):
                if key.data == "listen":
                    try:
                        conn, _ = key.fileobj.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    self.selector.register(conn, selectors.EVENT_READ, "conn")
                    continue
                try:
                    data = key.fileobj.recv(65536)
                except OSError:
                    data = b""
                if data.startswith(b"POST "):
                    self.requests += 1
                if not data:
                    self.closed += 1
                    self.selector.unregister(key.fileobj)
                    key.fileobj.close()

    def close(self):
        self._stop = True  # the thread closes every socket
