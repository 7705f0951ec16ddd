"""The ckan CLI as a site admin runs it: migrations up and down, the worker
command, and ckanapi's command line against a live CKAN."""
from __future__ import annotations

import json
import subprocess
import uuid

import ckanapi
import pytest
import sqlalchemy as sa

from . import hook_id_audit, processes

CKAN = str(processes.BIN / "ckan")
# A database of its own per CKAN version (their core schemas differ). A test
# slot's ini is .run/test-slotN-2.11.ini.
MIGRATIONS_DB = "postgresql://ckan_webhooks:ckan_webhooks@127.0.0.1:5432/" + (
    "ckanext_webhooks_migrations_2_11" if processes.TEST_INI.name.endswith("2.11.ini")
    else "ckanext_webhooks_migrations")


MIGRATIONS = sorted((processes.ROOT / "ckanext" / "webhooks" / "migration" / "webhooks"
                     / "versions").glob("[0-9]*.py"))


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
        # CKAN's own check sees every migration as pending, and applies them.
        listed = _ckan(ini, "db", "pending-migrations").stdout
        assert f"{len(MIGRATIONS)} unapplied migrations for webhooks" in listed, listed
        applied = _ckan(ini, "db", "pending-migrations", "--apply").stdout
        assert f"{len(MIGRATIONS)} unapplied migrations for webhooks" in applied, applied
        assert {"webhooks", "webhooks_event", "webhooks_delivery"} <= _tables(MIGRATIONS_DB)
        left = _ckan(ini, "db", "pending-migrations").stdout
        assert "webhooks" not in left and "SUCCESS" in left, left
    finally:
        ini.unlink()


def test_upgrade_gives_topics_and_encrypts_secrets_and_downgrade_restores_them():
    """From migration 05 (one topic, secrets in clear) to the head: the topic
    becomes ``topics``, every secret is encrypted (with the key derived from
    the ini's SECRET_KEY, as this process has it); a downgrade to 06 brings
    the secrets back in clear, and to 05 the topic."""
    from ckanext.webhooks import crypto
    ini = processes.write_ini({"sqlalchemy.url": MIGRATIONS_DB})
    engine = sa.create_engine(MIGRATIONS_DB)
    secret, hook_id = "whsec_" + "QUJD" * 8, f"mig-{uuid.uuid4().hex}"
    hook_id_audit.record(hook_id)  # a database of its own: no trigger records it
    try:
        _ckan(ini, "db", "init")
        _ckan(ini, "db", "downgrade", "-p", "webhooks")
        _ckan(ini, "db", "upgrade", "-p", "webhooks", "-v", "5e2f8b0d3c71")
        with engine.begin() as conn:
            conn.execute(sa.text("""
                INSERT INTO webhooks (id, topic, address, host, secret, created)
                VALUES (:id, 'dataset/update', 'http://127.0.0.2/m', '127.0.0.2', :s, now())
            """), {"id": hook_id, "s": secret})
        _ckan(ini, "db", "upgrade", "-p", "webhooks")
        with engine.connect() as conn:
            topics, stored = conn.execute(sa.text(
                "SELECT topics, secret FROM webhooks WHERE id = :id"), {"id": hook_id}).one()
        assert topics == ["dataset/update"]
        assert stored != secret and "whsec_" not in stored
        assert crypto.unseal(stored) == secret
        _ckan(ini, "db", "downgrade", "-p", "webhooks", "-v", "8a3c5e7f1b92")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT secret FROM webhooks WHERE id = :id"),
                                {"id": hook_id}).scalar() == secret
        _ckan(ini, "db", "downgrade", "-p", "webhooks", "-v", "5e2f8b0d3c71")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT topic FROM webhooks WHERE id = :id"),
                                {"id": hook_id}).scalar() == "dataset/update"
        _ckan(ini, "db", "upgrade", "-p", "webhooks")
    finally:
        engine.dispose()
        ini.unlink()


