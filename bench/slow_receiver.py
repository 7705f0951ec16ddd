"""A receiver for the isolation benchmarks: one asyncio process listening on
many loopback addresses at once (one port), each group of addresses
answering after its own delay. A slow answer is a timer, not a thread, so
hundreds of requests held for 10 s cost nothing on a 2-core machine.

Every request is recorded when it has been read in full (the receipt time,
``time.time()``, the clock of the whole machine), with the address it came
to, its path and its ``webhook-id``; the answer (204) is written ``delay``
seconds later, in order per connection. A connection the sender closed
before its answer was written counts as ``abandoned`` (the sender gave up on
a request the receiver had: it will be sent again).

    python bench/slow_receiver.py --port 18110 \\
        --group 127.0.1:1-60:10 --group 127.0.2:1-4:0

``--group PREFIX:FIRST-LAST:DELAY``: addresses PREFIX.FIRST ... PREFIX.LAST,
answering after DELAY seconds. Only 127.0.0.0/8 is accepted.
Control endpoints (answered at once, on any of the addresses; not counted):

    GET  /_stats     {"count": n, "inflight": n, "abandoned": n}
    GET  /_receipts  {"receipts": [[address, path, webhook-id, t], ...], "abandoned": n,
                      "max_inflight": {address: n}, "max_inflight_total": n}
    POST /_reset     forget everything
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import time
from collections import defaultdict

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


class State:
    def __init__(self) -> None:
        self.receipts: list[tuple[str, str, str, float]] = []
        self.abandoned = 0
        self.inflight: dict[str, int] = defaultdict(int)
        self.max_inflight: dict[str, int] = defaultdict(int)
        self.inflight_total = 0
        self.max_inflight_total = 0


STATE = State()
DELAYS: dict[str, float] = {}


class Receiver(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport
        self.address = transport.get_extra_info("sockname")[0]
        self.delay = DELAYS.get(self.address, 0.0)
        self.buffer = b""
        self.loop = asyncio.get_running_loop()
        self.next_answer = 0.0  # answers leave in request order

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            head_end = self.buffer.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buffer[:head_end]
            length, webhook_id = 0, ""
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
            self.handle(lines[0], webhook_id)

    def handle(self, request_line: bytes, webhook_id: str) -> None:
        method, path, _ = request_line.split(b" ", 2)
        if path.startswith(b"/_"):
            return self.control(method, path)
        now = time.time()
        STATE.receipts.append((self.address, path.decode("latin-1"), webhook_id, now))
        STATE.inflight[self.address] += 1
        STATE.inflight_total += 1
        STATE.max_inflight[self.address] = max(STATE.max_inflight[self.address],
                                               STATE.inflight[self.address])
        STATE.max_inflight_total = max(STATE.max_inflight_total, STATE.inflight_total)
        generation = STATE
        when = max(self.loop.time() + self.delay, self.next_answer + 1e-6)
        self.next_answer = when
        self.loop.call_at(when, self.answer, generation)

    def answer(self, generation: State) -> None:
        if generation is STATE:  # not reset meanwhile
            STATE.inflight[self.address] -= 1
            STATE.inflight_total -= 1
            if self.transport.is_closing():
                STATE.abandoned += 1
        if not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    def control(self, method: bytes, path: bytes) -> None:
        global STATE
        if path == b"/_reset":
            STATE = State()
            body = b"{}"
        elif path == b"/_receipts":
            body = json.dumps({"receipts": STATE.receipts, "abandoned": STATE.abandoned,
                               "max_inflight": STATE.max_inflight,
                               "max_inflight_total": STATE.max_inflight_total}).encode()
        else:
            body = json.dumps({"count": len(STATE.receipts), "inflight": STATE.inflight_total,
                               "abandoned": STATE.abandoned}).encode()
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


def parse_group(spec: str) -> tuple[list[str], float]:
    """``127.0.1:1-60:10`` -> (["127.0.1.1", ..., "127.0.1.60"], 10.0)."""
    prefix, span, delay = spec.split(":")
    first, _, last = span.partition("-")
    addresses = [f"{prefix}.{n}" for n in range(int(first), int(last or first) + 1)]
    for address in addresses:
        if ipaddress.ip_address(address) not in LOOPBACK:
            raise SystemExit(f"{address} is not a loopback address")
    return addresses, float(delay)


async def serve(port: int, groups: list[str]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for spec in groups:
        addresses, delay = parse_group(spec)
        for address in addresses:
            DELAYS[address] = delay
            servers.append(await loop.create_server(Receiver, address, port, backlog=1024))
    await asyncio.gather(*(server.serve_forever() for server in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--group", action="append", required=True,
                        metavar="PREFIX:FIRST-LAST:DELAY")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.group))


if __name__ == "__main__":
    main()
