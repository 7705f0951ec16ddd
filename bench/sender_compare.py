"""The hand-written httptools sender (``delivery.Sender``) against aiohttp
(``bench/aiohttp_sender.py``), in the same run, in alternating rounds (the
order of the contenders rotates every round), with wrk as a reference:

* **CPU per request**: each sender posts the worker's kind of request
  (an address string parsed, checked and signed at send time, distinct
  paths) to the asyncio receiver on 127.0.0.2, in batches of 500 with four
  batches in flight, as the worker does; the process's CPU (user + system)
  per request. wrk (one thread, 64 keep-alive connections) posts the same
  body to the same receiver for 3 s: its CPU per request.
* **End to end**: 10,000 POSTs to distinct paths on one receiver (the
  stdlib threaded receiver and the asyncio one), from the first submit to
  the last outcome, batches of 500 kept four in flight; a fresh sender each
  time, warmed up with one request; the receiver must count 10,000 distinct
  paths. Beside it wrk's raw keep-alive rate to the same receiver.

Contenders: ``httptools`` (delivery.Sender), ``aiohttp`` (AiohttpSender:
limit 64, limit_per_host 16, the guard resolver, no gates) and, with
``--gates``, ``aiohttp+gates`` (the same with delivery's slow-lane/probe
policy in front of it, what a replacement would have to keep).

    python bench/sender_compare.py [--rounds 5] [--requests 20000] [--hooks 10000] [--gates]

Needs aiohttp (``pip install aiohttp``; measured with 3.14.5), which the
extension itself does not use.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import statistics
import subprocess
import tempfile
import time

import aiohttp
from aiohttp_sender import AiohttpSender
from benchlib import RECEIVER_HOST, receiver_call, start_receiver, table, write_result

from ckanext.webhooks.sender import Request, Sender

ASYNCIO_PORT, STDLIB_PORT = 18117, 18118
BATCH, IN_FLIGHT = 500, 4
ALLOWED = [ipaddress.ip_network(f"{RECEIVER_HOST}/32")]
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_sender(name: str):
    if name == "httptools":
        return Sender(allowed_networks=ALLOWED)
    if name == "aiohttp":
        return AiohttpSender(allowed_networks=ALLOWED)
    if name == "aiohttp+gates":
        return AiohttpSender(allowed_networks=ALLOWED, gates=True)
    raise ValueError(name)


def _requests(port: int, body: bytes, start: int, count: int) -> list[Request]:
    # As the dispatcher hands them over: the hook's address, the body, the
    # event id and the hook's secret; the sender parses, checks and signs.
    return [Request(f"http://{RECEIVER_HOST}:{port}/h/{n}", body, "msg_" + "0" * 32, (SECRET,))
            for n in range(start, start + count)]


def _pipeline(sender, port: int, body: bytes, total: int) -> None:
    """``total`` requests in batches of BATCH, IN_FLIGHT batches at a time
    (a new one as soon as the oldest is done, as the worker keeps them)."""
    pending, sent = [], 0
    while sent < total or pending:
        while sent < total and len(pending) < IN_FLIGHT:
            count = min(BATCH, total - sent)
            pending.append(sender.submit(_requests(port, body, sent, count)))
            sent += count
        outcomes = pending.pop(0).result()
        bad = [o for o in outcomes if o.status != 204]
        if bad:
            raise RuntimeError(f"failed deliveries: {bad[:3]}")


def cpu_round(name: str, body: bytes, requests: int) -> dict:
    sender = make_sender(name)
    try:
        _pipeline(sender, ASYNCIO_PORT, body, BATCH)  # connect and warm up
        cpu, started = _cpu(), time.monotonic()
        _pipeline(sender, ASYNCIO_PORT, body, requests)
        wall, cpu = time.monotonic() - started, _cpu() - cpu
    finally:
        sender.close()
    return {"requests": requests, "seconds": round(wall, 3), "per_s": round(requests / wall, 1),
            "cpu_us_per_request": round(cpu / requests * 1e6, 1)}


def e2e_round(name: str, port: int, body: bytes, hooks: int) -> dict:
    sender = make_sender(name)
    try:
        outcome = sender.post(Request(f"http://{RECEIVER_HOST}:{port}/warm", body))
        if outcome.status != 204:
            raise RuntimeError(f"warm-up failed: {outcome}")
        receiver_call(port, "/_reset", "POST")
        cpu, started = _cpu(), time.monotonic()
        _pipeline(sender, port, body, hooks)
        wall, cpu = time.monotonic() - started, _cpu() - cpu
    finally:
        sender.close()
    stats = receiver_call(port, "/_stats")
    if stats["count"] != hooks or stats["paths"] != hooks:
        raise RuntimeError(f"receiver counted {stats}")
    return {"requests": hooks, "seconds": round(wall, 3), "per_s": round(hooks / wall, 1),
            "cpu_us_per_request": round(cpu / hooks * 1e6, 1)}


def wrk(port: int, body: bytes, seconds: int = 3, connections: int = 64) -> dict:
    """wrk's raw keep-alive rate and CPU per request, distinct paths."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = {json.dumps(body.decode())}\n"
                     "local n = 0\nrequest = function()\n  n = n + 1\n"
                     '  return wrk.format(nil, "/raw/" .. n)\nend\n')
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script.name,
                          f"http://{RECEIVER_HOST}:{port}/"],
                         capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    done = next(int(line.split()[0]) for line in out.splitlines() if " requests in " in line)
    rate = next(float(line.split()[1]) for line in out.splitlines()
                if line.startswith("Requests/sec:"))
    return {"requests": done, "per_s": round(rate, 1),
            "cpu_us_per_request": round(cpu / done * 1e6, 1)}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3), "all": [round(v, 3) for v in values]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20000, help="per CPU measurement")
    parser.add_argument("--hooks", type=int, default=10000, help="per end-to-end measurement")
    parser.add_argument("--gates", action="store_true", help="also aiohttp+gates")
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    contenders = ["httptools", "aiohttp"] + (["aiohttp+gates"] if args.gates else [])
    # The dispatcher's body for a dataset of a few resources: about 3 KB.
    body = json.dumps({"webhook_id": "x" * 43, "event_id": "msg_" + "0" * 32,
                       "topic": "dataset/update", "timestamp": "2026-01-01T00:00:00Z",
                       "site_url": "http://127.0.0.1", "schema_version": "1",
                       "data": {"notes": "x" * 2500}}, separators=(",", ":")).encode()
    receivers = {"asyncio": start_receiver(ASYNCIO_PORT, "asyncio"),
                 "stdlib": start_receiver(STDLIB_PORT, "stdlib")}
    ports = {"asyncio": ASYNCIO_PORT, "stdlib": STDLIB_PORT}
    rounds: list[dict] = []
    try:
        for r in range(args.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            result: dict = {"round": r + 1, "order": order, "cpu": {}, "e2e": {}, "wrk": {}}
            if not args.skip_cpu:
                for name in order:
                    result["cpu"][name] = cpu_round(name, body, args.requests)
                result["wrk"]["cpu"] = wrk(ASYNCIO_PORT, body)
            for impl, port in ports.items():
                result["e2e"][impl] = {name: e2e_round(name, port, body, args.hooks)
                                       for name in order}
                receiver_call(port, "/_reset", "POST")
                result["wrk"][impl] = wrk(port, body)
            rounds.append(result)
            print(json.dumps(result), flush=True)
    finally:
        for proc in receivers.values():
            proc.stop()

    summary: dict = {"cpu": {}, "e2e": {}, "ratios": {}}
    rows = []
    if not args.skip_cpu:
        for name in contenders:
            summary["cpu"][name] = spread([x["cpu"][name]["cpu_us_per_request"] for x in rounds])
        summary["cpu"]["wrk"] = spread([x["wrk"]["cpu"]["cpu_us_per_request"] for x in rounds])
        for name in contenders[1:]:
            summary["ratios"][f"cpu {name}/httptools"] = spread(
                [x["cpu"][name]["cpu_us_per_request"] / x["cpu"]["httptools"]["cpu_us_per_request"]
                 for x in rounds])
        for name in contenders + ["wrk"]:
            s = summary["cpu"][name]
            rows.append(("CPU µs/request (asyncio receiver)", name, s["median"],
                         f"{s['min']}–{s['max']}"))
    for impl in ports:
        summary["e2e"][impl] = {name: spread([x["e2e"][impl][name]["per_s"] for x in rounds])
                                for name in contenders}
        summary["e2e"][impl]["wrk"] = spread([x["wrk"][impl]["per_s"] for x in rounds])
        for name in contenders[1:]:
            summary["ratios"][f"e2e {impl} httptools/{name}"] = spread(
                [x["e2e"][impl]["httptools"]["per_s"] / x["e2e"][impl][name]["per_s"]
                 for x in rounds])
        for name in contenders + ["wrk"]:
            s = summary["e2e"][impl][name]
            rows.append((f"requests/s, {args.hooks} POSTs, {impl} receiver", name, s["median"],
                         f"{s['min']}–{s['max']}"))
    print()
    print(table(rows, ("figure", "client", "median", "range")))
    print()
    print(table([(k, v["median"], f"{v['min']}–{v['max']}", " ".join(map(str, v["all"])))
                 for k, v in summary["ratios"].items()],
                ("ratio", "median", "range", "per round")))
    path = write_result("sender_compare", {
        "aiohttp": aiohttp.__version__, "payload_bytes": len(body), "rounds": rounds,
        "summary": summary, "batch": BATCH, "in_flight": IN_FLIGHT,
        "settings": {"concurrency": 64, "per_host": 16}})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