def test_the_ckan_command_finds_the_webhooks_group():
    """The real ``ckan`` entry point lists every command (each one's own help
    is checked in-process by test_cli_commands)."""
    result = _ckan(processes.TEST_INI, "webhooks", "--help")
    assert "Usage:" in result.stdout
    listed = {line.split()[0] for line in result.stdout.split("Commands:")[1].splitlines()
              if line.strip()}
    assert listed == {"worker", "list", "show", "update", "pause", "resume", "recover", "delete",
                      "ping",
                      "prune", "stats", "health", "redeliver", "export", "import",
                      "new-key", "rotate-key"}
    version = _ckan(processes.TEST_INI, "webhooks", "--version").stdout
    from ckanext.webhooks import __version__
    assert version.strip() == f"ckanext-webhooks, version {__version__}"


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
    """A hook a rule paused past its grace (7 days), an attempt and a
    fanned-out event past their retention (30 days): removed and counted;
    a healthy hook and its recent attempt stay."""
    from ckan import model
    from ckanext.webhooks.ids import fingerprint
    paused, kept = f"hook-{uuid.uuid4().hex}", f"hook-{uuid.uuid4().hex}"
    event = f"msg_{uuid.uuid4().hex}"
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO webhooks (id, topics, address, host, site, created, active, paused_at,
                                  pause_reason)
            VALUES (:paused, ARRAY['dataset/create'], 'http://127.0.0.2/p', '127.0.0.2',
                    '127.0.0.2', now() - interval '40 days', false,
                    now() - interval '8 days', 'only failures for 5 days'),
                   (:kept, ARRAY['dataset/create'], 'http://127.0.0.2/k', '127.0.0.2',
                    '127.0.0.2', now() - interval '40 days', true, NULL, NULL);
            INSERT INTO webhooks_event (id, topic, object_id, created, fanned_out)
            VALUES (:event, 'dataset/create', 'x', now() - interval '40 days',
                    now() - interval '31 days');
        """), {"paused": paused, "kept": kept, "event": event})
        old, recent = conn.execute(sa.text("""
            INSERT INTO webhooks_attempt (hook_id, event_id, topic, at, attempt, status,
                                          duration_ms)
            VALUES (:kept, :event, 'dataset/create', now() - interval '31 days', 1, 200, 5),
                   (:kept, :event, 'dataset/create', now() - interval '29 days', 2, 200, 5)
            RETURNING id"""), {"kept": kept, "event": event}).scalars().all()
    result = _ckan(processes.TEST_INI, "webhooks", "prune")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report) == {"paused_stale_hooks", "deleted_paused_hooks", "old_events",
                           "old_attempts"}
    assert report["deleted_paused_hooks"] >= 1
    assert report["old_events"] >= 1 and report["old_attempts"] >= 1
    with model.meta.engine.connect() as conn:
        hooks = set(conn.execute(sa.text("SELECT id FROM webhooks WHERE id IN (:p, :k)"),
                                 {"p": paused, "k": kept}).scalars())
        attempts = set(conn.execute(sa.text(
            "SELECT id FROM webhooks_attempt WHERE hook_id = :k"), {"k": kept}).scalars())
        events = conn.execute(sa.text("SELECT count(*) FROM webhooks_event WHERE id = :e"),
                              {"e": event}).scalar()
    assert hooks == {kept} and attempts == {recent} and events == 0
    # Logged by its fingerprint, never by its id.
    assert fingerprint(paused) in result.stderr and paused not in result.stdout + result.stderr


def test_stale_hooks_are_paused_and_reported(webhooks_tables, live_ckan):
    """A hook answering nothing but failures for stale_after_days is paused by
    the pruning task (run here through the CLI); healthy hooks stay active."""
    from ckan import model
    client = ckanapi.RemoteCKAN(live_ckan)
    stale, fresh, healthy = (f"hook-{uuid.uuid4().hex}" for _ in range(3))
    with model.meta.engine.begin() as conn:
        for hook_id, failing in ((stale, "now() - interval '6 days'"),
                                 (fresh, "now() - interval '1 day'"), (healthy, "NULL")):
            conn.execute(sa.text(f"""
                INSERT INTO webhooks (id, topics, address, host, site, created, failing_since)
                VALUES (:id, ARRAY['dataset/create'], :address, '127.0.0.2', '127.0.0.2', now(),
                        {failing})
            """), {"id": hook_id, "address": f"http://127.0.0.2/{hook_id}"})
    result = _ckan(processes.TEST_INI, "webhooks", "prune")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["paused_stale_hooks"] >= 1
    assert client.action.webhook_show(id=stale)["paused"]["by"] == "rule"
    assert client.action.webhook_show(id=fresh)["active"] is True
    assert client.action.webhook_show(id=healthy)["active"] is True
    # Logged by its fingerprint, never by its id.
    from ckanext.webhooks.ids import fingerprint
    assert fingerprint(stale) in result.stderr and stale not in result.stdout + result.stderr


BAD_REMOTE = [
    ({"topic": "dataset/create"}, ckanapi.ValidationError),
    ({"topic": "nope", "address": "http://127.0.0.2/x"}, ckanapi.ValidationError),
    ({"topic": "dataset/create", "address": "ftp://127.0.0.2/x"}, ckanapi.ValidationError),
    ({"topic": "dataset/create", "address": ["http://127.0.0.2/x"]}, ckanapi.ValidationError),
    ({"topic": "dataset/create", "address": "http://10.0.0.1/x"}, ckanapi.ValidationError),
    ({"topic": "dataset/create", "address": "http://127.0.0.2/" + "x" * 2100},
     ckanapi.ValidationError),
]


@pytest.mark.parametrize("data,error", BAD_REMOTE)
def test_ckanapi_remote_gets_clear_errors(live_ckan, data, error):
    from ckan import model
    client = ckanapi.RemoteCKAN(live_ckan)
    before = model.Session.execute(sa.text("SELECT count(*) FROM webhooks")).scalar()
    with pytest.raises(error) as raised:
        client.action.webhook_create(**data)
    assert raised.value.error_dict
    with pytest.raises(ckanapi.NotFound):
        client.action.webhook_show(id="x" * 43)
    with pytest.raises(ckanapi.NotFound):
        client.action.webhook_delete(id="x" * 43)
    after = model.Session.execute(sa.text("SELECT count(*) FROM webhooks")).scalar()
    model.Session.remove()
    assert after == before
