"""Noisy neighbours: healthy hooks beside many slow ones. SLOW_HOOKS hooks on
SLOW_HOSTS receivers that answer after SLOW_DELAY seconds (127.0.1.1 ...),
HEALTHY_HOOKS hooks on HEALTHY_HOSTS prompt receivers (127.0.2.1 ...), all
subscribed to dataset/update; UPDATES package_patch calls at RATE per second,
each fanned out to every hook. Measured, with the default worker setup:

* healthy deliveries: commit to receipt per delivery (the event's
  ``created``, taken in the writer's transaction just before COMMIT, to the
  first receipt at the receiver: same machine, same clock), p50/p95/p99/max;
* duplicates: receipts of one (hook path, webhook-id) beyond the first, over
  all hooks;
* slow deliveries: each must arrive exactly once; the run waits until the
  delivery queue is empty (everything delivered or given up) or a timeout
  computed from the scenario, and reports how long the drain took.

    python bench/noisy_neighbours.py [--slow-hooks 300 --slow-hosts 60 --slow-delay 10
        --healthy-hooks 20 --healthy-hosts 4 --updates 20 --rate 2] [--warmup 3]
        [--drain-timeout S] [--set KEY=VALUE ...]

At the defaults (the issue's scenario) the 6,000 slow deliveries take at
least 6,000 x 10 s / 64 (two worker processes, each a slow lane of 32) =
938 s, and the run waits up to 1.5 times that (+60 s) for the queue to
empty: about 16 to 25 minutes. A quick validation (about 4 minutes):
--slow-hooks 60 --slow-hosts 12 --slow-delay 5 --updates 6. Deliveries the
engine pushes to the 5-minute retry are reported as still queued at the
timeout (with when they are due); --drain-timeout 480 waits for them.
Receivers listen on loopback aliases only (one asyncio process, see
slow_receiver.py); the ini allows 127.0.1.0/24 and 127.0.2.0/24.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

import ckanapi

from benchlib import (bench_stack, percentile, processes, reset_webhooks, sql, sysadmin_token,
                      table, write_result)

WEB_PORT, RECEIVER_PORT = 15110, 18110
SLOW_PREFIX, HEALTHY_PREFIX = "127.0.1", "127.0.2"
ALLOWED = "127.0.1.0/24 127.0.2.0/24"
HERE = Path(__file__).resolve().parent

# The sender's defaults (config_declaration.yaml), for the drain's lower bound.
DEFAULTS = {"timeout": 15.0, "connections_per_host": 16, "slow_lane_per_host": 2,
            "slow_lane_concurrency": 32, "concurrency": 64}


# --- shared with lease_one_host.py ---------------------------------------------

def settings(pairs: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` options: ckanext.webhooks.KEY for the stack's ini."""
    return dict(pair.split("=", 1) for pair in pairs)


def setting(sets: dict[str, str], key: str) -> float:
    return float(sets.get(key, DEFAULTS[key]))


def worker_processes() -> int:
    """The worker's pool processes in its default setup: one per core."""
    return os.cpu_count() or 1


def start_receiver(port: int, groups: list[str]) -> processes.Process:
    proc = processes.Process("bench-slow-receiver", [
        sys.executable, str(HERE / "slow_receiver.py"), "--port", str(port),
        *(arg for group in groups for arg in ("--group", group))])
    first = groups[0].split(":")
    processes.wait_port(port, 15, host=f"{first[0]}.{first[1].split('-')[0]}", proc=proc.proc)
    return proc


