"""Hook ids are capabilities: no log may ever show one (README, "Security").

The whole run is checked, not one test: a trigger (test-only, in a schema of
its own) copies every id ever inserted into ``webhooks`` by any process (API
calls to a live CKAN, the in-process test app, SQL written by tests, imports)
into ``webhooks_test_audit.hook_ids``, deleted and pruned hooks included. When
the session ends, conftest's ``pytest_sessionfinish`` searches every log this
session wrote for every one of them: the output of every process the suite
started (workers, CKAN servers, supervisord and its children, receivers, the
Solr stand-in: all under ``$WEBHOOKS_ARTIFACTS/logs``), the stderr of the CLI
commands tests ran, and this pytest process's own log records. A find fails
the run. Each session (a CKAN version's suite, the ``exclusive`` phase)
checks its own logs and ids.

The one exception is the README's: "A hook id in a URL also lands in web
server access logs". The request line of a web server's access log line is
left out of the search; the rest of that line is searched like any other.
"""
from __future__ import annotations

import logging
import re
import subprocess
import time
from pathlib import Path
from typing import Iterable, NamedTuple

import sqlalchemy as sa

from . import processes

# Outside the public schema: CKAN's reset_db reflects and drops (or empties)
# the public schema's tables only, so the record outlives every reset.
SCHEMA = "webhooks_test_audit"
TRIGGER = "webhooks_test_audit_hook_ids"

SETUP = f"""
CREATE SCHEMA IF NOT EXISTS {SCHEMA};
CREATE TABLE IF NOT EXISTS {SCHEMA}.hook_ids (id text PRIMARY KEY);
CREATE OR REPLACE FUNCTION {SCHEMA}.record_hook_id() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO {SCHEMA}.hook_ids (id) VALUES (NEW.id) ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
"""

# A werkzeug / common-log-format access line: what is between the quotes is
# the request line, the one place a hook id may show (README).
ACCESS_LINE = re.compile(
    r'^(?P<head>.*\] ")(?:GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) \S+ HTTP/[0-9.]+(?P<tail>" .*)$')
# Terminal colours (werkzeug colours the request line by status).
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Runs of the characters hook ids are made of (URL-safe base64, and the
# hyphens and hex of the ids tests insert by SQL).
ID_RUN = re.compile(r"[A-Za-z0-9_-]{16,}")
PREFIX = 16

_started: dict = {}
_cli_log: list[Path] = []


class Find(NamedTuple):
    path: Path
    line: int
    fingerprint: str


def _engine() -> sa.engine.Engine:
    from ckan.plugins import toolkit
    return sa.create_engine(toolkit.config["sqlalchemy.url"], poolclass=sa.pool.NullPool)


def start() -> None:
    """At the session's first test: a record of the hooks already there (an
    earlier run's: this session's processes may deliver to them), and the
    trigger on the table if it exists already."""
    engine = _engine()
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(SETUP))
            conn.execute(sa.text(f"TRUNCATE {SCHEMA}.hook_ids"))
            if conn.execute(sa.text("SELECT to_regclass('public.webhooks')")).scalar():
                conn.execute(sa.text(f"INSERT INTO {SCHEMA}.hook_ids SELECT id FROM webhooks"))
        watch(engine)
    finally:
        engine.dispose()
    _started["at"] = time.time()
    _start_process_log()
    _tee_cli_stderr()


def watch(engine: sa.engine.Engine | None = None) -> None:
    """Put the trigger on ``webhooks`` unless it is there (the table is created
    afresh by the first reset of a session): call after (re)creating it."""
    own = engine is None
    engine = engine or _engine()
    try:
        with engine.begin() as conn:
            if conn.execute(sa.text("SELECT to_regclass('public.webhooks')")).scalar() is None:
                return
            if not _has_trigger(conn):
                conn.execute(sa.text(f"""
                    CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OF id ON public.webhooks
                    FOR EACH ROW EXECUTE FUNCTION {SCHEMA}.record_hook_id()"""))
    finally:
        if own:
            engine.dispose()


def _has_trigger(conn) -> bool:
    return bool(conn.execute(sa.text(
        "SELECT 1 FROM pg_trigger WHERE tgname = :name AND tgrelid = 'public.webhooks'::regclass"),
        {"name": TRIGGER}).scalar())


def record(hook_id: str) -> None:
    """For a hook made where the trigger is not (a database of its own)."""
    engine = _engine()
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {SCHEMA}.hook_ids VALUES (:id) "
                                 "ON CONFLICT DO NOTHING"), {"id": hook_id})
    finally:
        engine.dispose()


def recorded() -> set[str]:
    engine = _engine()
    try:
        with engine.connect() as conn:
            return set(conn.execute(sa.text(f"SELECT id FROM {SCHEMA}.hook_ids")).scalars())
    finally:
        engine.dispose()


