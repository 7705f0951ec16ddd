"""Storage: what the delivery log costs on disk, and what its retention costs.

    python bench/storage.py [--attempts 100000] [--old 1000000] [--answer-bytes 20480]

In a database of its own (``ckanext_webhooks_bench_storage``, tables made by
the extension's migrations), with hooks and events in place:

* ``--attempts`` attempts recorded through the extension's own
  ``attempt_row``/``log_attempts`` (in batches of 1,000, as the worker records
  a batch), each from an answer of ``--answer-bytes`` of JSON, once with
  ``log_body_bytes`` 1024 (the default) and once with 20480 (all that is
  read, what the log kept before the setting): table, TOAST and index size
  per 100,000 attempts, side by side. The answers are incompressible text
  (the worst case: TOAST compression shrinks repetitive answers a lot);
* ``--old`` attempts dated past ``log_retention_days`` inserted in bulk, then
  the extension's ``maintenance.prune`` timed while it deletes them in
  bounded batches; the longest transaction is the longest time between two
  of its commits (timed by a wrapper around the session's commit).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import benchlib
from benchlib import ROOT, table, write_result

DB = "ckanext_webhooks_bench_storage"
benchlib.DB_URL = f"postgresql://ckan_webhooks:ckan_webhooks@127.0.0.1:5432/{DB}"


def prepare_database(ini: Path) -> None:
    subprocess.run([str(ROOT / "scripts" / "stack"), "db"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL,
                   env=dict(os.environ, DATABASES_OVERRIDE=DB, INIS_OVERRIDE=str(ini)))


def sizes() -> dict[str, int]:
    row = benchlib.sql("""
        SELECT pg_relation_size('webhooks_attempt'),
               pg_total_relation_size('webhooks_attempt') - pg_relation_size('webhooks_attempt')
               - pg_indexes_size('webhooks_attempt'),
               pg_indexes_size('webhooks_attempt')""")[0]
    return {"heap": row[0], "toast": row[1], "indexes": row[2]}


def record_attempts(count: int, answer: bytes, log_body_bytes: int) -> dict[str, int]:
    """``count`` attempts through the extension's own code, as a worker does."""
    from ckan.plugins import toolkit
    from ckan import model
    from ckanext.webhooks.delivery_queue import attempt_row, log_attempts
    from ckanext.webhooks.sender import Outcome
    toolkit.config["ckanext.webhooks.log_body_bytes"] = str(log_body_bytes)
    benchlib.sql("TRUNCATE webhooks_attempt")
    hook = benchlib.sql("SELECT id FROM webhooks LIMIT 1")[0][0]
    outcome = Outcome(200, None, 0.012, body=answer)
    for start in range(0, count, 1000):
        rows = [attempt_row(hook, f"msg_storage{n}", "dataset/update", 1, outcome)
                for n in range(start, min(count, start + 1000))]
        log_attempts(rows)
        model.Session.commit()
    benchlib.sql("ANALYZE webhooks_attempt")
    return sizes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attempts", type=int, default=100_000)
    parser.add_argument("--old", type=int, default=1_000_000)
    parser.add_argument("--answer-bytes", type=int, default=20480)
    args = parser.parse_args()

    ini = benchlib.ini_with({"sqlalchemy.url": benchlib.DB_URL})
    try:
        prepare_database(ini)
        from ckan.cli import load_config
        from ckan.config.environment import load_environment
        config = load_config(str(ini))
        load_environment(config)
        from ckan import model
        benchlib.sql("TRUNCATE webhooks_attempt, webhooks_delivery, webhooks_rendering, "
                     "webhooks_event, webhooks CASCADE")
        benchlib.sql("""INSERT INTO webhooks (id, topics, address, host, site, created)
                        VALUES (:id, ARRAY['dataset/update'], 'http://127.0.0.2/s',
                                '127.0.0.2', '127.0.0.2', now())""",
                     id=uuid.uuid4().hex * 2)
        # Incompressible text (an answer PostgreSQL's TOAST compression cannot
        # shrink): the worst case, as a random token or a binary-ish page is.
        noise = base64.b64encode(os.urandom(args.answer_bytes)).decode()
        answer = json.dumps({"ok": True, "echo": noise}).encode()[:args.answer_bytes]
        per = 100_000 / args.attempts
        measured = {}
        for kept in (1024, 20480):
            got = record_attempts(args.attempts, answer, kept)
            measured[kept] = {k: int(v * per) for k, v in got.items()}
            measured[kept]["total"] = sum(measured[kept].values())
        rows = [(f"log_body_bytes {kept}", f"{m['heap'] / 1e6:.1f}", f"{m['toast'] / 1e6:.1f}",
                 f"{m['indexes'] / 1e6:.1f}", f"{m['total'] / 1e6:.1f}")
                for kept, m in measured.items()]
        print(f"\nper 100,000 attempts, answers of {args.answer_bytes} bytes:")
        print(table(rows, ("setting", "heap MB", "TOAST MB", "indexes MB", "total MB")))
        ratio = measured[20480]["total"] / measured[1024]["total"]
        print(f"20 KB kept / 1 KB kept, same run: {ratio:.1f}x")

        # Retention: --old attempts past the window, deleted by prune in batches.
        benchlib.sql("TRUNCATE webhooks_attempt")
        hook = benchlib.sql("SELECT id FROM webhooks LIMIT 1")[0][0]
        benchlib.sql("""
            INSERT INTO webhooks_attempt (hook_id, event_id, topic, at, attempt, status,
                                          duration_ms, response)
            SELECT :h, 'msg_old' || n, 'dataset/update',
                   now() - interval '60 days' + n * interval '1 millisecond', 1, 200, 12,
                   repeat('x', 200)
              FROM generate_series(1, :n) AS n""", h=hook, n=args.old)
        benchlib.sql("ANALYZE webhooks_attempt")
        from ckanext.webhooks import maintenance
        batches: list[float] = []
        session = model.Session
        original = session.commit

        def timed_commit():
            original()
            now = time.perf_counter()
            batches.append(now)
        session.commit = timed_commit  # when each batch's transaction ended
        started = time.perf_counter()
        batches.append(started)
        result = maintenance.prune()
        took = time.perf_counter() - started
        session.commit = original
        longest = max(b - a for a, b in zip(batches, batches[1:]))
        left = benchlib.sql("SELECT count(*) FROM webhooks_attempt")[0][0]
        print(f"\nretention of {args.old:,} old attempts: {took:.1f} s "
              f"({result['old_attempts']:,} deleted, {left} left), "
              f"{len(batches) - 1} transactions, the longest {longest * 1000:.0f} ms")
        path = write_result("storage", {
            "attempts": args.attempts, "answer_bytes": args.answer_bytes,
            "per_100k_attempts_bytes": {str(k): v for k, v in measured.items()},
            "full_over_default": ratio,
            "retention": {"old_rows": args.old, "seconds": took,
                          "deleted": result["old_attempts"], "left": left,
                          "transactions": len(batches) - 1,
                          "longest_transaction_ms": longest * 1000}})
        print(f"results: {path}")
    finally:
        ini.unlink()


if __name__ == "__main__":
    main()
