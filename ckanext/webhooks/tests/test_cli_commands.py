"""``ckan webhooks ...`` through click's runner (test_cli_and_migrations.py
runs the real ``ckan`` executable)."""
from __future__ import annotations

import base64
import json
import os

import pytest
import sqlalchemy as sa

from ckan import model
from ckan.cli.cli import ckan
from ckan.plugins import toolkit
from ckan.tests import helpers
from cryptography.fernet import Fernet
from standardwebhooks.webhooks import Webhook as Verifier

from ckanext.webhooks import crypto
from ckanext.webhooks.model import Webhook

PASSPHRASE = "correct horse battery staple"


def _run(cli, *args, ok=True):
    result = cli.invoke(ckan, ["webhooks", *args])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def _hooks(receiver, count=3):
    return [helpers.call_action("webhook_create", topic=topic,
                                address=receiver.url(f"/cli/{n}"))
            for n, topic in enumerate(["dataset/create", "dataset/update",
                                       "resource/create"][:count])]


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestCommands:
    def test_every_command_has_help(self, cli):
        for command in ("worker", "list", "show", "update", "pause", "resume", "recover",
                        "delete", "ping", "prune", "stats", "health", "redeliver", "export",
                        "import", "new-key", "rotate-key"):
            assert "Usage:" in _run(cli, command, "--help").output

    def test_list_show_delete(self, cli, receiver):
        hooks = _hooks(receiver)
        listed = [json.loads(line) for line in _run(cli, "list").output.splitlines()]
        assert [h["id"] for h in listed] == hooks
        only = [json.loads(line) for line in
                _run(cli, "list", "--topic", "dataset/update").output.splitlines()]
        assert [h["id"] for h in only] == [hooks[1]]
        assert _run(cli, "list", "--host", "127.0.0.3").output == ""
        assert len(_run(cli, "list", "--state", "healthy").output.splitlines()) == 3
        assert json.loads(_run(cli, "show", hooks[0]).output)["topic"] == "dataset/create"
        _run(cli, "delete", hooks[0])
        assert model.Session.get(Webhook, hooks[0]) is None
        missing = _run(cli, "show", hooks[0], ok=False)
        assert missing.exit_code != 0 and "No webhook" in missing.output

    def test_ping_and_stats(self, cli, receiver):
        [hook] = _hooks(receiver, 1)
        outcome = json.loads(_run(cli, "ping", hook).output)
        assert outcome["ok"] is True
        assert [r.json["topic"] for r in receiver.requests] == ["ping"]
        stats = json.loads(_run(cli, "stats").output)
        assert stats["hooks"] == 1 and stats["by_topic"] == {"dataset/create": 1}
        assert stats["attempts_24h"] == 1 and stats["success_rate_24h"] == 1.0

    def test_redeliver_failed_since(self, cli, receiver):
        [hook] = _hooks(receiver, 1)
        with model.meta.engine.begin() as conn:
            conn.execute(sa.text("""
                INSERT INTO webhooks_event (id, topic, object_id, created, data, fanned_out)
                VALUES ('msg_failed', 'dataset/create', 'x', now(), '{"id": "x"}', now()),
                       ('msg_fine', 'dataset/create', 'y', now(), '{"id": "y"}', now());
                INSERT INTO webhooks_attempt (hook_id, event_id, topic, at, attempt, status,
                                              duration_ms)
                VALUES (:h, 'msg_failed', 'dataset/create', now(), 1, 503, 5),
                       (:h, 'msg_fine', 'dataset/create', now(), 1, 200, 5)
            """), {"h": hook})
        result = _run(cli, "redeliver", "--since", "2000-01-01T00:00:00")
        assert "queued 1" in result.output
        queued = model.Session.execute(sa.text(
            "SELECT event_id FROM webhooks_delivery WHERE hook_id = :h"), {"h": hook}).scalars()
        assert list(queued) == ["msg_failed"]

    def test_export_then_import_keeps_ids_secrets_and_verifies(self, cli, receiver,
                                                              tmp_path):
        hooks = _hooks(receiver)
        secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        helpers.call_action("webhook_update", id=hooks[0], secret=secret)
        exported = tmp_path / "hooks.json"
        _run(cli, "export", "--output", str(exported), "--passphrase", PASSPHRASE)
        assert secret not in exported.read_text()
        data = json.loads(exported.read_text())
        assert data["secrets"]["kdf"] == "scrypt"
        assert [h["id"] for h in data["hooks"]] == hooks
        model.Session.execute(sa.text("DELETE FROM webhooks"))
        model.Session.commit()
        wrong = _run(cli, "import", str(exported), "--passphrase", "not the passphrase")
        refusals = json.loads(wrong.output.splitlines()[-1])["refused"]
        assert "does not decrypt" in refusals[0]["error"]
        model.Session.execute(sa.text("DELETE FROM webhooks"))
        model.Session.commit()
        receiver.verify_mode["/cli/2"] = "403"  # this receiver no longer wants it
        data["hooks"].append({"id": "x" * 43, "topics": ["dataset/create"],
                              "address": "http://127.0.0.1/not-allowed"})
        exported.write_text(json.dumps(data))
        before = len(receiver.verifications)
        report = json.loads(_run(cli, "import", str(exported), "--passphrase", PASSPHRASE)
                            .output.splitlines()[-1])
        assert report["imported"] == 2 and len(report["refused"]) == 2
        assert len(receiver.verifications) - before == 3  # 127.0.0.1 is never contacted
        assert {h.id for h in model.Session.query(Webhook)} == set(hooks[:2])
        assert crypto.unseal(model.Session.get(Webhook, hooks[0]).secret) == secret

    def test_an_export_of_0_1_0_imports(self, cli, receiver, tmp_path):
        secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        old = tmp_path / "old.json"
        old.write_text(json.dumps([{"id": "y" * 43, "topic": "dataset/update",
                                    "address": receiver.url("/old"), "secret": secret}]))
        report = json.loads(_run(cli, "import", str(old)).output.splitlines()[-1])
        assert report == {"imported": 1, "refused": []}
        hook = model.Session.get(Webhook, "y" * 43)
        assert hook.topics == ["dataset/update"] and crypto.unseal(hook.secret) == secret

    def test_secrets_are_encrypted_at_rest_and_rotate_key_re_encrypts(
            self, cli, receiver, monkeypatch):
        secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        hook = helpers.call_action("webhook_create", topic="dataset/create",
                                   address=receiver.url("/enc"), secret=secret)
        stored = model.Session.execute(sa.text(
            "SELECT secret FROM webhooks WHERE id = :h"), {"h": hook}).scalar()
        assert secret not in stored and secret[6:] not in stored
        table = model.Session.execute(sa.text("SELECT webhooks::text FROM webhooks")).scalars()
        assert not any(secret[6:] in row for row in table)
        key = _run(cli, "new-key").output.strip()
        monkeypatch.setitem(toolkit.config, "ckanext.webhooks.secret_keys", key)
        report = json.loads(_run(cli, "rotate-key").output.splitlines()[-1])
        assert report == {"rotated": 1, "unreadable": 0}
        model.Session.remove()
        rotated = model.Session.execute(sa.text(
            "SELECT secret FROM webhooks WHERE id = :h"), {"h": hook}).scalar()
        assert rotated != stored
        assert Fernet(key.encode()).decrypt(rotated.encode()).decode() == secret
        # The ping signs with it: the receiver can verify.
        assert json.loads(_run(cli, "ping", hook).output)["ok"] is True
        [ping] = receiver.on("/enc")
        Verifier(secret).verify(ping.body, ping.headers)
