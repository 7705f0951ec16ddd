"""CPU per request of the delivery sender alone (no CKAN, no database), beside
wrk's CPU per request against the same receiver in the same run.

The sender posts a fan-out's payload to distinct paths on the asyncio
receiver on 127.0.0.2, in batches of 500 with four batches in flight, as the
worker does; wrk (one thread, 64 keep-alive connections) posts the same body.
The figure is the sender's CPU (user + system) per request and its ratio to
wrk's: how far the Python sender is from a C load tool.

    python bench/sender_cpu.py [--requests 40000]
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import subprocess
import tempfile
import time

from benchlib import RECEIVER_HOST, start_receiver, table, write_result

from ckanext.webhooks import guard
from ckanext.webhooks.sender import Sender

RECEIVER_PORT = 18107
BATCH, IN_FLIGHT = 500, 4
ALLOWED = [ipaddress.ip_network("127.0.0.0/8")]


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def sender_cpu(body: bytes, headers: dict, requests: int) -> dict:
    sender = Sender()
    targets = [guard.resolve(f"http://{RECEIVER_HOST}:{RECEIVER_PORT}/h/{n}", ALLOWED)
               for n in range(BATCH)]
    sender.post_many([(targets[0], body, headers)])  # connect and warm up
    cpu, started, sent = _cpu(resource.RUSAGE_SELF), time.monotonic(), 0
    while sent < requests:
        futures = [sender.submit((t, body, headers) for t in targets) for _ in range(IN_FLIGHT)]
        for future in futures:
            outcomes = future.result()
            if not all(o.status == 204 for o in outcomes):
                raise RuntimeError(f"failed deliveries: {outcomes[:3]}")
        sent += BATCH * IN_FLIGHT
    wall, cpu = time.monotonic() - started, _cpu(resource.RUSAGE_SELF) - cpu
    sender.close()
    return {"requests": sent, "seconds": round(wall, 3), "per_s": round(sent / wall, 1),
            "cpu_us_per_request": round(cpu / sent * 1e6, 1)}


def wrk_cpu(body: bytes, seconds: int = 5) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                     f"wrk.body = {json.dumps(body.decode())}\n")
    cpu = _cpu(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t1", "-c64", f"-d{seconds}s", "-s", script.name,
                          f"http://{RECEIVER_HOST}:{RECEIVER_PORT}/raw"],
                         capture_output=True, text=True, check=True).stdout
    cpu = _cpu(resource.RUSAGE_CHILDREN) - cpu
    done = next(int(line.split()[0]) for line in out.splitlines() if " requests in " in line)
    return {"requests": done, "per_s": round(done / seconds, 1),
            "cpu_us_per_request": round(cpu / done * 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=40000)
    args = parser.parse_args()
    body = json.dumps({"webhook_id": "x" * 43, "topic": "dataset/update",
                       "data": {"notes": "x" * 2500}}).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "ckanext-webhooks/bench",
               "webhook-id": "msg_" + "0" * 32, "webhook-timestamp": str(int(time.time())),
               "webhook-signature": "v1," + "A" * 44}
    receiver = start_receiver(RECEIVER_PORT, "asyncio")
    try:
        ours = sender_cpu(body, headers, args.requests)
        wrk = wrk_cpu(body)
    finally:
        receiver.stop()
    ratio = round(ours["cpu_us_per_request"] / wrk["cpu_us_per_request"], 2)
    print(table([("ckanext-webhooks sender", ours["per_s"], ours["cpu_us_per_request"]),
                 ("wrk", wrk["per_s"], wrk["cpu_us_per_request"])],
                ("client", "requests/s", "CPU µs per request")))
    print(f"sender CPU / wrk CPU per request: {ratio}")
    path = write_result("sender_cpu", {"payload_bytes": len(body), "sender": ours, "wrk": wrk,
                                       "cpu_ratio_to_wrk": ratio})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
