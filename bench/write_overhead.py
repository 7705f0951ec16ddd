"""Write overhead: latency of package_update through the HTTP action API with
the extension enabled and N hooks registered (half subscribed to
dataset/update), against the same CKAN with the extension disabled. Both
servers run side by side on the same database and the calls alternate
between them, so noise hits both alike. No worker runs: the write path is
what is measured (deliveries are not).

    python bench/write_overhead.py [--calls 300] [--sizes 10000,100000]
"""
from __future__ import annotations

import argparse
import time
import uuid

import ckanapi

from benchlib import (ini_with, insert_hooks, processes, reset_webhooks, summary, sysadmin_token,
                      table, write_result)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--sizes", default="10000,100000")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]

    reset_webhooks()
    with_ini = ini_with({"ckan.site_url": f"http://127.0.0.1:{WITH_PORT}"})
    without_ini = ini_with({"ckan.site_url": f"http://127.0.0.1:{WITHOUT_PORT}",
                            "ckan.plugins": ""})
    solr = processes.start_solr_standin()
    servers = [processes.start_ckan(with_ini, WITH_PORT),
               processes.start_ckan(without_ini, WITHOUT_PORT)]
    rows, results = [], []
    try:
        token = sysadmin_token()
        clients = {"with": ckanapi.RemoteCKAN(f"http://127.0.0.1:{WITH_PORT}", apikey=token),
                   "without": ckanapi.RemoteCKAN(f"http://127.0.0.1:{WITHOUT_PORT}",
                                                 apikey=token)}
        admin = clients["with"]
        org = admin.action.organization_create(name=f"bench-{uuid.uuid4().hex[:8]}")
        dataset = admin.action.package_create(
            name=f"bench-{uuid.uuid4().hex[:8]}", owner_org=org["id"], notes="x" * 500,
            resources=[{"url": f"http://data.invalid/{n}.csv"} for n in range(3)])
        measure(clients, dataset["id"], 20)  # warm up both servers
        done = 0
        for size in sizes:
            half = size // 2
            insert_hooks(half - done // 2, "dataset/update",
                         "http://127.0.0.2:9/u/", start=done // 2)
            insert_hooks(half - done // 2, "resource/update",
                         "http://127.0.0.2:9/r/", start=done // 2)
            done = size
            times = measure(clients, dataset["id"], args.calls)
            with_s, without_s = summary(times["with"]), summary(times["without"])
            ratio = with_s["median"] / without_s["median"]
            result = {"hooks": size, "calls": args.calls, "with_ms": with_s,
                      "without_ms": without_s, "median_ratio": round(ratio, 3),
                      "p95_ratio": round(with_s["p95"] / without_s["p95"], 3)}
            results.append(result)
            rows.append((size, args.calls, f"{without_s['median']:.1f}", f"{with_s['median']:.1f}",
                         f"{ratio:.3f}", f"{without_s['p95']:.1f}", f"{with_s['p95']:.1f}"))
            print(rows[-1], flush=True)
    finally:
        for server in servers:
            server.stop()
        if solr:
            solr.stop()
        with_ini.unlink()
        without_ini.unlink()
    print()
    print(table(rows, ("hooks", "calls", "median without (ms)", "median with (ms)",
                       "ratio (target <= 1.05)", "p95 without", "p95 with")))
    print(f"results: {write_result('write_overhead', {'runs': results})}")


if __name__ == "__main__":
    main()
