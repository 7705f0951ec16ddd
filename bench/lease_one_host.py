"""One slow host and leases: HOOKS hooks on one receiver (127.0.1.1) that
answers every request after DELAY seconds, one dataset/update (or UPDATES),
with the default worker setup. Far more work for one host than it can take
within a lease or an attempt's deadline: counted, each hook must receive the
update exactly once (0 duplicates); reported, the total time from the commit
to the last receipt and until the delivery queue is empty.

    python bench/lease_one_host.py [--hooks 250 --delay 9] [--updates 1]
        [--timeout S] [--set KEY=VALUE ...]

Quick: --hooks 60 --delay 5. The receiver is slow_receiver.py (asyncio: a
held answer is a timer, not a thread); the ini allows 127.0.1.0/24.
"""
from __future__ import annotations

import argparse
import math
import time
import uuid
from collections import Counter

import ckanapi

from benchlib import bench_stack, reset_webhooks, sysadmin_token, table, write_result
from noisy_neighbours import (ALLOWED, SLOW_PREFIX, attempt_outcomes, duplicate_counts,
                              insert_hooks_at, leftovers, measured_events, other_bench_users,
                              patient, print_leftovers, print_outcomes, receipts_by_delivery,
                              receiver_get, setting, settings, start_receiver, wait_drained,
                              worker_log_counts, worker_processes)

WEB_PORT, RECEIVER_PORT = 15111, 18111
HOST = f"{SLOW_PREFIX}.1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hooks", type=int, default=250)
    parser.add_argument("--delay", type=float, default=9.0,
                        help="seconds the receiver takes to answer")
    parser.add_argument("--updates", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds to wait for the queue to empty (default: 1.5 times the "
                             "lower bound, at least 120, + 60; deliveries pushed to the 5-minute "
                             "retry need --timeout 420 or more)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra ckanext.webhooks.* settings (e.g. lease_seconds=20)")
    args = parser.parse_args()
    sets = settings(args.set)
    deliveries = args.hooks * args.updates
    # One receiver: at most connections_per_host at a time per worker process
    # (it answers, late), whatever the slow lane holds.
    procs = worker_processes()
    at_once = procs * min(setting(sets, "connections_per_host"),
                          setting(sets, "slow_lane_concurrency"))
    bound = args.delay * math.ceil(deliveries / at_once)
    timeout = args.timeout or max(120.0, 1.5 * bound) + 60
    print(f"{deliveries} deliveries to one host answering after {args.delay:g} s, at most "
          f"{at_once:.0f} at once ({procs} worker processes): at least {bound:.0f} s; "
          f"waiting at most {timeout:.0f} s", flush=True)

    if other_bench_users():
        print("warning: other sessions are connected to the bench database "
              "(another benchmark running?)", flush=True)
    reset_webhooks()
    receiver = start_receiver(RECEIVER_PORT, [f"{SLOW_PREFIX}:1-1:{args.delay}"])
    overrides = {"ckanext.webhooks.allowed_networks": ALLOWED,
                 **{f"ckanext.webhooks.{k}": v for k, v in sets.items()}}
    try:
        with bench_stack(WEB_PORT, overrides=overrides,
                         worker_name="bench-worker-lease") as stack:
            admin = ckanapi.RemoteCKAN(stack.url, apikey=sysadmin_token())
            org = admin.action.organization_create(name=f"bench-{uuid.uuid4().hex[:8]}")
            dataset = admin.action.package_create(name=f"bench-{uuid.uuid4().hex[:8]}",
                                                  owner_org=org["id"])
            insert_hooks_at([f"http://{HOST}:{RECEIVER_PORT}/lease/{n}"
                             for n in range(args.hooks)])
            receiver_get(RECEIVER_PORT, "/_reset", HOST, "POST")
            started = time.time()
            for n in range(args.updates):
                admin.action.package_patch(id=dataset["id"], notes=f"lease {n}")
            drained, waited = wait_drained(RECEIVER_PORT, HOST, started, args.updates, timeout)
            queue_empty_at = time.time() - 0.5 if drained else None  # (it waits 0.5 s)
            data = receiver_get(RECEIVER_PORT, "/_receipts", HOST)
            events = patient(measured_events, started)
            left = [] if drained else patient(leftovers)
            outcomes = patient(attempt_outcomes, [e for e, _ in events])
            log_counts = worker_log_counts(stack.worker)
    finally:
        receiver.stop()

    created = dict(events)
    by = receipts_by_delivery(data["receipts"], set(created))
    counts = Counter(len(times) for times in by.values())
    expected = args.hooks * len(events)
    once = counts.get(1, 0)
    extra, twice = duplicate_counts(by)
    first_commit = min(created.values()) if created else None
    last_receipt = max((t for times in by.values() for t in times), default=None)
    last = round(last_receipt - first_commit, 1) if last_receipt and first_commit else None
    total = last if expected and len(by) == expected else None  # once all have arrived
    result = {
        "scenario": {"hooks": args.hooks, "delay": args.delay, "updates": args.updates},
        "events": len(events), "expected": expected, "received_exactly_once": once,
        "received_more_than_once": twice, "missing": expected - len(by),
        "duplicates": extra, "total_s": total, "last_receipt_s_from_commit": last,
        "queue_empty": drained, "waited_s": round(waited, 1), "timeout_s": round(timeout),
        "queue_empty_s_from_commit": round(queue_empty_at - first_commit, 1)
        if queue_empty_at and first_commit else None,
        "lower_bound_s": bound, "worker_processes": procs, "at_once_max": at_once,
        "receiver": {"abandoned_answers": data["abandoned"],
                     "max_inflight": data["max_inflight_total"]},
        "worker_log": log_counts, "attempt_outcomes": outcomes, "leftovers": left,
        "settings": sets,
        "targets": {
            "duplicates": {"value": extra, "target": "== 0", "met": extra == 0},
            "each_hook_once": {"value": f"{once}/{expected}", "target": "all, exactly once",
                               "met": expected > 0 and once == expected
                               and len(by) == expected},
        },
    }
    print()
    print(f"{args.hooks} hooks on one host answering after {args.delay:g} s, "
          f"{len(events)}/{args.updates} update(s)")
    print(table([(expected, once, twice, expected - len(by), extra,
                  total if total is not None else f"not all arrived (last receipt at {last})",
                  result["queue_empty_s_from_commit"], f"{bound:.0f}")],
                ("deliveries", "exactly once", "more than once", "missing",
                 "duplicates (target 0)", "commit->last receipt s", "queue empty s",
                 "lower bound s")))
    print(f"queue empty: {drained} after {result['waited_s']} s (timeout {round(timeout)} s); "
          f"receiver held at most {data['max_inflight_total']} requests at once, "
          f"{data['abandoned']} answers abandoned by the sender; worker log: {log_counts}")
    print()
    print_outcomes(outcomes)
    print_leftovers(left)
    print()
    for name, t in result["targets"].items():
        print(f"{name}: {t['value']} (target {t['target']}): {'met' if t['met'] else 'NOT MET'}")
    print(f"results: {write_result('lease_one_host', result)}")


if __name__ == "__main__":
    main()
