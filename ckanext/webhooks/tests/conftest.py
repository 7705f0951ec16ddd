"""Fixtures: real PostgreSQL and Redis, a real Celery worker, a real CKAN
server and real HTTP receivers, all on loopback. Only Solr is a stand-in."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
import signal
import subprocess

import pytest
import redis

from ckan.plugins import toolkit
from ckan.tests import factories

from . import hook_id_audit, processes
from .receiver import Receiver


_solr = None
NETGUARD = Path(__file__).parent / "netguard"


def pytest_configure(config):
    """Before CKAN's pytest plugin loads CKAN: the network guard and the DNS
    stand-in (here and in every process the suite starts) and the Solr stand-in."""
    global _solr
    log = Path(tempfile.mkdtemp(prefix="webhooks-netguard-")) / "violations.log"
    os.environ["WEBHOOKS_NETGUARD_LOG"] = str(log)
    standin = log.with_name("dns-standin.json")
    standin.write_text("{}")
    os.environ["WEBHOOKS_DNS_STANDIN"] = str(standin)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(NETGUARD), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(NETGUARD))
    sys.modules.pop("sitecustomize", None)  # Debian's python3 imported its own at start-up
    import sitecustomize  # noqa: F401 - installs the guard in this process
    sitecustomize.install()
    _solr = processes.start_solr_standin(int(os.environ.get("WEBHOOKS_SOLR_PORT") or 18983))


@pytest.hookimpl(trylast=True)  # after the session's fixtures stopped their processes
def pytest_sessionfinish(session, exitstatus):
    """Any attempt to reach beyond loopback fails the run, wherever it happened;
    so does a hook id this session created in any log it wrote (hook_id_audit)."""
    log = Path(os.environ.get("WEBHOOKS_NETGUARD_LOG", "/nonexistent"))
    if log.exists() and log.read_text().strip():
        sys.stderr.write("\nNETWORK GUARD: attempts to leave loopback:\n" + log.read_text())
        session.exitstatus = 1
    problems, summary = hook_id_audit.check()
    sys.stderr.write(f"\n{summary}: {len(problems) or 'no'} problem(s)\n")
    if problems:
        sys.stderr.write("HOOK IDS IN LOGS, or not all recorded (file:line: the id's "
                         "fingerprint):\n" + "\n".join(problems) + "\n")
        session.exitstatus = 1


def pytest_unconfigure(config):
    if _solr is not None:
        _solr.stop()


@pytest.fixture(scope="session", autouse=True)
def audit_hook_ids():
    """Every hook id this session creates is recorded (hook_id_audit)."""
    hook_id_audit.start()


@pytest.fixture(autouse=True)
def _keep_process_log():
    hook_id_audit.keep_process_log()


@pytest.fixture(scope="session", autouse=True)
def empty_test_queue():
    """Messages left in the test broker by an earlier run must not leak in."""
    redis.Redis.from_url(toolkit.config["ckan.redis.url"]).flushdb()


_built_app: dict = {}


@pytest.fixture
def app(make_app, ckan_config):
    """CKAN's test app, built again only when the configuration changed: a build
    takes 0.3-0.5 s, and most tests share one configuration (CKAN's own
    fixture builds one per test)."""
    key = repr(sorted((k, repr(v)) for k, v in ckan_config.items()))
    if _built_app.get("key") != key:
        _built_app.update(key=key, app=make_app())
    return _built_app["app"]


@pytest.fixture
def clean_db(with_plugins, reset_db, migrate_db_for, audit_hook_ids):
    reset_db()
    migrate_db_for("webhooks")
    hook_id_audit.watch()  # the table may be new
    hook_id_audit.keep_process_log()  # migrating reconfigured logging


@pytest.fixture(scope="session")
def webhooks_tables(reset_db, audit_hook_ids):
    """The schema exists before any long-lived process starts."""
    reset_db()
    subprocess.run([str(processes.BIN / "ckan"), "-c", str(processes.TEST_INI),
                    "db", "upgrade", "-p", "webhooks"], check=True, capture_output=True)
    hook_id_audit.watch()  # the table may be new
    hook_id_audit.keep_process_log()  # migrating reconfigured logging


@pytest.fixture
def receiver():
    server = Receiver().start()
    yield server
    server.stop()


_session_workers: list = []


@pytest.fixture(scope="session")
def worker(webhooks_tables):
    proc = processes.start_worker()
    _session_workers.append(proc)
    yield proc
    _session_workers.remove(proc)
    proc.stop()


@pytest.fixture
def only_my_workers():
    """Freeze the suite's shared worker (SIGSTOP), for tests whose own workers
    must be the only ones draining the shared database."""
    for proc in _session_workers:
        os.killpg(proc.proc.pid, signal.SIGSTOP)
    yield
    for proc in _session_workers:
        os.killpg(proc.proc.pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def live_ckan(webhooks_tables):
    proc = processes.start_ckan()
    yield toolkit.config["ckan.site_url"]
    proc.stop()


@pytest.fixture
def sysadmin_token():
    """A sysadmin and an API token for it, created in the real database."""
    sysadmin = factories.Sysadmin(image_url="")
    token = factories.APIToken(user=sysadmin["name"])
    return {"user": sysadmin, "token": token["token"]}


@pytest.fixture
def organization(sysadmin_token):
    # No image: factories link a random one on the internet, which a page would load.
    return factories.Organization(user=sysadmin_token["user"], image_url="")


@pytest.fixture
def private_stack(webhooks_tables, only_my_workers):
    """Start a CKAN server and workers with config overrides (while the suite's
    shared worker is frozen); stop them after."""
    started = []

    def start(overrides: dict, worker: bool = True, web: bool = True):
        web_port = processes.free_port()
        ini = processes.write_ini({"ckan.site_url": f"http://127.0.0.1:{web_port}",
                                   **overrides})
        if web:
            started.append(processes.start_ckan(ini, web_port))
        proc = None
        if worker:
            proc = processes.start_worker(ini, concurrency=1, name="worker-private")
            started.append(proc)
        return f"http://127.0.0.1:{web_port}", ini, proc
    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def rabbitmq():
    if not processes.port_open(5672):
        pytest.fail("RabbitMQ is not running on 127.0.0.1:5672: run scripts/stack services")
    return "amqp://guest:guest@127.0.0.1:5672//"


@pytest.fixture
def no_leftover_hooks(webhooks_tables):
    """Hooks of earlier tests point at receivers that are gone: drop them, so
    that the workers of this test deliver to this test's receivers only."""
    from ckan import model
    import sqlalchemy as sa
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM webhooks"))
    yield
    model.Session.remove()


@pytest.fixture
def anon(live_ckan):
    """An anonymous ckanapi client of the live CKAN."""
    import ckanapi
    return ckanapi.RemoteCKAN(live_ckan)


@pytest.fixture
def admin(live_ckan, sysadmin_token):
    """A sysadmin's ckanapi client of the live CKAN."""
    import ckanapi
    return ckanapi.RemoteCKAN(live_ckan, apikey=sysadmin_token["token"])