def receiver_get(port: int, path: str, host: str, method: str = "GET") -> dict:
    import urllib.request
    request = urllib.request.Request(f"http://{host}:{port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def insert_hooks_at(addresses: list[str], topic: str = "dataset/update") -> None:
    """One hook per address (each its own path), straight into the table."""
    hosts = [address.split("/")[2].rsplit(":", 1)[0] for address in addresses]
    sql("""
        INSERT INTO webhooks (id, topics, address, host, site, created)
        SELECT md5(random()::text || a) || md5(a), ARRAY[:topic], a, h, h, now()
          FROM unnest(CAST(:addresses AS text[]), CAST(:hosts AS text[])) AS t(a, h)
    """, topic=topic, addresses=addresses, hosts=hosts)


def other_bench_users() -> int:
    """Sessions of someone else on the bench database (another benchmark would
    truncate this one's tables, and this one theirs)."""
    [(n,)] = sql("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                 "AND pid <> pg_backend_pid()")
    return n


def patient(function, *args, tries: int = 30, **kwargs):
    """``function(*args, **kwargs)``, tried again for a while if the database is
    briefly away (other suites on this machine restart PostgreSQL)."""
    import sqlalchemy.exc
    for attempt in range(tries):
        try:
            return function(*args, **kwargs)
        except sqlalchemy.exc.OperationalError as error:
            if attempt == tries - 1:
                raise
            print(f"  database unavailable ({str(error).splitlines()[0][:80]}): "
                  "trying again in 2 s", flush=True)
            time.sleep(2)


def measured_events(since: float) -> list[tuple[str, float]]:
    return [(event_id, created) for event_id, created in sql(
        "SELECT id, extract(epoch from created)::float8 FROM webhooks_event "
        "WHERE topic = 'dataset/update' AND created >= to_timestamp(:t) ORDER BY created",
        t=since)]


def queue_state(since: float) -> dict:
    [(rows, claimed, next_due, unfanned)] = sql("""
        SELECT (SELECT count(*) FROM webhooks_delivery),
               (SELECT count(*) FROM webhooks_delivery WHERE claim_token IS NOT NULL),
               (SELECT extract(epoch from min(due) - now())::float8 FROM webhooks_delivery
                 WHERE claim_token IS NULL),
               (SELECT count(*) FROM webhooks_event
                 WHERE created >= to_timestamp(:t) AND fanned_out IS NULL
                   AND set_aside IS NULL)
    """, t=since)
    return {"rows": rows, "claimed": claimed, "unfanned_events": unfanned,
            "next_due_s": None if next_due is None else round(next_due, 1)}


def wait_drained(port: int, control_host: str, since: float, events_expected: int,
                 timeout: float, progress: Optional[callable] = None) -> tuple[bool, float]:
    """Until every expected event is fanned out and the delivery queue is
    empty (each delivery delivered or given up), or ``timeout``. Returns
    (drained, seconds waited)."""
    started = time.time()
    last_print = started
    while True:
        state = patient(queue_state, since)
        events = len(patient(measured_events, since))
        if events >= events_expected and state["unfanned_events"] == 0 and state["rows"] == 0:
            time.sleep(0.5)  # a receipt is recorded before its outcome: nothing is in flight
            return True, time.time() - started
        now = time.time()
        if now - started > timeout:
            return False, now - started
        if now - last_print >= 15:
            last_print = now
            stats = receiver_get(port, "/_stats", control_host)
            line = (f"  {now - started:5.0f} s: {stats['count']} receipts, "
                    f"{stats['inflight']} held by the receiver, queue {state['rows']} rows "
                    f"({state['claimed']} claimed, next due in {state['next_due_s']} s)")
            print(line + (f"; {progress()}" if progress else ""), flush=True)
        time.sleep(1)


def leftovers() -> list[dict]:
    """What is still queued (a timeout): per receiver group, attempts and last error."""
    rows = sql(f"""
        SELECT CASE WHEN w.host LIKE '{SLOW_PREFIX}.%' THEN 'slow' ELSE 'healthy' END,
               d.attempts, coalesce(d.last_status::text, d.last_error, '(none yet)'),
               d.claim_token IS NOT NULL, count(*),
               extract(epoch from min(d.due) - now())::float8,
               extract(epoch from max(d.due) - now())::float8
          FROM webhooks_delivery d JOIN webhooks w ON w.id = d.hook_id
         GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4""")
    return [{"group": g, "attempts": a, "last": last, "claimed": c, "count": n,
             "due_in_s": [round(lo, 1), round(hi, 1)]} for g, a, last, c, n, lo, hi in rows]


def attempt_outcomes(event_ids: list[str]) -> list[dict]:
    """The delivery log for these events: per group, attempt number and outcome."""
    rows = sql(f"""
        SELECT CASE WHEN w.host LIKE '{SLOW_PREFIX}.%' THEN 'slow' ELSE 'healthy' END,
               a.attempt, coalesce(a.status::text, a.error), count(*),
               percentile_disc(0.5) WITHIN GROUP (ORDER BY a.duration_ms), max(a.duration_ms)
          FROM webhooks_attempt a JOIN webhooks w ON w.id = a.hook_id
         WHERE a.event_id = ANY(:ids)
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3""", ids=event_ids)
    return [{"group": g, "attempt": n, "outcome": o, "count": c, "median_ms": med,
             "max_ms": top} for g, n, o, c, med, top in rows]


def worker_log_counts(worker: processes.Process) -> dict:
    text = worker.output()
    return {"outcomes_lost_to_another_worker": text.count("another worker took the deliveries"),
            "lease_renewal_failures": text.count("could not renew the leases"),
            "given_up": text.count("giving up on event"),
            "errors": sum(1 for line in text.splitlines() if " ERROR " in line)}


def receipts_by_delivery(receipts: list, event_ids: set[str]) -> dict[tuple, list[float]]:
    """(address, path, webhook-id) -> receipt times, for the measured events."""
    by = defaultdict(list)
    for address, path, webhook_id, at in receipts:
        if webhook_id in event_ids:
            by[(address, path, webhook_id)].append(at)
    return by


def duplicate_counts(by: dict[tuple, list[float]]) -> tuple[int, int]:
    """(receipts beyond the first, deliveries received more than once)."""
    extra = sum(len(times) - 1 for times in by.values())
    return extra, sum(1 for times in by.values() if len(times) > 1)


def rounded(value, digits: int = 1):
    """For JSON: floats rounded, NaN (no data) as null."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, digits)
    return value


def ms(value: Optional[float]) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.0f}"


def print_outcomes(outcomes: list[dict]) -> None:
    if outcomes:
        print(table([(o["group"], o["attempt"], o["outcome"], o["count"], o["median_ms"],
                       o["max_ms"]) for o in outcomes],
                    ("hooks", "attempt", "outcome", "count", "median ms", "max ms")))


def print_leftovers(left: list[dict]) -> None:
    if left:
        print("still queued at the timeout:")
        print(table([(x["group"], x["attempts"], x["last"], x["claimed"], x["count"],
                      f"{x['due_in_s'][0]}..{x['due_in_s'][1]}") for x in left],
                    ("hooks", "attempts", "last outcome", "claimed", "rows", "due in (s)")))


# --- the scenario ---------------------------------------------------------------

def drain_bound(args, sets: dict[str, str]) -> dict:
    """The fastest the slow deliveries can go: every worker process fills its
    slow lane (``slow_lane_concurrency``), each slow receiver at most
    ``connections_per_host`` (it answers, late); and the same at the lane's
    per-host limit for receivers that do not answer (``slow_lane_per_host``)."""
    deliveries = args.slow_hooks * args.updates
    procs = worker_processes()
    lane = setting(sets, "slow_lane_concurrency")
    best = procs * min(args.slow_hosts * setting(sets, "connections_per_host"), lane)
    per_host = procs * min(args.slow_hosts * setting(sets, "slow_lane_per_host"), lane)
    return {"slow_deliveries": deliveries, "worker_processes": procs,
            "concurrent_slow_max": best,
            "lower_bound_s": round(args.slow_delay * deliveries / best, 1),
            "concurrent_at_slow_lane_per_host": per_host,
            "at_slow_lane_per_host_s": round(args.slow_delay * deliveries / per_host, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow-hooks", type=int, default=300)
    parser.add_argument("--slow-hosts", type=int, default=60)
    parser.add_argument("--slow-delay", type=float, default=10.0,
                        help="seconds the slow receivers take to answer")
    parser.add_argument("--healthy-hooks", type=int, default=20)
    parser.add_argument("--healthy-hosts", type=int, default=4)
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--rate", type=float, default=2.0, help="updates per second")
    parser.add_argument("--warmup", type=int, default=3,
                        help="updates delivered to the healthy hooks alone before the slow "
                             "hooks exist (the worker has heard from its healthy receivers, "
                             "as in a running portal); 0: none")
    parser.add_argument("--drain-timeout", type=float, default=None,
                        help="seconds to wait for the queue to empty after the last update "
                             "(default: 1.5 times the drain's lower bound, at least 120, + 60; "
                             "deliveries pushed to the 5-minute retry need --drain-timeout 420 "
                             "or more)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra ckanext.webhooks.* settings (e.g. retry_schedule=...)")
    args = parser.parse_args()
    if not (1 <= args.slow_hosts <= 254 and 1 <= args.healthy_hosts <= 254):
        parser.error("--slow-hosts and --healthy-hosts: 1 to 254 (one /24 each)")
    sets = settings(args.set)
    bound = drain_bound(args, sets)
    timeout = args.drain_timeout or max(120.0, 1.5 * bound["lower_bound_s"]) + 60
    print(f"{bound['slow_deliveries']} slow deliveries, at most {bound['concurrent_slow_max']:.0f} "
          f"at once ({bound['worker_processes']} worker processes): the drain takes at least "
          f"{bound['lower_bound_s']} s ({bound['at_slow_lane_per_host_s']} s at "
          f"slow_lane_per_host); waiting at most {timeout:.0f} s", flush=True)

    if other_bench_users():
        print("warning: other sessions are connected to the bench database "
              "(another benchmark running?)", flush=True)
    reset_webhooks()
    slow_hosts = [f"{SLOW_PREFIX}.{n}" for n in range(1, args.slow_hosts + 1)]
    healthy_hosts = [f"{HEALTHY_PREFIX}.{n}" for n in range(1, args.healthy_hosts + 1)]
    control = healthy_hosts[0]
    receiver = start_receiver(RECEIVER_PORT, [
        f"{SLOW_PREFIX}:1-{args.slow_hosts}:{args.slow_delay}",
        f"{HEALTHY_PREFIX}:1-{args.healthy_hosts}:0"])
    # Hooks spread over their hosts in turn; each path names its hook.
    healthy = [f"http://{healthy_hosts[n % len(healthy_hosts)]}:{RECEIVER_PORT}/healthy/{n}"
               for n in range(args.healthy_hooks)]
    slow = [f"http://{slow_hosts[n % len(slow_hosts)]}:{RECEIVER_PORT}/slow/{n}"
            for n in range(args.slow_hooks)]
    overrides = {"ckanext.webhooks.allowed_networks": ALLOWED,
                 **{f"ckanext.webhooks.{k}": v for k, v in sets.items()}}
    try:
        with bench_stack(WEB_PORT, overrides=overrides,
                         worker_name="bench-worker-noisy") as stack:
            admin = ckanapi.RemoteCKAN(stack.url, apikey=sysadmin_token())
            org = admin.action.organization_create(name=f"bench-{uuid.uuid4().hex[:8]}")
            dataset = admin.action.package_create(name=f"bench-{uuid.uuid4().hex[:8]}",
                                                  owner_org=org["id"])
            insert_hooks_at(healthy)
            for n in range(args.warmup):
                admin.action.package_patch(id=dataset["id"], notes=f"warm-up {n}")
            deadline = time.time() + 60
            while args.warmup and time.time() < deadline and receiver_get(
                    RECEIVER_PORT, "/_stats", control)["count"] < args.warmup * len(healthy):
                time.sleep(0.2)
            time.sleep(1)
            receiver_get(RECEIVER_PORT, "/_reset", control, "POST")
            insert_hooks_at(slow)

            started = time.time()
            returned = []
            for n in range(args.updates):
                pause = started + n / args.rate - time.time()
                if pause > 0:
                    time.sleep(pause)
                admin.action.package_patch(id=dataset["id"], notes=f"noisy {n}")
                returned.append(time.time())
            updates_s = time.time() - started
            print(f"{args.updates} updates in {updates_s:.1f} s; waiting for the queue to "
                  "empty", flush=True)

            def progress() -> str:
                got = {(r[1], r[2]) for r in receiver_get(RECEIVER_PORT, "/_receipts", control)
                       ["receipts"] if r[1].startswith("/slow/")}
                return f"{len(got)}/{bound['slow_deliveries']} slow deliveries received"
            drained, waited = wait_drained(RECEIVER_PORT, control, started, args.updates,
                                           timeout, progress)
            data = receiver_get(RECEIVER_PORT, "/_receipts", control)
            events = patient(measured_events, started)
            left = [] if drained else patient(leftovers)
            outcomes = patient(attempt_outcomes, [e for e, _ in events])
            log_counts = worker_log_counts(stack.worker)
    finally:
        receiver.stop()

    result = evaluate(args, bound, events, returned, data, drained, waited, timeout)
    result.update(settings=sets, leftovers=left, attempt_outcomes=outcomes,
                  worker_log=log_counts, updates_seconds=round(updates_s, 2))
    report(result)
    print(f"results: {write_result('noisy_neighbours', result)}")


def evaluate(args, bound: dict, events: list, returned: list[float], data: dict,
             drained: bool, waited: float, timeout: float) -> dict:
    created = dict(events)
    by = receipts_by_delivery(data["receipts"], set(created))
    first = {key: min(times) for key, times in by.items()}

    healthy_ms, per_update = [], defaultdict(float)
    for (_, path, event_id), at in first.items():
        if path.startswith("/healthy/"):
            latency = (at - created[event_id]) * 1000
            healthy_ms.append(latency)
            per_update[event_id] = max(per_update[event_id], latency)
    # The same from the moment each update's API call returned (events in order).
    from_return = []
    if len(events) == len(returned):
        back = {event_id: returned[n] for n, (event_id, _) in enumerate(events)}
        from_return = [(at - back[event_id]) * 1000 for (_, path, event_id), at in first.items()
                       if path.startswith("/healthy/")]

    slow_keys = [key for key in by if key[1].startswith("/slow/")]
    slow_counts = Counter(len(by[key]) for key in slow_keys)
    slow_expected = args.slow_hooks * len(events)
    slow_once = slow_counts.get(1, 0)
    slow_times = [t for key in slow_keys for t in by[key]]
    first_commit = min(created.values()) if created else None
    last_commit = max(created.values()) if created else None
    extra, twice = duplicate_counts(by)
    healthy_extra, _ = duplicate_counts({k: v for k, v in by.items()
                                         if k[1].startswith("/healthy/")})
    healthy_expected = args.healthy_hooks * len(events)
    complete = slow_expected > 0 and len(slow_keys) == slow_expected

    stats = {"n": len(healthy_ms), "expected": healthy_expected,
             "missing": healthy_expected - len(healthy_ms),
             "p50": percentile(healthy_ms, 50), "p95": percentile(healthy_ms, 95),
             "p99": percentile(healthy_ms, 99), "max": max(healthy_ms, default=None)}
    p99_met = stats["missing"] == 0 and len(events) == args.updates and stats["p99"] <= 1000
    return {
        "scenario": {k: getattr(args, k) for k in (
            "slow_hooks", "slow_hosts", "slow_delay", "healthy_hooks", "healthy_hosts",
            "updates", "rate", "warmup")},
        "events": len(events),
        "healthy_latency_ms": {k: rounded(v) for k, v in stats.items()},
        "healthy_latency_from_api_return_ms": {
            "p50": round(percentile(from_return, 50), 1) if from_return else None,
            "p99": round(percentile(from_return, 99), 1) if from_return else None},
        "healthy_max_ms_per_update": [rounded(per_update.get(e)) for e, _ in events],
        "duplicates": {"extra_receipts": extra, "deliveries_received_twice_or_more": twice,
                       "healthy_extra_receipts": healthy_extra,
                       "slow_extra_receipts": extra - healthy_extra},
        "slow": {"expected": slow_expected, "received_exactly_once": slow_once,
                 "received_more_than_once": sum(n for c, n in slow_counts.items() if c > 1),
                 "missing": slow_expected - len(slow_keys),
                 # The drain's duration, once every slow delivery has arrived.
                 "drain_s_from_first_commit": round(max(slow_times) - first_commit, 1)
                 if complete else None,
                 "drain_s_from_last_commit": round(max(slow_times) - last_commit, 1)
                 if complete else None,
                 "last_receipt_s_from_first_commit": round(max(slow_times) - first_commit, 1)
                 if slow_times else None},
        "drain_bound": bound,
        "queue_empty": drained, "waited_s": round(waited, 1), "timeout_s": round(timeout),
        "receiver": {"abandoned_answers": data["abandoned"],
                     "max_inflight_total": data["max_inflight_total"],
                     "max_inflight_one_slow_host": max(
                         (n for a, n in data["max_inflight"].items()
                          if a.startswith(SLOW_PREFIX + ".")), default=0),
                     "max_inflight_one_healthy_host": max(
                         (n for a, n in data["max_inflight"].items()
                          if a.startswith(HEALTHY_PREFIX + ".")), default=0)},
        "targets": {
            "healthy_p99_ms": {"value": rounded(stats["p99"]),
                               "target": "<= 1000", "met": p99_met},
            "duplicates": {"value": extra, "target": "== 0", "met": extra == 0},
            "slow_all_once": {"value": f"{slow_once}/{slow_expected}",
                              "target": "all, exactly once",
                              "met": slow_expected > 0 and slow_once == slow_expected
                              and len(slow_keys) == slow_expected},
        },
    }


def report(result: dict) -> None:
    h, s, d = result["healthy_latency_ms"], result["slow"], result["duplicates"]
    sc = result["scenario"]
    print()
    print(f"{sc['slow_hooks']} slow hooks on {sc['slow_hosts']} hosts answering after "
          f"{sc['slow_delay']:g} s, {sc['healthy_hooks']} healthy hooks on "
          f"{sc['healthy_hosts']} hosts, {result['events']}/{sc['updates']} updates at "
          f"{sc['rate']:g}/s (warm-up: {sc['warmup']})")
    print(table([(f"{h['n']}/{h['expected']}", ms(h["p50"]), ms(h["p95"]), ms(h["p99"]),
                  ms(h["max"]), result["healthy_latency_from_api_return_ms"]["p99"])],
                ("healthy deliveries", "p50 ms", "p95 ms", "p99 ms (target <= 1000)",
                 "max ms", "p99 ms from API return")))
    print()
    drain = (s["drain_s_from_first_commit"], s["drain_s_from_last_commit"]) \
        if s["drain_s_from_first_commit"] is not None else \
        (f"not drained (last receipt at {s['last_receipt_s_from_first_commit']})", "-")
    print(table([(s["expected"], s["received_exactly_once"], s["received_more_than_once"],
                  s["missing"], *drain, result["drain_bound"]["lower_bound_s"])],
                ("slow deliveries", "exactly once", "more than once", "missing",
                 "drain s (1st commit->last receipt)", "from last commit", "lower bound s")))
    print()
    print(table([(d["extra_receipts"], d["deliveries_received_twice_or_more"],
                  d["healthy_extra_receipts"], d["slow_extra_receipts"],
                  result["receiver"]["abandoned_answers"])],
                ("duplicate receipts (target 0)", "deliveries duplicated", "healthy",
                 "slow", "answers abandoned by the sender")))
    print(f"queue empty: {result['queue_empty']} after {result['waited_s']} s "
          f"(timeout {result['timeout_s']} s); receiver held at most "
          f"{result['receiver']['max_inflight_total']} requests at once, "
          f"{result['receiver']['max_inflight_one_slow_host']} for one slow host; "
          f"worker log: {result['worker_log']}")
    print("healthy max per update (ms):", result["healthy_max_ms_per_update"])
    print()
    print_outcomes(result["attempt_outcomes"])
    print_leftovers(result["leftovers"])
    print()
    for name, t in result["targets"].items():
        print(f"{name}: {t['value']} (target {t['target']}): {'met' if t['met'] else 'NOT MET'}")


if __name__ == "__main__":
    main()
