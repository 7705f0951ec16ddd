"""What the benchmarks share: the bench stack (its own database, Redis database
and queue; see bench.ini), processes, hooks inserted in bulk, results files."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import types
import urllib.request
import uuid
from pathlib import Path
from typing import Optional

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ckanext.webhooks.tests import processes  # noqa: E402

BENCH_INI = ROOT / "bench" / "bench.ini"
RESULTS = ROOT / "bench" / "results"
DB_URL = "postgresql://ckan_webhooks:ckan_webhooks@127.0.0.1:5432/ckanext_webhooks_bench"
RECEIVER_HOST = "127.0.0.2"
SOLR_PORT = 18982  # bench.ini's solr_url: not the demo's (18983) nor a test run's
CKAN = str(processes.BIN / "ckan")

_engine = None


def engine():
    global _engine
    if _engine is None:
        _engine = sa.create_engine(DB_URL, pool_pre_ping=True)
    return _engine


def sql(statement: str, **params):
    with engine().begin() as conn:
        result = conn.execute(sa.text(statement), params)
        return result.all() if result.returns_rows else result.rowcount


def reset_webhooks() -> None:
    # webhooks_rendering (migration 04) references webhooks_event: truncated with it.
    sql("TRUNCATE webhooks_attempt, webhooks_delivery, webhooks_rendering, webhooks_event, "
        "webhooks")
    import redis
    redis.Redis.from_url("redis://127.0.0.1:6379/5").flushdb()


def insert_hooks(count: int, topic: str, address_prefix: str, start: int = 0) -> None:
    """``count`` hooks with distinct paths, straight into the table (creating
    them through the API would verify each address: that is not measured here)."""
    sql("""
        INSERT INTO webhooks (id, topics, address, host, site, created)
        SELECT md5(random()::text || n) || md5(n::text), ARRAY[:topic], :prefix || n, :host,
               :host, now()
          FROM generate_series(:start, :stop - 1) AS n
    """, topic=topic, prefix=address_prefix, host=RECEIVER_HOST, start=start, stop=start + count)


def ini_with(overrides: dict) -> Path:
    return processes.write_ini(overrides, base=BENCH_INI)


def sysadmin_token() -> str:
    """A sysadmin of the bench portal and a fresh API token for it."""
    def ckan(*args, check=True):
        return subprocess.run([CKAN, "-c", str(BENCH_INI), *args], capture_output=True,
                              text=True, check=check)
    if "name=bench-admin" not in ckan("user", "show", "bench-admin", check=False).stdout:
        ckan("user", "add", "bench-admin", "email=bench@localhost.invalid",
             "password=bench-admin-password")
        ckan("sysadmin", "add", "bench-admin")
    return ckan("user", "token", "add", "bench-admin", f"bench-{uuid.uuid4().hex[:6]}"
                ).stdout.strip().splitlines()[-1].strip()


def receiver_call(port: int, path: str, method: str = "GET"):
    request = urllib.request.Request(f"http://{RECEIVER_HOST}:{port}{path}", method=method,
                                     data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def start_receiver(port: int, impl: str = "asyncio") -> processes.Process:
    proc = processes.Process("bench-receiver", [sys.executable, str(ROOT / "bench" / "receiver.py"),
                                                "--host", RECEIVER_HOST, "--port", str(port),
                                                "--impl", impl])
    processes.wait_port(port, 15, host=RECEIVER_HOST, proc=proc.proc)
    return proc


@contextlib.contextmanager
def bench_stack(web_port: int, receiver_port: Optional[int] = None,
                overrides: Optional[dict] = None, worker_name: str = "bench-worker"):
    """A bench CKAN on ``web_port``, a worker in its default setup and, if
    asked, a receiver; all stopped afterwards, whatever happens."""
    url = f"http://127.0.0.1:{web_port}"
    ini = ini_with({"ckan.site_url": url, **(overrides or {})})
    started: list = []
    try:
        receiver = start_receiver(receiver_port) if receiver_port else None
        started.append(receiver)
        started.append(processes.start_solr_standin(SOLR_PORT))
        web = processes.start_ckan(ini, web_port)
        started.append(web)
        worker = processes.start_worker(ini, concurrency=None, name=worker_name)
        started.append(worker)
        yield types.SimpleNamespace(url=url, ini=ini, web=web, worker=worker, receiver=receiver)
    finally:
        for proc in reversed(started):
            if proc is not None:
                proc.stop()
        ini.unlink()


def wait_count(port: int, count: int, timeout: float) -> dict:
    deadline = time.time() + timeout
    while True:
        stats = receiver_call(port, "/_stats")
        if stats["count"] >= count or time.time() > deadline:
            return stats
        time.sleep(0.05)


def rss_of_tree(pid: int) -> int:
    """Resident memory (bytes) of a process and its children."""
    total = 0
    pids = [pid]
    try:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        pids += [int(p) for p in children.split()]
    except FileNotFoundError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values) if values else None,
            "p95": percentile(values, 95), "p99": percentile(values, 99),
            "mean": statistics.fmean(values) if values else None}


def write_result(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              **result}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def table(rows: list[tuple], headers: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)), line]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)