def _unrecorded_hooks() -> int:
    """Hooks in the table that the record lacks: the trigger was missing when
    they were inserted (then others may have been missed too)."""
    engine = _engine()
    try:
        with engine.connect() as conn:
            if conn.execute(sa.text("SELECT to_regclass('public.webhooks')")).scalar() is None:
                return 0
            if not _has_trigger(conn):
                return -1
            return conn.execute(sa.text(f"""
                SELECT count(*) FROM public.webhooks w
                 WHERE NOT EXISTS (SELECT 1 FROM {SCHEMA}.hook_ids a WHERE a.id = w.id)
            """)).scalar()
    finally:
        engine.dispose()


# --- the pytest process's own log, and the CLI commands' stderr ---------------

def _start_process_log() -> None:
    processes.LOGS.mkdir(parents=True, exist_ok=True)
    path = processes.LOGS / f"pytest-{int(time.time() * 1000)}.log"
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    _started["handler"] = handler
    keep_process_log()


def keep_process_log() -> None:
    """The extension's loggers logging to this file at INFO, as in a CKAN
    process, whatever reconfigured logging meanwhile: a ``fileConfig`` (the
    migrations' env.py runs one with alembic.ini, in this process when a test
    migrates) clears the root's handlers and disables every logger it does
    not name."""
    handler = _started.get("handler")
    if handler is None:
        return
    if handler not in logging.root.handlers:
        logging.root.addHandler(handler)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("ckanext") and isinstance(logger, logging.Logger):
            logger.disabled = False
    extension = logging.getLogger("ckanext")
    if extension.getEffectiveLevel() > logging.INFO:
        extension.setLevel(logging.INFO)


def _tee_cli_stderr() -> None:
    """Tests run ``ckan`` commands with their output captured in memory: their
    stderr (the command's log; stdout is its answer, which may rightly show an
    id, as ``ckan webhooks list`` does) is kept in a log file too."""
    if _cli_log:
        return
    path = processes.LOGS / f"cli-stderr-{int(time.time() * 1000)}.log"
    _cli_log.append(path)
    run = subprocess.run

    def keep(argv, stderr) -> None:
        if isinstance(argv, (list, tuple)) and argv and str(argv[0]).endswith("/ckan") \
                and stderr:
            with open(path, "ab") as log:
                log.write(stderr if isinstance(stderr, bytes) else stderr.encode())

    def tee(*args, **kwargs):
        argv = args[0] if args else kwargs.get("args")
        try:
            result = run(*args, **kwargs)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as failed:
            keep(argv, failed.stderr)
            raise
        keep(argv, result.stderr)
        return result
    subprocess.run = tee


# --- the search --------------------------------------------------------------

def logs_since(started: float, root: Path = processes.ARTIFACTS) -> list[Path]:
    """Every log file under the run's artifacts written since ``started``
    (earlier runs' logs stay there: not this session's). Screenshots and the
    JUnit report are not logs."""
    return sorted(path for path in root.rglob("*") if path.is_file()
                  and path.suffix not in (".png", ".xml")
                  and path.stat().st_mtime >= started - 1)


def session_logs() -> list[Path]:
    return logs_since(_started["at"])


def search(paths: Iterable[Path], hook_ids: Iterable[str]) -> list[Find]:
    """Where any of ``hook_ids`` occurs in ``paths``, anywhere in a line (also
    inside a longer token), access-log request lines excepted."""
    from ckanext.webhooks.ids import fingerprint
    by_prefix: dict[str, list[str]] = {}
    short = set()
    for hook_id in hook_ids:
        if len(hook_id) < PREFIX:
            short.add(hook_id)  # never made by the product or the suite; whole tokens only
        else:
            by_prefix.setdefault(hook_id[:PREFIX], []).append(hook_id)
    finds = []
    for path in paths:
        with open(path, errors="replace") as handle:
            for number, line in enumerate(handle, 1):
                line = ANSI.sub("", line)
                access = ACCESS_LINE.match(line)
                if access:
                    line = access["head"] + access["tail"]
                found = set()
                for run in ID_RUN.finditer(line):
                    token = run.group()
                    for start in range(len(token) - PREFIX + 1):
                        for hook_id in by_prefix.get(token[start:start + PREFIX], ()):
                            if token.startswith(hook_id, start):
                                found.add(hook_id)
                if short:
                    found |= short.intersection(re.findall(r"[A-Za-z0-9_-]+", line))
                finds += [Find(path, number, fingerprint(hook_id)) for hook_id in sorted(found)]
    return finds


def check() -> tuple[list[str], str]:
    """(problems, summary) for this session; no problem: nothing leaked."""
    if "at" not in _started:
        return [], "hook-id audit: no test ran"
    keep_process_log()
    _started["handler"].flush()
    ids = recorded()
    paths = session_logs()
    problems = [f"{find.path}:{find.line}: {find.fingerprint}"
                for find in search(paths, ids)]
    unrecorded = _unrecorded_hooks()
    if unrecorded:
        problems.append("the audit trigger was missing: " + (
            "it is not on the webhooks table" if unrecorded < 0
            else f"{unrecorded} hook(s) in the table were never recorded"))
    if ids and not paths:
        problems.append(f"no log of this session found under {processes.ARTIFACTS}")
    summary = (f"hook-id audit: {len(ids)} hook id(s) created by this session, searched for "
               f"in {len(paths)} log file(s)")
    return problems, summary
