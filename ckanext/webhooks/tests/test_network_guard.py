"""The test network guard where it matters: in the processes the suite starts.

Every process the suite starts loads ``tests/netguard/sitecustomize.py``
(conftest.py puts it first on PYTHONPATH), which refuses any connection
beyond 127.0.0.0/8 and ::1 before the socket connects, and records each
refusal in the file named by ``$WEBHOOKS_NETGUARD_LOG``; the suite's
``pytest_sessionfinish`` (conftest.py) turns any record there into a failed
run. Here a CKAN server and a worker, started by ``processes.start_ckan`` and
``processes.start_worker`` as the suite starts its own, are let through by
the product (``allowed_networks`` names the target) so that only the guard
stands between them and 192.0.2.1 (TEST-NET-1, RFC 5737: documentation only,
never routed; no packet is meant to reach it, and the guard's record shows
none was sent). Their records go to a log of this test's, read by the same
check: the suite's own log would fail this very run.
"""
from __future__ import annotations

import os
import types
import uuid
from pathlib import Path

import ckanapi
import pytest
import sqlalchemy as sa

from ckan import model

from . import processes
from .waiting import settled

TARGET = "192.0.2.1"

pytestmark = pytest.mark.usefixtures("no_leftover_hooks")


@pytest.fixture
def guarded_stack(webhooks_tables, only_my_workers, tmp_path):
    """(CKAN url, CKAN process, worker process, their guard log)."""
    log = tmp_path / "netguard-violations.log"
    env = {"WEBHOOKS_NETGUARD_LOG": str(log)}
    port = processes.free_port()
    ini = processes.write_ini({
        "ckan.site_url": f"http://127.0.0.1:{port}",
        "ckanext.webhooks.celery.queue": f"netguard-{uuid.uuid4().hex[:8]}",
        "ckanext.webhooks.allowed_networks": f"127.0.0.2/32 127.0.0.3/32 {TARGET}/32",
        # The hook is stored without the handshake: the ping is CKAN's connection.
        "ckanext.webhooks.verify_on_create": "false",
        "ckanext.webhooks.retry_schedule": "0",  # one attempt, then given up
    })
    web = processes.start_ckan(ini, port, env=env)
    try:
        worker = processes.start_worker(ini, concurrency=1, name="worker-netguard", env=env)
    except BaseException:
        web.stop()
        raise
    yield f"http://127.0.0.1:{port}", web, worker, log
    worker.stop()
    web.stop()


def _records(log: Path) -> list[tuple[int, str]]:
    """(pid, what) of each refusal the guard recorded."""
    if not log.exists():
        return []
    return [(int(pid), what) for pid, _, what in
            (line.partition(" ") for line in log.read_text().splitlines())]


def _session_finish_check(config):
    """The suite's own pytest_sessionfinish, as pytest registered it."""
    conftest = Path(__file__).with_name("conftest.py")
    [check] = [impl.function for impl in config.pluginmanager.hook.pytest_sessionfinish
               .get_hookimpls() if Path(getattr(impl.plugin, "__file__", "")) == conftest]
    return check


def test_ckan_and_worker_started_by_the_suite_are_refused_beyond_loopback_and_fail_the_run(
        guarded_stack, sysadmin_token, organization, request, monkeypatch, tmp_path):
    """CKAN's ping and the worker's delivery to 192.0.2.1 each end as a
    ``connect_error``: the guard in that very process refused the connection,
    as its record (with that process's pid) says. The guard records and
    raises instead of calling the real ``connect``, so no packet left. Those
    records fail the run, and an empty log does not."""
    url, web, worker, log = guarded_stack
    suite_log = Path(os.environ["WEBHOOKS_NETGUARD_LOG"])
    suite_records_before = _records(suite_log)
    anon = ckanapi.RemoteCKAN(url)
    admin = ckanapi.RemoteCKAN(url, apikey=sysadmin_token["token"])
    dataset = admin.action.package_create(name=f"netguard-{uuid.uuid4().hex[:10]}",
                                          owner_org=organization["id"])
    hook = anon.action.webhook_create(topic="dataset/update", dataset=dataset["id"],
                                      address=f"http://{TARGET}:8080/hook")
    assert _records(log) == []  # storing the hook connected to nothing

    ping = anon.action.webhook_ping(id=hook)
    assert (ping["ok"], ping["status"], ping["error"]) == (False, None, "connect_error")
    [(pid, what)] = _records(log)
    assert what == f"connect to {TARGET}" and pid in web.pids()

    admin.action.package_patch(id=dataset["id"], notes="changed")
    settled(packages=[dataset["id"]])
    with model.meta.engine.connect() as conn:
        attempts = conn.execute(sa.text(
            "SELECT topic, status, error FROM webhooks_attempt WHERE hook_id = :h ORDER BY id"),
            {"h": hook}).all()
    assert [tuple(a) for a in attempts] == [("ping", None, "connect_error"),
                                            ("dataset/update", None, "connect_error")]
    [_, (pid, what)] = _records(log)
    assert what == f"connect to {TARGET}" and pid in worker.pids()

    # The suite's check fails the run on these records, and only on records.
    check = _session_finish_check(request.config)
    session = types.SimpleNamespace(exitstatus=0)
    monkeypatch.setenv("WEBHOOKS_NETGUARD_LOG", str(log))
    check(session, 0)
    assert session.exitstatus == 1
    empty = tmp_path / "empty.log"
    empty.write_text("")
    monkeypatch.setenv("WEBHOOKS_NETGUARD_LOG", str(empty))
    session = types.SimpleNamespace(exitstatus=0)
    check(session, 0)
    assert session.exitstatus == 0
    # This test's refusals stayed out of the suite's own log.
    assert _records(suite_log) == suite_records_before
