"""Where the CPU of a fan-out goes: CPU seconds of the worker, the receiver,
PostgreSQL and the web process during one dataset/update to N hooks, per
delivery; with --py-spy, also the hottest functions of the worker processes.

    python bench/profile_fanout.py [--hooks 20000] [--py-spy]

This is the tool behind the optimisations recorded in the closing notes:
the worker went from 343 to about 170 µs of CPU per delivery on the first
machine; on a later, slower one from 216 to 154 µs when the sender moved from
h11 over asyncio streams to asyncio.Protocol with httptools.
"""
from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import time
import uuid
from pathlib import Path

import ckanapi

from benchlib import (RECEIVER_HOST, bench_stack, cpu_seconds, insert_hooks, reset_webhooks,
                      sysadmin_token, table, wait_count, write_result)

WEB_PORT, RECEIVER_PORT = 15106, 18106


def tree(pid: int) -> list[int]:
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [pid] + [int(p) for p in children.split()]


def top_frames(paths: list[Path], count: int = 15) -> list[tuple[float, str]]:
    totals, samples = collections.Counter(), 0
    for path in paths:
        for line in path.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            samples += int(n)
            for frame in set(stack.split(";")):
                totals[frame.split(" (")[0] + " " + frame.rsplit("/", 1)[-1].split(":")[0]] \
                    += int(n)
    return [(round(100 * v / max(1, samples), 1), k) for k, v in totals.most_common(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hooks", type=int, default=20000)
    parser.add_argument("--py-spy", action="store_true")
    args = parser.parse_args()
    reset_webhooks()
    spies = []
    with bench_stack(WEB_PORT, RECEIVER_PORT, worker_name="bench-worker-profile") as stack:
        admin = ckanapi.RemoteCKAN(stack.url, apikey=sysadmin_token())
        org = admin.action.organization_create(name=f"bench-{uuid.uuid4().hex[:8]}")
        dataset = admin.action.package_create(name=f"bench-{uuid.uuid4().hex[:8]}",
                                              owner_org=org["id"])
        insert_hooks(args.hooks, "dataset/update", f"http://{RECEIVER_HOST}:{RECEIVER_PORT}/h/")
        time.sleep(1)
        postgres = [int(p) for p in subprocess.run(["pgrep", "-f", "postgres"],
                                                    capture_output=True, text=True).stdout.split()]
        groups = {"worker": tree(stack.worker.proc.pid), "receiver": [stack.receiver.proc.pid],
                  "postgres": postgres, "web": tree(stack.web.proc.pid)}
        if args.py_spy:
            spies = [(Path(f"/tmp/profile-fanout-{pid}.txt"), subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "-d", "8", "-f", "raw",
                 "-r", "200", "-o", f"/tmp/profile-fanout-{pid}.txt", "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                for pid in groups["worker"][1:]]
            time.sleep(1)
        before = {k: sum(cpu_seconds(p) for p in v) for k, v in groups.items()}
        started = time.time()
        admin.action.package_patch(id=dataset["id"], notes="profile")
        wait_count(RECEIVER_PORT, args.hooks, 120)
        wall = time.time() - started
        after = {k: sum(cpu_seconds(p) for p in v) for k, v in groups.items()}
        for _, spy in spies:
            spy.wait()
    used = {k: after[k] - before[k] for k in groups}
    rows = [(k, f"{v:.2f}", f"{v / args.hooks * 1e6:.0f}") for k, v in used.items()]
    print(table(rows, ("process", "CPU seconds", "µs per delivery")))
    print(f"{args.hooks} deliveries in {wall:.2f} s wall ({args.hooks / wall:.0f}/s)")
    hot = top_frames([path for path, _ in spies]) if spies else []
    for share, frame in hot:
        print(f"{share:5.1f}%  {frame}")
    write_result("profile_fanout", {"hooks": args.hooks, "wall_s": wall,
                                    "cpu_s": used, "hot_frames": hot})


if __name__ == "__main__":
    main()
