"""The benchmarks' receivers, two implementations of one behaviour:

* ``--impl asyncio``: a minimal asyncio HTTP/1.1 server (about 100,000
  requests/s here: a best case no real consumer reaches);
* ``--impl stdlib``: the standard library's ThreadingHTTPServer with
  keep-alive that also parses each JSON body, as examples/receiver.py and a
  typical small consumer do.

Each reads every request fully, answers 204, and records the receipt time of
every delivery with its ``webhook-id``. The delivery benchmarks and the raw
rate measured with wrk use the same receiver, so the rates are comparable.
Control endpoints (not counted):

    GET  /_stats   {"count": n, "first": t, "last": t, "bytes": n}
    GET  /_times   {"<webhook-id>": [receipt times...], ...}
    POST /_reset   forget everything

    python bench/receiver.py --host 127.0.0.2 --port 18100
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.bytes = 0
        self.first = None
        self.last = None
        self.times: dict[str, list[float]] = defaultdict(list)
        self.paths: set[bytes] = set()


STATS = Stats()


class Receiver(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end]
            length = 0
            webhook_id = None
            lines = head.split(b"\r\n")
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                lowered = name.strip().lower()
                if lowered == b"content-length":
                    length = int(value)
                elif lowered == b"webhook-id":
                    webhook_id = value.strip().decode()
            end = head_end + 4 + length
            if len(self.buffer) < end:
                return
            self.buffer = self.buffer[end:]
            self.handle(lines[0], webhook_id, length)

    def handle(self, request_line: bytes, webhook_id, length: int) -> None:
        method, path, _ = request_line.split(b" ", 2)
        if path.startswith(b"/_"):
            return self.control(method, path)
        now = time.time()
        STATS.count += 1
        STATS.bytes += length
        STATS.first = STATS.first or now
        STATS.last = now
        if webhook_id:
            STATS.times[webhook_id].append(now)
        STATS.paths.add(path)
        self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    def control(self, method: bytes, path: bytes) -> None:
        if path == b"/_reset":
            STATS.reset()
            body = b"{}"
        elif path == b"/_times":
            body = json.dumps(STATS.times).encode()
        else:
            body = json.dumps({"count": STATS.count, "first": STATS.first, "last": STATS.last,
                               "bytes": STATS.bytes, "paths": len(STATS.paths)}).encode()
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def serve_stdlib(host: str, port: int) -> None:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path.startswith("/_"):
                return self._control()
            json.loads(body)
            now = time.time()
            with LOCK:
                STATS.count += 1
                STATS.bytes += length
                STATS.first = STATS.first or now
                STATS.last = now
                webhook_id = self.headers.get("webhook-id")
                if webhook_id:
                    STATS.times[webhook_id].append(now)
                STATS.paths.add(self.path.encode())
            self.send_response(204)
            self.end_headers()

        def _control(self):
            if self.path == "/_reset":
                STATS.reset()
                body = b"{}"
            elif self.path == "/_times":
                body = json.dumps(STATS.times).encode()
            else:
                body = json.dumps({"count": STATS.count, "first": STATS.first,
                                   "last": STATS.last, "bytes": STATS.bytes,
                                   "paths": len(STATS.paths)}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = _control

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # the listen backlog (5 by default)

        def handle_error(self, request, client_address):
            pass  # clients hanging up (wrk stopping) are not errors here

    server = Server((host, port), Handler)
    server.request_queue_size = 1024
    server.serve_forever()


LOCK = __import__("threading").Lock()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Receiver, host, port, backlog=4096)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.2")
    parser.add_argument("--port", type=int, default=18100)
    parser.add_argument("--impl", choices=["asyncio", "stdlib"], default="asyncio")
    args = parser.parse_args()
    if args.impl == "stdlib":
        serve_stdlib(args.host, args.port)
    else:
        asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
