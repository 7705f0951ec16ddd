"""The 10,000-hook fan-out, commit to last receipt, with the worker sending
through the hand-written httptools sender or through aiohttp
(``bench/aiohttp_sender.py``, swapped in by ``bench/sender_worker.py``
without changing the extension), in alternating rounds, in the same run.

Runs on a stack of its own beside whatever else runs on the machine: its own
database (``ckanext_webhooks_bench_senders``, created with ``scripts/stack
db``), Redis database 15, queue, CKAN port 15190, Solr stand-in port 18980
and receiver port 18190 on 127.0.0.2. Each round and receiver, each sender:
a worker started in the default setup (a process per core), one fan-out to
warm it up, one measured; then it is stopped. Beside it, wrk's raw
keep-alive rate to the same receiver.

    python bench/fanout_senders.py [--hooks 10000] [--rounds 3] [--gates]

Needs aiohttp (``pip install aiohttp``), which the extension itself does not use.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import benchlib
import ckanapi
import sqlalchemy as sa
from benchlib import (
    BENCH_INI,
    RECEIVER_HOST,
    ROOT,
    cpu_seconds,
    insert_hooks,
    processes,
    receiver_call,
    sql,
    start_receiver,
    table,
    write_result,
)

DB = "ckanext_webhooks_bench_senders"
WEB_PORT, SOLR_PORT, RECEIVER_PORT = 15190, 18980, 18190
benchlib.DB_URL = f"postgresql://ckan_webhooks:ckan_webhooks@127.0.0.1:5432/{DB}"
OVERRIDES = {
    "sqlalchemy.url": benchlib.DB_URL,
    "ckan.redis.url": "redis://127.0.0.1:6379/15",
    "ckan.site_url": f"http://127.0.0.1:{WEB_PORT}",
    "solr_url": f"http://127.0.0.1:{SOLR_PORT}/solr/ckan",
    "ckanext.webhooks.celery.queue": "ckanext_webhooks_bench_senders",
}


def prepare_database(ini: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "stack"), "db"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL,
                   env=dict(os.environ, DATABASES_OVERRIDE=DB, INIS_OVERRIDE=str(ini),
                            SOLR_PORT=str(SOLR_PORT)))


def sysadmin_token(ini: Path) -> str:
    def ckan(*args, check=True):
        return subprocess.run([benchlib.CKAN, "-c", str(ini), *args], capture_output=True,
                              text=True, check=check)
    if "name=bench-admin" not in ckan("user", "show", "bench-admin", check=False).stdout:
        ckan("user", "add", "bench-admin", "email=bench@localhost.invalid",
             "password=bench-admin-password")
        ckan("sysadmin", "add", "bench-admin")
    for attempt in range(3):  # a busy machine: CKAN's start-up can fail once
        made = ckan("user", "token", "add", "bench-admin", f"bench-{uuid.uuid4().hex[:6]}",
                    check=False)
        if made.returncode == 0:
            return made.stdout.strip().splitlines()[-1].strip()
        time.sleep(2)
    raise RuntimeError(f"no API token: {made.stderr[-2000:]}")


def start_worker(ini: Path, sender: str) -> processes.Process:
    proc = processes.Process(
        f"bench-worker-{sender.replace('+', '-')}",
        [sys.executable, str(ROOT / "bench" / "sender_worker.py"), "-c", str(ini),
         "webhooks", "worker", "--loglevel=INFO"],
        env={"WEBHOOKS_BENCH_SENDER": sender})
    deadline = time.monotonic() + 90
    while "worker ready" not in proc.output():
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"worker did not start:\n{proc.output()[-3000:]}")
        time.sleep(0.2)
    return proc


def tree_cpu(pid: int) -> float:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, check=False,
                              text=True).stdout.split()
    return sum(cpu_seconds(p) for p in [pid, *map(int, children)])


def _settled(timeout: float = 180) -> None:
    """No delivery left in the table (all delivered or given up): nothing of a
    previous fan-out can arrive during the next one."""
    deadline = time.time() + timeout
    while sql("SELECT count(*) FROM webhooks_delivery")[0][0]:
        if time.time() > deadline:
            raise RuntimeError("deliveries still pending")
        time.sleep(0.2)


def _postgres_started() -> float:
    return float(sql("SELECT extract(epoch from pg_postmaster_start_time())")[0][0])


class Disturbed(RuntimeError):
    """Something outside the benchmark (PostgreSQL restarted by another
    engineer's fault tests) spoiled a fan-out: it is measured again."""


def fanout(admin, dataset_id: str, hooks: int, worker) -> dict:
    _settled()
    receiver_call(RECEIVER_PORT, "/_reset", "POST")
    postgres = _postgres_started()
    cpu = tree_cpu(worker.proc.pid)
    admin.action.package_patch(id=dataset_id, notes=f"fan-out {uuid.uuid4().hex}")
    deadline = time.time() + max(120, hooks / 50)
    while True:
        stats = receiver_call(RECEIVER_PORT, "/_stats")
        if stats["paths"] >= hooks or time.time() > deadline:
            break
        time.sleep(0.05)
    cpu = tree_cpu(worker.proc.pid) - cpu
    [(created,)] = sql("SELECT extract(epoch from created) FROM webhooks_event "
                       "WHERE topic = 'dataset/update' ORDER BY created DESC LIMIT 1")
    if _postgres_started() != postgres:
        raise Disturbed("PostgreSQL restarted during the fan-out")
    if stats["count"] != hooks or stats["paths"] != hooks:
        raise Disturbed(f"fan-out incomplete or repeated: {stats}")
    elapsed = stats["last"] - float(created)
    return {"hooks": hooks, "received": stats["count"], "distinct_paths": stats["paths"],
            "seconds": round(elapsed, 3), "deliveries_per_s": round(stats["count"] / elapsed, 1),
            "worker_cpu_ms_per_delivery": round(cpu / hooks * 1e3, 3)}


def measured(admin, dataset_id: str, hooks: int, worker, tries: int = 3) -> dict:
    for attempt in range(tries):
        try:
            result = fanout(admin, dataset_id, hooks, worker)
            result["disturbed_tries"] = attempt
            return result
        except (Disturbed, sa.exc.OperationalError) as disturbed:
            print(f"  measured again: {disturbed}", flush=True)
            time.sleep(5)
            try:
                _settled()
            except (RuntimeError, sa.exc.OperationalError):
                sql("DELETE FROM webhooks_delivery")
    raise RuntimeError("disturbed every time")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hooks", type=int, default=10000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gates", action="store_true", help="also aiohttp+gates")
    parser.add_argument("--receivers", default="stdlib,asyncio")
    args = parser.parse_args()
    from sender_compare import spread, wrk  # needs aiohttp: only this comparison does
    senders = ["httptools", "aiohttp"] + (["aiohttp+gates"] if args.gates else [])
    impls = [x for x in args.receivers.split(",") if x]
    ini = processes.write_ini(OVERRIDES, base=BENCH_INI)
    started: list = []
    results: dict = {impl: [] for impl in impls}
    try:
        prepare_database(ini)
        sql("TRUNCATE webhooks_attempt, webhooks_delivery, webhooks_rendering, webhooks_event, "
            "webhooks")
        import redis
        redis.Redis.from_url(OVERRIDES["ckan.redis.url"]).flushdb()
        started.append(processes.start_solr_standin(SOLR_PORT))
        started.append(processes.start_ckan(ini, WEB_PORT))
        admin = ckanapi.RemoteCKAN(f"http://127.0.0.1:{WEB_PORT}", apikey=sysadmin_token(ini))
        org = admin.action.organization_create(name=f"bench-{uuid.uuid4().hex[:8]}")
        dataset = admin.action.package_create(name=f"bench-{uuid.uuid4().hex[:8]}",
                                              owner_org=org["id"], notes="x" * 200,
                                              resources=[{"url": "http://data.invalid/a.csv"}])
        body = json.dumps({"webhook_id": "x" * 43, "event_id": "msg_" + "0" * 32,
                           "topic": "dataset/update", "timestamp": "2026-01-01T00:00:00Z",
                           "site_url": "http://127.0.0.1", "schema_version": "1",
                           "data": admin.action.package_show(id=dataset["id"])}).encode()
        insert_hooks(args.hooks, "dataset/update", f"http://{RECEIVER_HOST}:{RECEIVER_PORT}/h/")
        for r in range(args.rounds):
            order = senders[r % len(senders):] + senders[:r % len(senders)]
            for impl in impls:
                receiver = start_receiver(RECEIVER_PORT, impl)
                try:
                    row: dict = {"round": r + 1, "order": order}
                    for name in order:
                        worker = start_worker(ini, name)
                        try:
                            measured(admin, dataset["id"], args.hooks, worker)  # warm-up
                            row[name] = measured(admin, dataset["id"], args.hooks, worker)
                            said = [line for line in worker.output().splitlines()
                                    if "webhooks-bench:" in line]
                            if not said or not all(f"sends with {name}" in x for x in said):
                                raise RuntimeError(f"worker used another sender: {said}")
                            row[name]["worker_processes_reporting"] = len(said)
                        finally:
                            worker.stop()
                    receiver_call(RECEIVER_PORT, "/_reset", "POST")
                    row["wrk"] = wrk(RECEIVER_PORT, body, seconds=5)
                finally:
                    receiver.stop()
                row["ratios"] = {f"httptools/{n}": round(
                    row["httptools"]["deliveries_per_s"] / row[n]["deliveries_per_s"], 3)
                    for n in senders[1:]}
                results[impl].append(row)
                print(impl, json.dumps(row), flush=True)
    finally:
        for proc in reversed(started):
            if proc is not None:
                proc.stop()
        ini.unlink()

    rows, summary = [], {}
    for impl, runs in results.items():
        summary[impl] = {n: spread([x[n]["deliveries_per_s"] for x in runs]) for n in senders}
        summary[impl]["wrk"] = spread([x["wrk"]["per_s"] for x in runs])
        summary[impl]["cpu_ms"] = {n: spread([x[n]["worker_cpu_ms_per_delivery"] for x in runs])
                                   for n in senders}
        summary[impl]["ratios"] = {k: spread([x["ratios"][k] for x in runs])
                                   for k in runs[0]["ratios"]}
        for n in senders:
            s, c = summary[impl][n], summary[impl]["cpu_ms"][n]
            rows.append((impl, n, s["median"], f"{s['min']}–{s['max']}", c["median"]))
        s = summary[impl]["wrk"]
        rows.append((impl, "wrk (raw)", s["median"], f"{s['min']}–{s['max']}", ""))
    print()
    print(table(rows, ("receiver", "sender", f"fan-out deliveries/s ({args.hooks} hooks)",
                       "range", "worker CPU ms/delivery")))
    print()
    print(table([(impl, k, v["median"], f"{v['min']}–{v['max']}", " ".join(map(str, v["all"])))
                 for impl in summary for k, v in summary[impl]["ratios"].items()],
                ("receiver", "ratio (end to end)", "median", "range", "per round")))
    import aiohttp
    path = write_result("fanout_senders", {"aiohttp": aiohttp.__version__, "hooks": args.hooks,
                                           "rounds": results, "summary": summary})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
