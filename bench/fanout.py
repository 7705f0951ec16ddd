"""Fan-out throughput: one dataset/update to N subscribed hooks (distinct
paths on one receiver on 127.0.0.2), from the commit to the last receipt, with
the default worker setup; beside it, in the same run, the raw rate at which wrk
(keep-alive) POSTs the same payload to the same receiver. Also the scaling
curve: throughput and worker memory at several hook counts.

    python bench/fanout.py [--hooks 10000] [--curve 100,1000,10000,100000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
import uuid

import ckanapi

from benchlib import (RECEIVER_HOST, SOLR_PORT, ini_with, insert_hooks, processes, receiver_call,
                    reset_webhooks, rss_of_tree, start_receiver, sql, sysadmin_token, table,
                    wait_count, write_result)

WEB_PORT = 15100
RECEIVER_PORT = 18100


def wrk_rate(body: bytes, seconds: int = 10, connections: int = 64) -> float:
    """Requests/s wrk achieves POSTing ``body`` with keep-alive to the receiver."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            'wrk.headers["Content-Type"] = "application/json"\n'
            f"wrk.body = {json.dumps(body.decode())}\n"
            "local n = 0\n"
            "request = function()\n  n = n + 1\n"
            '  return wrk.format(nil, "/raw/" .. n)\nend\n')
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", script.name,
                          f"http://{RECEIVER_HOST}:{RECEIVER_PORT}/"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(out)


class MemorySampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, rss_of_tree(self.pid))
            time.sleep(0.1)


