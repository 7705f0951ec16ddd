"""Scaling out: the 10,000-hook fan-out, commit to last receipt, with 1, 2
and 4 worker processes, in alternating rounds in the same run: deliveries/s
and the workers' CPU per delivery.

Two shapes: ``processes`` (one worker with ``--concurrency N``: Celery's
prefork pool) and ``workers`` (N workers of one process each, as N machines
would run them: each its own listener candidate, heartbeat and connections).
Runs on a stack of its own (database ``ckanext_webhooks_bench_workers``,
Redis database 14, its own queue and ports), beside whatever else runs;
receivers on 127.0.0.2 (the asyncio receiver, so the workers are what is
measured). On a 2-core machine, 4 processes contend for the cores: the
figures show what more processes buy there, not on a larger machine.

    python bench/workers.py [--hooks 10000] [--rounds 2] [--counts 1,2,4]
"""
from __future__ import annotations

import argparse
import time
import uuid

import ckanapi

import benchlib
from benchlib import RECEIVER_HOST, insert_hooks, processes, sql, start_receiver, table
import fanout_senders
from fanout_senders import measured, prepare_database, sysadmin_token, tree_cpu

DB = "ckanext_webhooks_bench_workers"
WEB_PORT, SOLR_PORT, RECEIVER_PORT = 15195, 18981, 18195
benchlib.DB_URL = f"postgresql://ckan_webhooks:ckan_webhooks@127.0.0.1:5432/{DB}"
fanout_senders.RECEIVER_PORT = RECEIVER_PORT
fanout_senders.DB, fanout_senders.SOLR_PORT = DB, SOLR_PORT  # its prepare_database's
OVERRIDES = {
    "sqlalchemy.url": benchlib.DB_URL,
    "ckan.redis.url": "redis://127.0.0.1:6379/1",
    "ckan.site_url": f"http://127.0.0.1:{WEB_PORT}",
    "solr_url": f"http://127.0.0.1:{SOLR_PORT}/solr/ckan",
    "ckanext.webhooks.celery.queue": "ckanext_webhooks_bench_workers",
}


class Group:
    """Worker processes started together; CPU summed over their trees."""

    def __init__(self, ini, shape: str, count: int) -> None:
        if shape == "processes":
            self.procs = [processes.start_worker(ini, concurrency=count, name="bench-w")]
        else:
            self.procs = [processes.start_worker(ini, concurrency=1, name=f"bench-w{n}",
                                                 extra=("--no-beat",) if n else ())
                          for n in range(count)]

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hooks", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--shapes", default="processes,workers")
    args = parser.parse_args()
    counts = [int(x) for x in args.counts.split(",")]
    shapes = [x for x in args.shapes.split(",") if x]
    ini = processes.write_ini(OVERRIDES, base=benchlib.BENCH_INI)
    started: list = []
    runs: list[dict] = []
    try:
        prepare_database(ini)
        sql("TRUNCATE webhooks_attempt, webhooks_delivery, webhooks_rendering, webhooks_event, "
            "webhooks")
        started.append(processes.start_solr_standin(SOLR_PORT))
        started.append(processes.start_ckan(ini, WEB_PORT))
        started.append(start_receiver(RECEIVER_PORT, "asyncio"))
        admin = ckanapi.RemoteCKAN(f"http://127.0.0.1:{WEB_PORT}", apikey=sysadmin_token(ini))
        org = admin.action.organization_create(name=f"bench-{uuid.uuid4().hex[:8]}")
        dataset = admin.action.package_create(name=f"bench-{uuid.uuid4().hex[:8]}",
                                              owner_org=org["id"], notes="x" * 200)
        insert_hooks(args.hooks, "dataset/update", f"http://{RECEIVER_HOST}:{RECEIVER_PORT}/h/")
        plan = [(shape, count) for shape in shapes for count in counts]
        for r in range(args.rounds):
            order = plan[r % len(plan):] + plan[:r % len(plan)]
            for shape, count in order:
                group = Group(ini, shape, count)
                try:
                    # fanout_senders measures CPU of one tree: sum ours instead.
                    cpu = sum(tree_cpu(p.proc.pid) for p in group.procs)
                    measured(admin, dataset["id"], args.hooks, group.procs[0])  # warm up
                    cpu_warm = sum(tree_cpu(p.proc.pid) for p in group.procs)
                    result = measured(admin, dataset["id"], args.hooks, group.procs[0])
                    cpu = sum(tree_cpu(p.proc.pid) for p in group.procs) - cpu_warm
                    result.update(round=r + 1, shape=shape, processes=count,
                                  worker_cpu_ms_per_delivery=round(cpu / args.hooks * 1e3, 3))
                    runs.append(result)
                    print(f"round {r + 1} {shape:9} x{count}: {result['deliveries_per_s']:8.0f}"
                          f"/s, {result['worker_cpu_ms_per_delivery']:.3f} ms CPU/delivery",
                          flush=True)
                finally:
                    group.stop()
                time.sleep(1)
    finally:
        for proc in reversed(started):
            proc.stop()
        ini.unlink()
    rows = []
    for shape, count in [(s, c) for s in shapes for c in counts]:
        mine = [x for x in runs if x["shape"] == shape and x["processes"] == count]
        rates = sorted(x["deliveries_per_s"] for x in mine)
        cpus = sorted(x["worker_cpu_ms_per_delivery"] for x in mine)
        rows.append((shape, count, f"{rates[len(rates) // 2]:.0f}",
                     f"{rates[0]:.0f}-{rates[-1]:.0f}", f"{cpus[len(cpus) // 2]:.3f}"))
    print(table(rows, ("shape", "processes", "deliveries/s (median)", "range",
                       "CPU ms/delivery")))
    print(f"results: {benchlib.write_result('workers', {'hooks': args.hooks, 'runs': runs})}")


if __name__ == "__main__":
    main()
