"""Write overhead: latency of package_update through the HTTP action API with
the extension enabled and N hooks registered (half subscribed to
dataset/update), against the same CKAN with the extension disabled. Both
servers run side by side on the same database and the calls alternate
between them (which goes first alternates too), so noise hits both alike. No
worker runs: the write path is what is measured (deliveries are not).

The calls are split over several rounds, each with both servers started
afresh: a process can be a few per cent faster or slower than its twin for
reasons of its own (hash seeds, memory layout, which core it lands on), and
on this machine that bias, not the extension, decided single runs.

    python bench/write_overhead.py [--calls 1000] [--rounds 4] [--sizes 10000,100000]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import uuid

import ckanapi

from benchlib import (SOLR_PORT, cpu_seconds, ini_with, insert_hooks, processes, reset_webhooks,
                      summary, sysadmin_token, table, write_result)

WITH_PORT, WITHOUT_PORT = 15101, 15102


def measure(clients: dict, dataset_id: str, calls: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in clients}
    for n in range(calls):
        order = list(clients.items()) if n % 2 == 0 else list(clients.items())[::-1]
        for name, client in order:
            started = time.perf_counter()
            client.action.package_patch(id=dataset_id, notes=f"update {n} {name}")
            times[name].append((time.perf_counter() - started) * 1000)
    return times


@contextlib.contextmanager
def servers(with_ini, without_ini):
    """Both CKAN servers, started afresh; stopped afterwards."""
    started = []
    try:
        started.append(processes.start_ckan(with_ini, WITH_PORT))
        started.append(processes.start_ckan(without_ini, WITHOUT_PORT))
        token = sysadmin_token()
        clients = {name: ckanapi.RemoteCKAN(f"http://127.0.0.1:{port}", apikey=token)
                   for name, port in (("with", WITH_PORT), ("without", WITHOUT_PORT))}
        yield clients, dict(zip(clients, (server.proc.pid for server in started)))
    finally:
        for server in started:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]

    reset_webhooks()
    with_ini = ini_with({"ckan.site_url": f"http://127.0.0.1:{WITH_PORT}"})
    without_ini = ini_with({"ckan.site_url": f"http://127.0.0.1:{WITHOUT_PORT}",
                            "ckan.plugins": ""})
    solr = processes.start_solr_standin(SOLR_PORT)
    rows, results = [], []
    try:
        with servers(with_ini, without_ini) as (clients, _):
            admin = clients["with"]
            org = admin.action.organization_create(name=f"bench-{uuid.uuid4().hex[:8]}")
            dataset = admin.action.package_create(
                name=f"bench-{uuid.uuid4().hex[:8]}", owner_org=org["id"], notes="x" * 500,
                resources=[{"url": f"http://data.invalid/{n}.csv"} for n in range(3)])
        done = 0
        for size in sizes:
            half = size // 2
            insert_hooks(half - done // 2, "dataset/update",
                         "http://127.0.0.2:9/u/", start=done // 2)
            insert_hooks(half - done // 2, "resource/update",
                         "http://127.0.0.2:9/r/", start=done // 2)
            done = size
            times: dict[str, list[float]] = {"with": [], "without": []}
            round_ratios, cpu = [], {"with": 0.0, "without": 0.0}
            for _ in range(args.rounds):
                with servers(with_ini, without_ini) as (clients, pids):
                    measure(clients, dataset["id"], 20)  # warm up both servers
                    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    this = measure(clients, dataset["id"], args.calls // args.rounds)
                    for name, pid in pids.items():
                        cpu[name] += cpu_seconds(pid) - before[name]
                round_ratios.append(round(statistics.median(this["with"])
                                          / statistics.median(this["without"]), 3))
                for name in times:
                    times[name] += this[name]
            with_s, without_s = summary(times["with"]), summary(times["without"])
            ratio = with_s["median"] / without_s["median"]
            paired = statistics.median(a - b for a, b in zip(times["with"], times["without"]))
            result = {"hooks": size, "calls": len(times["with"]), "rounds": args.rounds,
                      "with_ms": with_s, "without_ms": without_s,
                      "median_ratio": round(ratio, 3),
                      "p95_ratio": round(with_s["p95"] / without_s["p95"], 3),
                      "round_ratios": round_ratios,
                      "paired_difference_ms_median": round(paired, 2),
                      # CPU of each server process: steadier than latency on a busy machine.
                      "server_cpu_ms_per_call": {
                          name: round(used / len(times[name]) * 1000, 2)
                          for name, used in cpu.items()}}
            results.append(result)
            rows.append((size, len(times["with"]), f"{without_s['median']:.1f}",
                         f"{with_s['median']:.1f}", f"{ratio:.3f}",
                         " ".join(f"{r:.3f}" for r in round_ratios), f"{paired:+.2f}",
                         "{with} / {without}".format(**result["server_cpu_ms_per_call"]),
                         f"{without_s['p95']:.1f}", f"{with_s['p95']:.1f}"))
            print(rows[-1], flush=True)
    finally:
        if solr:
            solr.stop()
        with_ini.unlink()
        without_ini.unlink()
    print()
    print(table(rows, ("hooks", "calls", "median without (ms)", "median with (ms)",
                       "ratio (target <= 1.05)", "ratio per round", "paired diff (ms)",
                       "server CPU ms/call with / without",
                       "p95 without", "p95 with")))
    print(f"results: {write_result('write_overhead', {'runs': results})}")


if __name__ == "__main__":
    main()