def one_fanout(admin, dataset_id: str, hooks: int, worker) -> dict:
    """One package_update fanned out to ``hooks`` hooks, commit to last receipt."""
    receiver_call(RECEIVER_PORT, "/_reset", "POST")
    sampler = MemorySampler(worker.proc.pid)
    sampler.start()
    before = rss_of_tree(worker.proc.pid)
    admin.action.package_patch(id=dataset_id, notes=f"fan-out {uuid.uuid4().hex}")
    stats = wait_count(RECEIVER_PORT, hooks, timeout=max(60, hooks / 200))
    time.sleep(0.2)
    sampler.running = False
    [(created,)] = sql("SELECT extract(epoch from created) FROM webhooks_event "
                       "WHERE topic = 'dataset/update' ORDER BY created DESC LIMIT 1")
    elapsed = stats["last"] - float(created)
    return {"hooks": hooks, "received": stats["count"], "distinct_paths": stats["paths"],
            "first_receipt_s": round(stats["first"] - float(created), 3),
            "seconds": round(elapsed, 3), "deliveries_per_s": round(stats["count"] / elapsed, 1),
            # From the first receipt on: the sending alone, without the fan-out
            # (rendering, queueing every delivery durably) that comes before it.
            "sending_per_s": round(stats["count"] / max(stats["last"] - stats["first"], 1e-6), 1),
            "worker_rss_mb_before": round(before / 2**20, 1),
            "worker_rss_mb_peak": round(sampler.peak / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hooks", type=int, default=10000)
    parser.add_argument("--curve", default="100,1000,10000,100000")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra ckanext.webhooks.* settings for the worker")
    args = parser.parse_args()
    curve = sorted({int(x) for x in args.curve.split(",") if x} | {args.hooks})
    ini = ini_with({f"ckanext.webhooks.{k}": v for k, v in (x.split("=", 1) for x in args.set)})
    receivers = {
        # A consumer's typical small receiver: the standard library's threaded
        # server, parsing each JSON body. The targets are judged against it.
        "stdlib": {"curve": curve},
        # A best case no real consumer reaches (an asyncio counter).
        "asyncio": {"curve": [args.hooks]},
    }
    reset_webhooks()  # no events left over by another benchmark
    solr = processes.start_solr_standin(SOLR_PORT)
    web = processes.start_ckan(ini, WEB_PORT)
    worker = processes.start_worker(ini, concurrency=None, name="bench-worker")
    results = {}
    try:
        admin = ckanapi.RemoteCKAN(f"http://127.0.0.1:{WEB_PORT}", apikey=sysadmin_token())
        org = admin.action.organization_create(name=f"bench-{uuid.uuid4().hex[:8]}")
        dataset = admin.action.package_create(name=f"bench-{uuid.uuid4().hex[:8]}",
                                              owner_org=org["id"], notes="x" * 200,
                                              resources=[{"url": "http://data.invalid/a.csv"}])
        body = json.dumps({"webhook_id": "x" * 43, "event_id": "msg_" + "0" * 32,
                           "topic": "dataset/update", "timestamp": "2026-01-01T00:00:00Z",
                           "site_url": "http://127.0.0.1", "schema_version": "1",
                           "data": admin.action.package_show(id=dataset["id"])}).encode()
        for impl, plan in receivers.items():
            sql("TRUNCATE webhooks_attempt, webhooks_delivery, webhooks")
            receiver = start_receiver(RECEIVER_PORT, impl)
            try:
                runs, done = [], 0
                for hooks in plan["curve"]:
                    insert_hooks(hooks - done, "dataset/update",
                                 f"http://{RECEIVER_HOST}:{RECEIVER_PORT}/h/", start=done)
                    done = hooks
                    runs.append(one_fanout(admin, dataset["id"], hooks, worker))
                    print(impl, json.dumps(runs[-1]), flush=True)
                receiver_call(RECEIVER_PORT, "/_reset", "POST")
                raw = wrk_rate(body)
            finally:
                receiver.stop()
            main_run = next(r for r in runs if r["hooks"] == args.hooks)
            results[impl] = {"runs": runs, "raw_wrk_rate": round(raw, 1), "main": main_run,
                             "ratio_to_raw": round(main_run["deliveries_per_s"] / raw, 3),
                             "sending_ratio_to_raw": round(main_run["sending_per_s"] / raw, 3)}
    finally:
        worker.stop()
        web.stop()
        if solr:
            solr.stop()
        ini.unlink()

    print()
    stdlib = results["stdlib"]
    print(table([(r["hooks"], r["received"], r["seconds"], r["deliveries_per_s"],
                  r["worker_rss_mb_peak"]) for r in stdlib["runs"]],
                ("hooks", "received", "commit->last (s)", "deliveries/s", "worker RSS peak MB")))
    print()
    print(table([(impl, r["main"]["hooks"], r["main"]["deliveries_per_s"], r["raw_wrk_rate"],
                  f"{r['ratio_to_raw']:.0%}", r["main"]["first_receipt_s"],
                  f"{r['sending_ratio_to_raw']:.0%}") for impl, r in results.items()],
                ("receiver", "hooks", "fan-out deliveries/s", "wrk raw req/s",
                 "fan-out / raw (target >= 50%)", "first receipt (s)",
                 "from first receipt / raw")))
    print("targets: >= 2000 deliveries/s, and >= 50% of the raw rate (judged with the "
          "stdlib receiver)")
    path = write_result("fanout", {"receivers": results, "payload_bytes": len(body),
                                   "settings": args.set})
    plot(stdlib["runs"], path.with_suffix(".png"))
    print(f"results: {path}")


def plot(runs: list[dict], path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    hooks = [r["hooks"] for r in runs]
    fig, left = plt.subplots(figsize=(7, 4))
    left.plot(hooks, [r["deliveries_per_s"] for r in runs], "o-", color="tab:blue")
    left.set_xscale("log")
    left.set_xlabel("subscribed hooks")
    left.set_ylabel("deliveries/s", color="tab:blue")
    right = left.twinx()
    right.plot(hooks, [r["worker_rss_mb_peak"] for r in runs], "s--", color="tab:red")
    right.set_ylabel("worker RSS peak (MB)", color="tab:red")
    right.set_ylim(bottom=0)
    left.set_ylim(bottom=0)
    left.set_title("ckanext-webhooks fan-out: throughput and worker memory")
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
