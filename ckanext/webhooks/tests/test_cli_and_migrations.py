"""The ckan CLI as a site admin runs it: migrations up and down, the worker
command, and ckanapi's command line against a live CKAN."""
from __future__ import annotations

import json
import subprocess
import uuid

import sqlalchemy as sa

from . import processes

CKAN = str(processes.BIN / "ckan")
MIGRATIONS_DB = "postgresql://ckan_webhooks:ckan_webhooks@127.0.0.1:5432/ckanext_webhooks_migrations"


def _ckan(ini, *args, check=True):
    return subprocess.run([CKAN, "-c", str(ini), *args], capture_output=True, text=True,
                          check=check, timeout=180)


def _tables(url) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.execute(sa.text(
                "SELECT tablename FROM pg_tables WHERE tablename LIKE 'webhooks%'")).scalars())
    finally:
        engine.dispose()


def test_db_upgrade_and_downgrade_in_a_database_of_its_own():
    ini = processes.write_ini({"sqlalchemy.url": MIGRATIONS_DB})
    try:
        _ckan(ini, "db", "init")
        _ckan(ini, "db", "upgrade", "-p", "webhooks")
        assert {"webhooks", "webhooks_event", "webhooks_delivery",
                "webhooks_alembic_version"} <= _tables(MIGRATIONS_DB)
        _ckan(ini, "db", "downgrade", "-p", "webhooks")
        assert _tables(MIGRATIONS_DB) <= {"webhooks_alembic_version"}
        _ckan(ini, "db", "upgrade", "-p", "webhooks")
        assert {"webhooks", "webhooks_event", "webhooks_delivery"} <= _tables(MIGRATIONS_DB)
        pending = _ckan(ini, "db", "pending-migrations", "--apply", check=False)
        assert "webhooks" not in pending.stdout
    finally:
        ini.unlink()


def test_every_webhooks_command_has_help():
    for args in (["webhooks", "--help"], ["webhooks", "worker", "--help"],
                 ["webhooks", "prune", "--help"], ["webhooks", "list", "--help"]):
        result = _ckan(processes.TEST_INI, *args)
        assert "Usage:" in result.stdout


def test_ckanapi_command_line_against_a_live_ckan(live_ckan, receiver):
    ckanapi = str(processes.BIN / "ckanapi")
    address = receiver.url(f"/cli-{uuid.uuid4().hex[:8]}")
    created = subprocess.run([ckanapi, "action", "webhook_create", "topic=dataset/update",
                              f"address={address}", "-r", live_ckan],
                             capture_output=True, text=True, check=True, timeout=60)
    hook = json.loads(created.stdout)
    assert isinstance(hook, str) and len(hook) >= 43
    shown = subprocess.run([ckanapi, "action", "webhook_show", f"id={hook}", "-r", live_ckan],
                           capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(shown.stdout)["address"] == address
    subprocess.run([ckanapi, "action", "webhook_delete", f"id={hook}", "-r", live_ckan],
                   capture_output=True, text=True, check=True, timeout=60)
    gone = subprocess.run([ckanapi, "action", "webhook_show", f"id={hook}", "-r", live_ckan],
                          capture_output=True, text=True, timeout=60)
    assert gone.returncode != 0 and "NotFound" in (gone.stdout + gone.stderr)
    bad = subprocess.run([ckanapi, "action", "webhook_create", "topic=nope",
                          f"address={address}", "-r", live_ckan],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "ValidationError" in (bad.stdout + bad.stderr)


def test_prune_command_reports_what_it_removed(webhooks_tables):
    result = _ckan(processes.TEST_INI, "webhooks", "prune")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"stale_hooks", "old_events"}
