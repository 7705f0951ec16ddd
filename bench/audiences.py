"""Fan-out by audience: one dataset/update to N hooks (10,000 by default)
whose readers are 1, 10 or 100 distinct audiences, beside the previous code's
single rendering, in the same run.

    python bench/audiences.py [--hooks 10000] [--audiences 1,10,100] [--rounds 3]
                              [--big-rounds 1] [--previous af3f553]
                              [--receiver stdlib|asyncio]

About 7 minutes with the defaults on the 2-core machine: the 100-audience
run alone takes 2 (so it is made in one round only, ``--big-rounds``).

What is compared
----------------
* **new**: the code in this checkout. The fan-out renders the dataset once per
  distinct audience among the matching hooks (``fanout.py``/``audience.py``):
  1 audience = every hook anonymous (``webhooks.user_id`` NULL); 10 or 100 =
  that many real CKAN users (``bench-reader-NNN``, members of the dataset's
  organization), hooks spread round-robin over them (``user_id`` set,
  ``token_id`` NULL), so each of them is rendered ``package_show`` as that user.
* **previous**: commit ``af3f553`` (``--previous``), the last one before
  audiences: a ``git worktree`` of it in a temporary directory, and a worker
  started from it (``ckan -c <ini> webhooks worker``, with this venv's
  ``ckanext`` namespace pointed at the worktree instead of this checkout; the
  worker's log says which files it imported, and the script checks it). It
  renders each event once, as the site user, for all hooks; its hooks are the
  same 10,000 anonymous ones.

The previous worker runs on today's schema (migrations 04 and 05 applied): it
maps only the columns it knows, and every column added since is nullable or
has a server default (``webhooks_delivery.audience`` ''; ``claim_token``,
``topic``, ``reason`` NULL; ``webhooks_event.fanout_attempts`` 0), so its
INSERT ... SELECT, claims and outcome records work unchanged; 05's INTEGER ->
BIGINT counters read as Python ints. Events are captured by today's web
process (only its worker changes; the write is not in the measured window): it
leaves ``webhooks_event.data`` NULL for dataset events, so the previous fan-out
renders as it always did; the previous code read only ``owner_org`` from the
snapshot's ``_package``, which today's snapshot lacks, and that matters only to
hooks filtered by organization (these have no filter). Each run checks what
was rendered: previous, ``webhooks_event.data`` filled and no
``webhooks_rendering`` row; new, exactly one ``webhooks_rendering`` row per
audience.

Runs alternate: in every round, previous and each audience count once (100
or more only in the first ``--big-rounds``), the order reversed every other
round, so noise from the rest of the machine hits both codes. Every run has
a worker of its own, started afresh and warmed up (``--warmups``, 1 by
default: a ``dataset/create`` event of a throw-away dataset while every hook
is anonymous; the hooks are ``dataset/update`` hooks, so nothing is
delivered, but both codes render it once), so that no first-call cost of a
fresh process lands in the measurement. Then the run's readers are set (one
UPDATE of every hook, then VACUUM ANALYZE: every run, previous or new, sees
the same table state), one ``package_patch`` is measured, and the worker is
stopped. The web process and the receiver (on 127.0.0.2; stdlib by default,
the one fanout.py's targets are judged against) stay up throughout. A run
that fails, or during which PostgreSQL restarted
(``pg_postmaster_start_time``; test suites beside the benchmarks restart it),
is discarded and made again, up to 3 times (``attempt`` in the JSON).

What is measured, per run
-------------------------
* **deliveries/s**: received / (last receipt - ``webhooks_event.created``),
  exactly as bench/fanout.py measures it.
* **fan-out (ms)**: ``webhooks_event.created`` to ``webhooks_event.fanned_out``,
  which the worker stamps (its own clock, the one this script reads) once the
  event's renderings are done: today's code after its INSERT ... SELECT of
  the deliveries, the previous code just before it (so the previous figure
  leaves out that one query, PostgreSQL's work).
* **first receipt (ms)**: ``webhooks_event.created`` to the first receipt:
  the fan-out, its commit, then the first batches' claim, preparation, send.
* **worker CPU, fan-out (s)**: user+system CPU of the worker's process tree
  (the ``ckan`` process and its pool children, read from /proc every 20 ms)
  from just before the update to the ``fanned_out`` stamp. No delivery can be
  claimed before the fan-out commits, so this is the fan-out's own CPU: the
  renderings with their access checks (the notification's wake-up and the
  task's start besides, the same in both codes). CPU time, unlike wall time,
  is little inflated by the other processes on the machine. PostgreSQL's
  side of the queries is not in it.
* **worker CPU, event (s)**: the same tree from just before the update until
  every delivery is recorded (``webhooks_delivery`` empty): all the worker
  spends on the event. The per-audience cost is not only the renderings:
  each delivery batch (500) checks access again once per (event, audience)
  among its deliveries, so with 100 audiences each of the 20 batches of
  10,000 hooks makes up to 100 ``check_access``.

Reported: medians per case (each run in the JSON), the rates' ratio to the
previous code's median rate (the 1-audience ratio has a target: >= 0.90; the
per-round paired ratios beside it), the same comparison in worker CPU per
event (less noisy than a rate on a busy machine), and the worker CPU each
audience beyond the first adds, per event: the slope from 1 to the largest
audience count, (median CPU(k) - median CPU(1)) / (k - 1), for the fan-out
phase (~ one rendering as a user, with its access checks) and for the whole
event. The 1-audience case is anonymous, the others are users: the slope is
the cost of a user audience.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import types
import uuid
from pathlib import Path

import ckanapi
import sqlalchemy as sa

from benchlib import (BENCH_INI, CKAN, RECEIVER_HOST, ROOT, SOLR_PORT, cpu_seconds, engine,
                      ini_with, insert_hooks, processes, receiver_call, reset_webhooks, sql,
                      start_receiver, sysadmin_token, table, wait_count, write_result)

WEB_PORT, RECEIVER_PORT = 15108, 18108
PREVIOUS = "af3f553"
READER_PREFIX = "bench-reader-"
BIG = 100  # audience counts from which a run takes minutes at 10,000 hooks

# Runs the ckan CLI with ckanext.webhooks imported from another source tree
# (argv[1]) instead of this checkout, which the venv has installed in editable
# mode: drop the editable finder, then put that tree first in the ckanext
# namespace. Entry points (the plugin, the CLI) then load its modules.
LAUNCHER = r"""
import sys
src = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [h for h in sys.path_hooks
                     if not getattr(h, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
import ckanext
ckanext.__path__ = [src + "/ckanext"] + [p for p in ckanext.__path__
                                        if p.startswith(sys.prefix)]
import ckanext.webhooks, ckanext.webhooks.dispatcher
assert ckanext.webhooks.__file__.startswith(src), ckanext.webhooks.__file__
print("bench: ckanext.webhooks from", ckanext.webhooks.__file__, flush=True)
from ckan.cli.cli import ckan
sys.argv[0] = "ckan"
sys.exit(ckan())
"""


class CpuSampler(threading.Thread):
    """(time, CPU seconds of the process tree) every ``interval`` seconds."""

    def __init__(self, pids: list[int], interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval, self.running = pids, interval, True
        self.samples: list[tuple[float, float]] = []

    def sample(self) -> tuple[float, float]:
        point = (time.time(), sum(cpu_seconds(p) for p in self.pids))
        self.samples.append(point)
        return point

    def run(self) -> None:
        while self.running:
            self.sample()
            time.sleep(self.interval)

    def stop(self) -> tuple[float, float]:
        self.running = False
        self.join()
        return self.sample()

    def at(self, when: float) -> float:
        """CPU at ``when``, interpolated between the samples either side."""
        before = [(t, cpu) for t, cpu in self.samples if t <= when] or self.samples[:1]
        after = [(t, cpu) for t, cpu in self.samples if t >= when] or self.samples[-1:]
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 <= t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def tree_pids(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        children = subprocess.run(["pgrep", "-P", str(current)], capture_output=True,
                                  text=True, check=False).stdout
        todo += [int(p) for p in children.split()]
    return pids


def start_worker(ini: Path, previous_src: Path | None) -> processes.Process:
    """Today's worker (``ckan -c ini webhooks worker``, the default setup), or
    the same command run from the previous code's worktree."""
    args = ["-c", str(ini), "webhooks", "worker", "--loglevel=INFO"]
    if previous_src is None:
        proc = processes.Process("bench-audiences-worker-new", [CKAN, *args])
    else:
        proc = processes.Process("bench-audiences-worker-previous",
                                 [sys.executable, "-c", LAUNCHER, str(previous_src), *args])
    deadline = time.monotonic() + 90
    while "worker ready" not in proc.output():
        if not proc.alive() or time.monotonic() > deadline:
            proc.stop()
            raise RuntimeError(f"worker did not start:\n{proc.output()[-3000:]}")
        time.sleep(0.2)
    if previous_src is not None and f"from {previous_src}" not in proc.output():
        proc.stop()
        raise RuntimeError("the previous worker did not import the previous code")
    return proc


def ensure_readers(admin, count: int) -> list[tuple[str, str]]:
    """``count`` active users bench-reader-000... as (id, name), created once."""
    names = [f"{READER_PREFIX}{n:03d}" for n in range(count)]
    existing = {name: uid for uid, name in sql(
        "SELECT id, name FROM \"user\" WHERE name = ANY(:names) AND state = 'active'",
        names=names)}
    for name in names:
        if name not in existing:
            user = admin.action.user_create(name=name, email=f"{name}@localhost.invalid",
                                            password=f"{name}-password-{uuid.uuid4().hex}")
            existing[name] = user["id"]
    return [(existing[name], name) for name in names]


def set_audiences(count: int, readers: list[tuple[str, str]]) -> None:
    """1: every hook anonymous; k > 1: hooks round-robin over the first k readers."""
    if count == 1:
        sql("UPDATE webhooks SET user_id = NULL, token_id = NULL")
        return
    sql("""
        UPDATE webhooks w SET user_id = (CAST(:ids AS text[]))[1 + s.n % :k], token_id = NULL
          FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM webhooks) s
         WHERE s.id = w.id
    """, ids=[uid for uid, _ in readers[:count]], k=count)
    [(distinct,)] = sql("SELECT count(DISTINCT user_id) FROM webhooks")
    assert distinct == count, (distinct, count)


def wait_sql(statement: str, timeout: float, **params) -> bool:
    """Until ``statement`` returns a true first column, or ``timeout``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        [(done,)] = sql(statement, **params)
        if done:
            return True
        time.sleep(0.05)
    return False


def vacuum_hooks() -> None:
    with engine().connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE webhooks"))


def one_run(ctx, code: str, audiences: int) -> dict:
    set_audiences(1, ctx.readers)
    sql("TRUNCATE webhooks_attempt, webhooks_delivery, webhooks_rendering, webhooks_event")
    worker = start_worker(ctx.ini, ctx.previous_src if code == "previous" else None)
    try:
        for _ in range(ctx.warmups):  # renders, delivers nothing (see the docstring)
            ctx.admin.action.package_create(name=f"bench-warm-{uuid.uuid4().hex[:10]}",
                                            owner_org=ctx.org_id, notes="warm-up")
            if not wait_sql("SELECT count(*) = 0 FROM webhooks_event WHERE fanned_out IS NULL",
                            60):
                raise RuntimeError("warm-up events were not fanned out")
        sql("TRUNCATE webhooks_attempt, webhooks_delivery, webhooks_rendering, webhooks_event")
        # Every run measures the same table state: its readers set by one UPDATE
        # of every hook, then vacuumed and analysed.
        set_audiences(audiences, ctx.readers)
        vacuum_hooks()
        time.sleep(0.5)
        receiver_call(RECEIVER_PORT, "/_reset", "POST")
        sampler = CpuSampler(tree_pids(worker.proc.pid))
        _, cpu_start = sampler.sample()
        sampler.start()
        ctx.admin.action.package_patch(id=ctx.dataset_id, notes=f"audiences {uuid.uuid4().hex}")
        stats = wait_count(RECEIVER_PORT, ctx.hooks, timeout=max(120, ctx.hooks / 20))
        recorded = wait_sql("SELECT count(*) = 0 FROM webhooks_delivery", 60)
        _, cpu_end = sampler.stop()
        [(event_id, created, fanned_out, rendered_once)] = sql(
            "SELECT id, extract(epoch from created), extract(epoch from fanned_out), "
            "data IS NOT NULL FROM webhooks_event WHERE topic = 'dataset/update' "
            "ORDER BY created DESC LIMIT 1")
        [(renderings,)] = sql("SELECT count(*) FROM webhooks_rendering WHERE event_id = :e "
                              "AND data IS NOT NULL", e=event_id)
        [(failed,)] = sql("SELECT count(*) FROM webhooks_attempt WHERE status IS NULL "
                          "OR status >= 300")
    finally:
        worker.stop()
    created = float(created)
    elapsed = stats["last"] - created if stats["last"] else float("nan")
    expected = (rendered_once and renderings == 0) if code == "previous" \
        else renderings == audiences
    if not expected or stats["count"] != ctx.hooks:
        print(f"  WARNING {code}/{audiences}: received {stats['count']} of {ctx.hooks}, "
              f"event data {'set' if rendered_once else 'NULL'}, {renderings} rendering row(s)",
              flush=True)
    return {
        "code": code, "audiences": audiences, "hooks": ctx.hooks, "received": stats["count"],
        "distinct_paths": stats["paths"], "all_recorded": recorded, "failed_attempts": failed,
        "renderings_as_expected": bool(expected), "rendering_rows": renderings,
        "seconds": round(elapsed, 3),
        "deliveries_per_s": round(stats["count"] / elapsed, 1) if stats["count"] else 0.0,
        "first_receipt_ms": round((stats["first"] - created) * 1000, 1) if stats["first"]
        else None,
        "fanned_out_ms": round((float(fanned_out) - created) * 1000, 1) if fanned_out else None,
        "worker_cpu_fanout_s": round(sampler.at(float(fanned_out)) - cpu_start, 3)
        if fanned_out else None,
        "worker_cpu_event_s": round(cpu_end - cpu_start, 3),
    }


def postgres_started() -> float:
    deadline = time.time() + 120
    while True:
        try:
            [(started,)] = sql("SELECT extract(epoch from pg_postmaster_start_time())")
            return float(started)
        except sa.exc.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(1)


def retried(run, attempts: int = 3) -> dict:
    """A run again, afresh, if it failed or PostgreSQL restarted meanwhile (the
    test suites running beside the benchmarks restart it): such a run measures
    the outage, not the fan-out."""
    for attempt in range(1, attempts + 1):
        started = postgres_started()
        try:
            result = run()
            if postgres_started() != started:
                raise RuntimeError("PostgreSQL restarted during the run")
            return {**result, "attempt": attempt}
        except Exception as error:  # tried again, then raised
            if attempt == attempts:
                raise
            print(f"  run discarded ({type(error).__name__}: {str(error)[:200]}); again",
                  flush=True)
            time.sleep(2)
    raise AssertionError("unreachable")


def plan(rounds: int, audiences: list[int], big_rounds: int) -> list[tuple[str, int]]:
    """Alternating runs: each round has the previous code and every audience
    count once (those of ``BIG`` or more only in the first ``big_rounds``
    rounds), in reverse order every other round."""
    order = []
    for n in range(rounds):
        one = [("previous", 1)] + [("new", k) for k in audiences if k < BIG or n < big_rounds]
        order += one if n % 2 == 0 else one[::-1]
    return order


def med(runs: list[dict], key: str):
    values = [r[key] for r in runs if r[key] is not None]
    return round(statistics.median(values), 3) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hooks", type=int, default=10000)
    parser.add_argument("--audiences", default="1,10,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big-rounds", type=int, default=1,
                        help=f"rounds with the audience counts of {BIG} or more (a run of "
                             f"100 audiences to 10,000 hooks takes about 2 minutes here)")
    parser.add_argument("--warmups", type=int, default=1,
                        help="dataset/create events each fresh worker renders before the run")
    parser.add_argument("--previous", default=PREVIOUS, help="the commit compared against")
    parser.add_argument("--receiver", choices=["stdlib", "asyncio"], default="stdlib")
    args = parser.parse_args()
    audiences = sorted({int(x) for x in args.audiences.split(",") if x} | {1})

    began = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="webhooks-previous-"))
    previous_src = workdir / "src"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet",
                    str(previous_src), args.previous], check=True)
    previous_commit = subprocess.run(["git", "-C", str(previous_src), "rev-parse", "HEAD"],
                                     capture_output=True, text=True, check=True).stdout.strip()
    ini = ini_with({"ckan.site_url": f"http://127.0.0.1:{WEB_PORT}"})
    started: list = []
    runs: list[dict] = []
    try:
        started.append(processes.start_solr_standin(SOLR_PORT))
        # Today's schema (the previous code runs on it too; see the docstring).
        subprocess.run([CKAN, "-c", str(BENCH_INI), "db", "upgrade", "-p", "webhooks"],
                       check=True, capture_output=True)
        reset_webhooks()
        started.append(start_receiver(RECEIVER_PORT, args.receiver))
        started.append(processes.start_ckan(ini, WEB_PORT))
        admin = ckanapi.RemoteCKAN(f"http://127.0.0.1:{WEB_PORT}", apikey=sysadmin_token())
        readers = ensure_readers(admin, max(audiences))
        org = admin.action.organization_create(
            name=f"bench-{uuid.uuid4().hex[:8]}",
            users=[{"name": name, "capacity": "member"} for _, name in readers])
        dataset = admin.action.package_create(name=f"bench-{uuid.uuid4().hex[:8]}",
                                              owner_org=org["id"], notes="x" * 200,
                                              resources=[{"url": "http://data.invalid/a.csv"}])
        insert_hooks(args.hooks, "dataset/update", f"http://{RECEIVER_HOST}:{RECEIVER_PORT}/h/")
        ctx = types.SimpleNamespace(admin=admin, readers=readers, org_id=org["id"],
                                    dataset_id=dataset["id"], hooks=args.hooks, ini=ini,
                                    previous_src=previous_src, warmups=args.warmups)
        order = plan(args.rounds, audiences, args.big_rounds)
        print(f"set up in {time.monotonic() - began:.0f} s; {len(order)} runs", flush=True)
        for n, (code, count) in enumerate(order, 1):
            began_run = time.monotonic()
            runs.append(retried(lambda code=code, count=count: one_run(ctx, code, count)))
            print(f"[{n}/{len(order)}, {time.monotonic() - began_run:.0f} s]",
                  json.dumps(runs[-1]), flush=True)
    finally:
        for proc in reversed(started):
            if proc is not None:
                proc.stop()
        ini.unlink()
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                        str(previous_src)], check=False)
        shutil.rmtree(workdir, ignore_errors=True)

    cases = [("previous", 1)] + [("new", k) for k in audiences]
    summary = {}
    for code, count in cases:
        mine = [r for r in runs if r["code"] == code and r["audiences"] == count]
        summary[f"{code}/{count}"] = {
            "code": code, "audiences": count, "runs": len(mine),
            "deliveries_per_s": med(mine, "deliveries_per_s"),
            "fanned_out_ms": med(mine, "fanned_out_ms"),
            "first_receipt_ms": med(mine, "first_receipt_ms"),
            "worker_cpu_fanout_s": med(mine, "worker_cpu_fanout_s"),
            "worker_cpu_event_s": med(mine, "worker_cpu_event_s"),
            "all_received": all(r["received"] == args.hooks for r in mine),
            "renderings_as_expected": all(r["renderings_as_expected"] for r in mine)}
    base = summary["previous/1"]["deliveries_per_s"]
    for row in summary.values():
        row["ratio_to_previous"] = round(row["deliveries_per_s"] / base, 3) if base else None
    # Paired, round by round: the new 1-audience run against the previous one.
    previous_runs = [r for r in runs if r["code"] == "previous"]
    new_1 = [r for r in runs if r["code"] == "new" and r["audiences"] == 1]
    paired = [round(n["deliveries_per_s"] / p["deliveries_per_s"], 3)
              for p, n in zip(previous_runs, new_1) if p["deliveries_per_s"]]
    # The same comparison in worker CPU per event: far less noisy than a rate.
    cpu_previous = summary["previous/1"]["worker_cpu_event_s"]
    cpu_ratio = round(summary["new/1"]["worker_cpu_event_s"] / cpu_previous, 3) \
        if cpu_previous else None
    top = max(audiences)
    slope = {}
    if top > 1:
        for key in ("worker_cpu_fanout_s", "worker_cpu_event_s"):
            low, high = summary["new/1"][key], summary[f"new/{top}"][key]
            slope[key] = round((high - low) / (top - 1) * 1000, 2) \
                if None not in (low, high) else None

    print()
    print(table([(r["code"] if r["code"] == "new" else f"previous ({args.previous})",
                  r["audiences"], r["runs"], r["deliveries_per_s"],
                  f"{r['ratio_to_previous']:.3f}" if r["ratio_to_previous"] else "-",
                  r["fanned_out_ms"], r["first_receipt_ms"], r["worker_cpu_fanout_s"],
                  r["worker_cpu_event_s"],
                  "yes" if r["all_received"] and r["renderings_as_expected"] else "NO")
                 for r in summary.values()],
                ("code", "audiences", "runs", "deliveries/s (median)", "/ previous",
                 "fan-out ms", "first receipt ms", "worker CPU fan-out s",
                 "worker CPU event s", "checks")))
    ratio = summary["new/1"]["ratio_to_previous"]
    print(f"\n1 audience / previous single rendering: {ratio} (target >= 0.90; "
          f"paired by round: {paired})")
    print(f"1 audience / previous, worker CPU per event: {cpu_ratio}")
    if slope:
        print(f"each audience beyond the first adds, per event, worker CPU: "
              f"{slope['worker_cpu_fanout_s']} ms in the fan-out phase, "
              f"{slope['worker_cpu_event_s']} ms over the whole event "
              f"(slope from 1 to {top} audiences, {args.hooks} hooks)")
    path = write_result("audiences", {
        "hooks": args.hooks, "rounds": args.rounds, "big_rounds": args.big_rounds,
        "receiver": args.receiver,
        "warmups": args.warmups, "previous": {"ref": args.previous, "commit": previous_commit},
        "ratio_1_audience_to_previous": ratio, "paired_ratios_1_audience": paired,
        "cpu_ratio_1_audience_to_previous": cpu_ratio,
        "cpu_ms_per_extra_audience": slope, "cases": summary, "runs": runs})
    print(f"results: {path} ({time.monotonic() - began:.0f} s in all)")


if __name__ == "__main__":
    main()
