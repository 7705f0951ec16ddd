"""Push versus poll: what a consumer pays to learn of dataset changes.

The same stream of updates (random gaps) to a portal of N datasets is
observed two ways at once:

* poll: every 10 s, the activity stream of recently changed datasets
  (``recently_changed_packages_activity_list``, which CKAN serves from the
  database; in CKAN 2.12 ``current_package_list_with_resources`` is a
  ``package_search`` and needs a real Solr, which the stand-in is not), and a
  change is noticed when a new activity names its dataset;
* push: a webhook on dataset/update, delivered to a receiver.

For each: requests made, bytes transferred, mean delay to notice a change.

    python bench/push_vs_poll.py [--datasets 50] [--updates 12] [--interval 10]
"""
from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import threading
import time
import uuid

import ckanapi
import requests

from benchlib import (RECEIVER_HOST, bench_stack, ini_with, insert_hooks, processes,
                      receiver_call, reset_webhooks, sql, sysadmin_token, table, wait_count,
                      write_result)

WEB_PORT, RECEIVER_PORT = 15105, 18105


class Poller(threading.Thread):
    def __init__(self, url: str, interval: float, limit: int) -> None:
        super().__init__(daemon=True)
        self.url, self.interval, self.limit = url, interval, limit
        self.requests = self.bytes = 0
        self.seen: dict[str, str] = {}
        self.noticed: list[tuple[str, float]] = []  # (dataset id, when noticed)
        self.stop = threading.Event()

    def poll(self) -> None:
        response = requests.post(
            f"{self.url}/api/3/action/recently_changed_packages_activity_list",
            json={"limit": self.limit}, timeout=30)
        self.requests += 1
        self.bytes += len(response.content) + sum(len(k) + len(v) + 4
                                                  for k, v in response.headers.items())
        now = time.time()
        for activity in response.json()["result"]:
            if activity["id"] not in self.seen:
                if self.seen.get("_started"):
                    self.noticed.append((activity["object_id"], now))
                self.seen[activity["id"]] = activity["timestamp"]
        self.seen["_started"] = "yes"

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.poll()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=int, default=50)
    parser.add_argument("--updates", type=int, default=12)
    parser.add_argument("--interval", type=float, default=10.0, help="poll period (s)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)

    reset_webhooks()
    overrides = {"ckan.plugins": "activity webhooks"}
    activity_ini = ini_with(overrides)
    subprocess.run([str(processes.BIN / "ckan"), "-c", str(activity_ini), "db", "upgrade", "-p",
                    "activity"], check=True, capture_output=True)
    activity_ini.unlink()
    with bench_stack(WEB_PORT, RECEIVER_PORT, overrides, "bench-worker-poll") as stack:
        admin = ckanapi.RemoteCKAN(stack.url, apikey=sysadmin_token())
        org = admin.action.organization_create(name=f"bench-{uuid.uuid4().hex[:8]}")
        datasets = [admin.action.package_create(
            name=f"bench-{uuid.uuid4().hex[:8]}", owner_org=org["id"], notes="x" * 300,
            resources=[{"url": f"http://data.invalid/{n}.csv"}])["id"]
            for n in range(args.datasets)]
        insert_hooks(1, "dataset/update", f"http://{RECEIVER_HOST}:{RECEIVER_PORT}/push/")
        receiver_call(RECEIVER_PORT, "/_reset", "POST")
        poller = Poller(stack.url, args.interval, limit=31)
        poller.poll()  # the consumer's starting point
        poller.requests = poller.bytes = 0
        poller.start()
        changes: list[tuple[str, float]] = []
        for n in range(args.updates):
            time.sleep(rng.uniform(0.3, 1.7) * args.interval / 2)
            dataset_id = rng.choice(datasets)
            admin.action.package_patch(id=dataset_id, notes=f"change {n}")
            changes.append((dataset_id, time.time()))
        time.sleep(args.interval + 1)  # the last change has been polled
        poller.stop.set()
        stats = wait_count(RECEIVER_PORT, args.updates, 30)
        times = receiver_call(RECEIVER_PORT, "/_times")
        created = dict(sql("SELECT id, extract(epoch from created)::float8 FROM webhooks_event "
                           "WHERE topic = 'dataset/update'"))

    push_delays = [receipts[0] - created[event_id] for event_id, receipts in times.items()
                   if event_id in created]
    # Each change is noticed by the first poll after it that saw its dataset move.
    poll_delays = []
    for dataset_id, when in changes:
        later = [t for d, t in poller.noticed if d == dataset_id and t >= when]
        if later:
            poll_delays.append(min(later) - when)
    missed = len(changes) - len(poll_delays)
    push = {"requests": stats["count"], "bytes": stats["bytes"],
            "mean_delay_s": statistics.fmean(push_delays), "changes_seen": len(push_delays)}
    poll = {"requests": poller.requests, "bytes": poller.bytes,
            "mean_delay_s": statistics.fmean(poll_delays) if poll_delays else None,
            "changes_seen": len(poll_delays), "changes_missed_or_merged": missed}
    print(table([("poll every %gs" % args.interval, poll["requests"], poll["bytes"],
                  f"{poll['mean_delay_s']:.2f}", poll["changes_seen"]),
                 ("webhook", push["requests"], push["bytes"], f"{push['mean_delay_s']:.3f}",
                  push["changes_seen"])],
                ("consumer", "requests", "bytes", "mean delay to notice (s)", "changes seen")))
    print(f"{len(changes)} changes over {changes[-1][1] - changes[0][1]:.0f} s to "
          f"{args.datasets} datasets; polling sent {poll['bytes'] / max(1, push['bytes']):.0f}x "
          f"the bytes and noticed {poll['mean_delay_s'] / push['mean_delay_s']:.0f}x later")
    path = write_result("push_vs_poll", {"poll": poll, "push": push, "changes": len(changes),
                                         "datasets": args.datasets, "interval_s": args.interval})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
