#!/usr/bin/env python3
"""A small webhook receiver for ckanext-webhooks, standard library only.

It answers the portal's verification handshake (echoes the challenge), verifies
the Standard Webhooks signature when given the hook's secret,
ignores deliveries it has already seen (de-duplication by ``webhook-id``,
which stays the same across retries), and prints each event.

    python examples/receiver.py --host 127.0.0.2 --port 8000 [--secret whsec_...]

Answer 2xx quickly: the portal counts anything else, or a slow answer, as a
failure and retries (4xx are not retried; 410 Gone deletes the hook).
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import sys
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOLERANCE = 5 * 60  # seconds; older or future timestamps are replays


def verify(secret: str, headers, body: bytes) -> bool:
    """Check webhook-signature as the Standard Webhooks spec defines it."""
    msg_id = headers.get("webhook-id", "")
    timestamp = headers.get("webhook-timestamp", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > TOLERANCE:
        return False
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    for candidate in headers.get("webhook-signature", "").split():
        version, _, signature = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(signature, expected):
            return True
    return False


def make_handler(secret: str | None, out=sys.stdout):
    seen: "OrderedDict[str, None]" = OrderedDict()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self, status: int, body: bytes = b"") -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > 10 * 1024 * 1024:
                return self._reply(413)
            body = self.rfile.read(length)
            challenge = self.headers.get("webhook-challenge")
            if challenge is not None:  # the portal asks: do you want this hook?
                print(json.dumps({"verification": json.loads(body).get("topic")}),
                      file=out, flush=True)
                return self._reply(200, challenge.encode())
            if secret and not verify(secret, self.headers, body):
                return self._reply(401, b"bad signature")
            event_id = self.headers.get("webhook-id", "")
            if event_id in seen:  # a retry of something already handled
                return self._reply(200, b"duplicate")
            seen[event_id] = None
            while len(seen) > 100_000:
                seen.popitem(last=False)
            event = json.loads(body)
            data = event.get("data") or {}
            print(json.dumps({"received": event["topic"], "event_id": event["event_id"],
                              "id": data.get("id"), "name": data.get("name"),
                              "title": data.get("title"),
                              "hook": fingerprint(event["webhook_id"])}),
                  file=out, flush=True)
            self._reply(204)

        def log_message(self, *args) -> None:
            pass

    return Handler


def fingerprint(webhook_id: str) -> str:
    """What this receiver prints instead of the hook's id: whoever holds the
    id can delete the hook, so it stays out of logs (the portal's own logs
    show hooks the same way)."""
    return "hook:" + hashlib.sha256(webhook_id.encode()).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.2")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--secret", help="the hook's whsec_ secret, to verify signatures")
    args = parser.parse_args()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(args.secret))
    print(f"receiver listening on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
