"""Run every benchmark, then print the figures beside their targets.

    python bench/run_all.py [--quick]

Each benchmark writes bench/results/<name>.json (fanout also a .png); this
writes bench/results/summary.json. Every figure is a ratio or a rate measured
side by side in the same run: these machines are noisy.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def run(script: str, *args: str) -> dict:
    print(f"\n=== {script} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, str(HERE / script), *args], cwd=HERE, check=True)
    return json.loads((RESULTS / script.replace(".py", ".json")).read_text())


def isolation_rows(noisy: dict, lease: dict) -> list[tuple]:
    """The noisy-neighbour and one-host lease scenarios beside their targets."""
    sc, targets, slow = noisy["scenario"], noisy["targets"], noisy["slow"]
    name = (f"noisy neighbours ({sc['slow_hooks']} slow/{sc['slow_hosts']} hosts, "
            f"{sc['updates']} upd.)")
    drain = slow["drain_s_from_first_commit"]
    lsc = lease["scenario"]
    lname = f"one host ({lsc['hooks']} hooks, {lsc['delay']:g} s)"
    t = lease["targets"]
    return [
        (f"{name}: healthy p99 (ms)", targets["healthy_p99_ms"]["value"],
         "<= 1000", targets["healthy_p99_ms"]["met"]),
        (f"{name}: duplicates", targets["duplicates"]["value"], "== 0",
         targets["duplicates"]["met"]),
        (f"{name}: slow, exactly once", targets["slow_all_once"]["value"],
         "all", targets["slow_all_once"]["met"]),
        (f"{name}: slow drain (s)",
         drain if drain is not None else f"not in {noisy['timeout_s']}",
         f"(reported; >= {noisy['drain_bound']['lower_bound_s']:g})", None),
        (f"{lname}: duplicates", t["duplicates"]["value"], "== 0",
         t["duplicates"]["met"]),
        (f"{lname}: exactly once", t["each_hook_once"]["value"], "all",
         t["each_hook_once"]["met"]),
        (f"{lname}: commit to last receipt (s)",
         lease["total_s"] if lease["total_s"] is not None else f"not in {lease['timeout_s']}",
         "(reported)", None),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smaller runs (200 calls in 2 rounds, 10,000 hooks at most)")
    args = parser.parse_args()
    quick = args.quick
    write = run("write_overhead.py", "--calls", "200" if quick else "1000",
                "--rounds", "2" if quick else "4",
                "--sizes", "10000" if quick else "10000,100000")
    fanout = run("fanout.py", "--curve", "100,1000,10000" if quick else "100,1000,10000,100000")
    latency = run("latency.py", "--events", "200")
    poll = run("push_vs_poll.py", "--updates", "6" if quick else "12")
    sender = run("sender_cpu.py", "--requests", "20000" if quick else "40000")
    audiences = run("audiences.py", "--hooks", "10000", "--rounds", "2" if quick else "3")
    # The scenarios at full size (the noisy one drains 6,000 deliveries
    # held 10 s each: at least 16 min on 2 cores); --quick runs smaller ones.
    noisy = run("noisy_neighbours.py", *(["--slow-hooks", "60", "--slow-hosts", "12",
                                          "--slow-delay", "5", "--updates", "6"] if quick else []))
    lease = run("lease_one_host.py", *(["--hooks", "100", "--delay", "5"] if quick else []))
    storage = run("storage.py", *(["--attempts", "20000", "--old", "100000"] if quick else []))
    workers = run("workers.py", "--rounds", "1" if quick else "2")

    stdlib = fanout["receivers"]["stdlib"]
    rows = []
    for r in write["runs"]:
        rows.append((f"write overhead, {r['hooks']} hooks (median ratio)", r["median_ratio"],
                     "<= 1.05", r["median_ratio"] <= 1.05))
    rows += [
        ("fan-out to 10,000 hooks (deliveries/s)", stdlib["main"]["deliveries_per_s"],
         ">= 2000", stdlib["main"]["deliveries_per_s"] >= 2000),
        ("fan-out / raw wrk rate, stdlib receiver", stdlib["ratio_to_raw"], ">= 0.70",
         stdlib["ratio_to_raw"] >= 0.7),
        ("fan-out / raw wrk rate, asyncio receiver", fanout["receivers"]["asyncio"]["ratio_to_raw"],
         ">= 0.15", fanout["receivers"]["asyncio"]["ratio_to_raw"] >= 0.15),
        ("latency p50 (ms)", round(latency["latency_ms"]["median"], 1), "<= 15",
         latency["latency_ms"]["median"] <= 15),
        ("latency p99 (ms)", round(latency["latency_ms"]["p99"], 1), "<= 100",
         latency["latency_ms"]["p99"] <= 100),
        ("worker RSS peak across the curve (MB)",
         max(r["worker_rss_mb_peak"] for r in stdlib["runs"]), "bounded", None),
        ("sender CPU per request / wrk's", sender["cpu_ratio_to_wrk"], "(reported)", None),
        ("fan-out, 1 audience / previous single rendering",
         audiences["ratio_1_audience_to_previous"], ">= 0.90",
         audiences["ratio_1_audience_to_previous"] >= 0.90),
        ("the same in worker CPU per event (new / previous)",
         audiences["cpu_ratio_1_audience_to_previous"], "(reported)", None),
    ]
    for case in audiences["cases"].values():
        if case["code"] == "new" and case["audiences"] > 1:
            rows.append((f"fan-out, {case['audiences']} audiences (deliveries/s, / previous)",
                         f"{case['deliveries_per_s']:.0f}, {case['ratio_to_previous']:.2f}",
                         "(reported)", None))
    rows.append(("fan-out, worker CPU per audience beyond the first (ms)",
                 audiences["cpu_ms_per_extra_audience"].get("worker_cpu_fanout_s"),
                 "(reported)", None))
    rows += isolation_rows(noisy, lease)
    per = storage["per_100k_attempts_bytes"]
    retention = storage["retention"]
    rows += [
        ("delivery log per 100,000 attempts, 1 KB kept / 20 KB kept (MB)",
         f"{per['1024']['total'] / 1e6:.0f} / {per['20480']['total'] / 1e6:.0f}",
         "(reported)", None),
        (f"retention of {retention['old_rows']:,} attempts (s; longest transaction ms)",
         f"{retention['seconds']:.1f}; {retention['longest_transaction_ms']:.0f}",
         "(reported)", None),
    ]
    for shape in ("processes", "workers"):
        by_count: dict[int, list[float]] = {}
        for r in workers["runs"]:
            if r["shape"] == shape:
                by_count.setdefault(r["processes"], []).append(r["deliveries_per_s"])
        medians = [sorted(v)[len(v) // 2] for _, v in sorted(by_count.items())]
        rows.append((f"fan-out with 1/2/4 worker {shape} (deliveries/s, median)",
                     " / ".join(f"{m:.0f}" for m in medians), "(reported)", None))
    rows += [
        ("poll / push bytes", round(poll["poll"]["bytes"] / poll["push"]["bytes"], 1), "", None),
        ("poll / push mean delay", round(poll["poll"]["mean_delay_s"] /
                                         poll["push"]["mean_delay_s"], 1), "", None),
    ]
    print("\n=== summary")
    width = max(len(r[0]) for r in rows)
    for name, value, target, met in rows:
        mark = "" if met is None else ("met" if met else "NOT MET")
        print(f"{name.ljust(width)}  {str(value).rjust(10)}  {target.ljust(22)} {mark}")
    (RESULTS / "summary.json").write_text(json.dumps(
        [{"figure": n, "value": v, "target": t, "met": m} for n, v, t, m in rows], indent=2))
    print(f"\nresults in {RESULTS}")


if __name__ == "__main__":
    main()
