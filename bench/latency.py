"""Latency: with an idle worker, the time from the commit of a package_update
(the event's timestamp, taken in the writer's transaction just before COMMIT)
to the receipt of its delivery at a receiver on 127.0.0.2, over N events.

    python bench/latency.py [--events 200] [--gap 0.1]
"""
from __future__ import annotations

import argparse
import time
import uuid

import ckanapi

from benchlib import (RECEIVER_HOST, bench_stack, insert_hooks, receiver_call, reset_webhooks,
                      sql, summary, sysadmin_token, table, wait_count, write_result)

WEB_PORT, RECEIVER_PORT = 15104, 18104


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--gap", type=float, default=0.1, help="idle seconds between updates")
    args = parser.parse_args()

    reset_webhooks()
    with bench_stack(WEB_PORT, RECEIVER_PORT, worker_name="bench-worker-latency") as stack:
        admin = ckanapi.RemoteCKAN(stack.url, apikey=sysadmin_token())
        org = admin.action.organization_create(name=f"bench-{uuid.uuid4().hex[:8]}")
        dataset = admin.action.package_create(name=f"bench-{uuid.uuid4().hex[:8]}",
                                              owner_org=org["id"])
        insert_hooks(1, "dataset/update", f"http://{RECEIVER_HOST}:{RECEIVER_PORT}/latency/")
        for n in range(5):  # warm up
            admin.action.package_patch(id=dataset["id"], notes=f"warm {n}")
        wait_count(RECEIVER_PORT, 5, 30)
        time.sleep(1)
        receiver_call(RECEIVER_PORT, "/_reset", "POST")
        started = time.time()
        for n in range(args.events):
            admin.action.package_patch(id=dataset["id"], notes=f"latency {n}")
            time.sleep(args.gap)
        wait_count(RECEIVER_PORT, args.events, 60)
        times = receiver_call(RECEIVER_PORT, "/_times")
        created = dict(sql("SELECT id, extract(epoch from created)::float8 FROM webhooks_event "
                           "WHERE topic = 'dataset/update' AND created >= to_timestamp(:t)",
                           t=started))
    latencies = [(receipts[0] - created[event_id]) * 1000
                 for event_id, receipts in times.items() if event_id in created]
    stats = summary(latencies)
    print(table([(stats["n"], f"{stats['median']:.1f}", f"{stats['p95']:.1f}",
                  f"{stats['p99']:.1f}", f"{max(latencies):.1f}")],
                ("events", "p50 ms (target <= 20)", "p95 ms", "p99 ms (target <= 100)", "max ms")))
    print(f"results: {write_result('latency', {'latency_ms': stats, 'max_ms': max(latencies)})}")


if __name__ == "__main__":
    main()
