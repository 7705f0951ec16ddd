"""Subscriptions as webhook users expect them: several topics and wildcards,
webhook_update, pause and resume, pausing rules with a grace period, and
secret rotation. On the real stack: a CKAN server, the suite's Celery worker,
receivers on 127.0.0.2, driven through ckanapi."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import functools
import uuid
from pathlib import Path

import ckanapi
import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook as Verifier, WebhookVerificationError

from ckan import model

from . import processes
from .waiting import settled, until

pytestmark = pytest.mark.usefixtures("no_leftover_hooks")


def _name() -> str:
    return f"lc-{uuid.uuid4().hex[:12]}"


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


_wait_until = functools.partial(until, timeout=20.0, interval=0.1)


def _sql(statement: str, **params):
    with model.meta.engine.begin() as conn:
        result = conn.execute(sa.text(statement), params)
        return result.all() if result.returns_rows else result.rowcount


def _ckan_command(*args: str) -> dict:
    """``ckan -c <test ini> ...``, its last output line as JSON."""
    ckan = str(Path(sys.executable).parent / "ckan")
    result = subprocess.run([ckan, "-c", str(processes.TEST_INI), *args], capture_output=True,
                            text=True, check=True, timeout=180)
    return json.loads(result.stdout.strip().splitlines()[-1])


def _fanned_out(dataset_id: str) -> int:
    """Events of the dataset that have been fanned out (their deliveries queued)."""
    return _sql("SELECT count(*) FROM webhooks_event WHERE package_id = :p "
                "AND fanned_out IS NOT NULL", p=dataset_id)[0][0]


# --- several topics, wildcards ----------------------------------------------------

@pytest.mark.usefixtures("worker")
class TestTopics:
    def test_one_hook_with_two_topics_hears_both_and_nothing_else(
            self, anon, admin, receiver, organization):
        hook = anon.action.webhook_create(topics=["dataset/create", "dataset/delete"],
                                          address=receiver.url("/two"))
        every = anon.action.webhook_create(topic="dataset/*", address=receiver.url("/every"))
        assert len(receiver.verifications) == 2  # one handshake per hook
        shown = anon.action.webhook_show(id=hook)
        assert shown["topics"] == ["dataset/create", "dataset/delete"] and "topic" not in shown
        assert anon.action.webhook_show(id=every)["topic"] == "dataset/*"
        dataset = admin.action.package_create(name=_name(), owner_org=organization["id"])
        admin.action.package_patch(id=dataset["id"], title="Changed")
        # (An update still unsent when the dataset is deleted is withheld: the
        # delete says it all. Let it arrive first.)
        receiver.wait_count("/every", 2)
        admin.action.package_delete(id=dataset["id"])
        # The wildcard hook hears all three; the two-topic hook the create and the delete.
        received = receiver.wait_count("/every", 3)
        assert [r.json["topic"] for r in received] == [
            "dataset/create", "dataset/update", "dataset/delete"]
        receiver.wait_count("/two", 2)
        # All three events are settled (the update too: the wildcard hook got
        # it): the two-topic hook got, and its log holds, the create and the
        # delete alone.
        assert len(settled(packages=[dataset["id"]])) == 3
        assert [r.json["topic"] for r in receiver.on("/two")] == ["dataset/create",
                                                                  "dataset/delete"]
        assert [r.json["topic"] for r in receiver.on("/every")] == [
            "dataset/create", "dataset/update", "dataset/delete"]
        logged = anon.action.webhook_deliveries(id=hook)
        assert sorted(a["topic"] for a in logged) == ["dataset/create", "dataset/delete"]

    def test_resource_wildcard_hears_resources_only(self, anon, admin, receiver, organization):
        anon.action.webhook_create(topics=["resource/*"], address=receiver.url("/res"))
        anon.action.webhook_create(topics=["*"], address=receiver.url("/all"))
        dataset = admin.action.package_create(name=_name(), owner_org=organization["id"])
        resource = admin.action.resource_create(package_id=dataset["id"],
                                                url="http://a.test/r.csv")
        receiver.wait_count("/res", 1)  # (as for datasets: let the create arrive first)
        admin.action.resource_delete(id=resource["id"])
        receiver.wait_count("/res", 2)
        settled(packages=[dataset["id"]])  # all there is of them has arrived
        assert [r.json["topic"] for r in receiver.on("/res")] == ["resource/create",
                                                                  "resource/delete"]
        # (A resource change is a dataset/update too.)
        assert {r.json["topic"] for r in receiver.on("/all")} == {
            "dataset/create", "dataset/update", "resource/create", "resource/delete"}

    def test_overlapping_topics_on_one_address_are_refused(self, anon, receiver,
                                                           organization):
        address = receiver.url("/dup")
        first = anon.action.webhook_create(topics=["dataset/update"], address=address)
        for topics in (["dataset/*"], ["*"], ["resource/create", "dataset/update"]):
            with pytest.raises(ckanapi.ValidationError) as refused:
                anon.action.webhook_create(topics=topics, address=address)
            assert set(refused.value.error_dict) - {"__type"} == {"address"}
            assert first not in str(refused.value.error_dict)
        # No topic in common, or other filters: another subscription.
        anon.action.webhook_create(topics=["resource/*"], address=address)
        anon.action.webhook_create(topic="dataset/update", address=address,
                                   organization=organization["id"])

    @pytest.mark.parametrize("data, field", [
        ({}, "topic"),
        ({"topics": []}, "topics"),
        ({"topics": ["dataset/nothing"]}, "topics"),
        ({"topics": "dataset/*/x"}, "topics"),
        ({"topics": {"a": 1}}, "topics"),
        ({"topics": [1, 2]}, "topics"),
        ({"topics": ["dataset/create"] * 60}, "topics"),
        ({"topic": ["dataset/create"]}, "topic"),
        ({"topic": "data*"}, "topic"),
    ])
    def test_bad_topics_are_clear_errors_and_store_nothing(self, anon, receiver, data, field):
        before = _sql("SELECT count(*) FROM webhooks")[0][0]
        with pytest.raises(ckanapi.ValidationError) as refused:
            anon.action.webhook_create(address=receiver.url("/bad"), **data)
        assert field in refused.value.error_dict
        assert _sql("SELECT count(*) FROM webhooks")[0][0] == before
        assert receiver.verifications == []


# --- webhook_update ------------------------------------------------------------------

@pytest.mark.usefixtures("worker")
class TestUpdate:
    def test_address_change_is_verified_before_it_takes_effect(self, anon, admin, receiver,
                                                               organization):
        hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/old"))
        receiver.verify_mode["/refuses"] = "403"
        with pytest.raises(ckanapi.ValidationError) as refused:
            anon.action.webhook_update(id=hook, address=receiver.url("/refuses"))
        assert "address" in refused.value.error_dict
        with pytest.raises(ckanapi.ValidationError):
            anon.action.webhook_update(id=hook, address="http://169.254.169.254/latest")
        assert anon.action.webhook_show(id=hook)["address"] == receiver.url("/old")
        updated = anon.action.webhook_update(id=hook, address=receiver.url("/new"))
        assert updated["address"] == receiver.url("/new")
        assert [v.path for v in receiver.verifications] == ["/old", "/refuses", "/new"]
        dataset = admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_count("/new", 1)
        settled(packages=[dataset["id"]])
        [received] = receiver.on("/new")
        assert received.json["webhook_id"] == hook
        assert receiver.on("/old") == []

    def test_topics_and_filters_change_and_a_bad_field_changes_nothing(
            self, anon, admin, receiver, organization):
        # The datasets exist before the hook: their dataset/create events are
        # none of its business.
        dataset = admin.action.package_create(name=_name(), owner_org=organization["id"])
        other = admin.action.package_create(name=_name(), owner_org=organization["id"])
        hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/u"))
        shown = anon.action.webhook_show(id=hook)
        for bad in ({"topics": ["nope"]}, {"active": "maybe"}, {"dataset": "no-such-dataset"},
                    {"secret": "plain"}, {"address": ""}, {"colour": "red"}):
            with pytest.raises(ckanapi.ValidationError):
                anon.action.webhook_update(**{"id": hook, "topics": ["dataset/update"], **bad})
            assert anon.action.webhook_show(id=hook) == shown
        updated = anon.action.webhook_update(id=hook, topics=["dataset/update"],
                                             dataset=dataset["id"])
        assert updated["topics"] == ["dataset/update"]
        assert updated["filters"]["dataset"] == dataset["id"]
        admin.action.package_patch(id=other["id"], title="Not followed")
        admin.action.package_patch(id=dataset["id"], title="Followed")
        receiver.wait_count("/u", 1)
        settled(packages=[dataset["id"], other["id"]])
        [received] = receiver.on("/u")
        assert received.json["topic"] == "dataset/update"
        assert received.json["data"]["id"] == dataset["id"]
        # Removing the filter: every dataset again.
        assert anon.action.webhook_update(id=hook, dataset="")["filters"]["dataset"] is None

    def test_unknown_ids_are_404(self, anon):
        with pytest.raises(ckanapi.NotFound):
            anon.action.webhook_update(id="no-such-hook-" + uuid.uuid4().hex, active=False)


# --- pause and resume ------------------------------------------------------------------

@pytest.mark.usefixtures("worker")
class TestPause:
    def test_paused_hook_hears_nothing_and_resumes(self, anon, admin, receiver, organization):
        hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/p"))
        witness = anon.action.webhook_create(topic="dataset/create",
                                             address=receiver.url("/w"))
        paused = anon.action.webhook_update(id=hook, active=False)
        assert paused["state"] == "paused" and paused["paused"]["by"] == "owner"
        dataset = admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_count("/w", 1)
        # Fanned out and delivered to the witness; nothing queued or tried for it.
        assert _fanned_out(dataset["id"]) == 1
        assert _sql("SELECT count(*) FROM webhooks_delivery WHERE hook_id = :h", h=hook) \
            == [(0,)]
        assert anon.action.webhook_deliveries(id=hook) == []
        resumed = anon.action.webhook_update(id=hook, active=True)
        assert resumed["state"] == "healthy" and resumed["paused"] is None
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        [received] = receiver.wait_count("/p", 1)
        assert received.json["webhook_id"] == hook
        assert anon.action.webhook_show(id=witness)["active"] is True

    def test_pending_retries_are_held_while_paused(self, anon, admin, receiver, organization):
        receiver.scripts["/flaky"] = [503, 200]
        hook = anon.action.webhook_create(topic="dataset/create",
                                          address=receiver.url("/flaky"))
        # The first retry comes after 5 s: pause in between.
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_count("/flaky", 1)
        _wait_until(lambda: _sql("SELECT last_status FROM webhooks_delivery "
                                 "WHERE hook_id = :h AND claim_token IS NULL",
                                 h=hook) == [(503,)])
        anon.action.webhook_update(id=hook, active=False)
        assert _sql("SELECT due = 'infinity' FROM webhooks_delivery WHERE hook_id = :h",
                    h=hook) == [(True,)]
        assert anon.action.webhook_show(id=hook)["statistics"]["pending_deliveries"] == 1
        anon.action.webhook_update(id=hook, active=True)
        first, second = receiver.wait_count("/flaky", 2)
        assert second.json["event_id"] == first.json["event_id"]
        _wait_until(lambda: anon.action.webhook_show(id=hook)["statistics"]["successes"] == 1)

    def test_rules_pause_then_delete_after_the_grace_period(self, anon, receiver):
        owner_paused = anon.action.webhook_create(topic="dataset/create",
                                                  address=receiver.url("/mine"))
        anon.action.webhook_update(id=owner_paused, active=False)
        stale = anon.action.webhook_create(topic="dataset/create",
                                           address=receiver.url("/stale"))
        expired = anon.action.webhook_create(topic="dataset/create",
                                             address=receiver.url("/expired"))
        _sql("UPDATE webhooks SET failing_since = now() - interval '6 days' WHERE id = :h",
             h=stale)
        _sql("UPDATE webhooks SET active = false, pause_reason = 'answered 4xx 5 times', "
             "paused_at = now() - interval '8 days' WHERE id = :h", h=expired)
        _sql("UPDATE webhooks SET paused_at = now() - interval '80 days' WHERE id = :h",
             h=owner_paused)
        report = _ckan_command("webhooks", "prune")
        assert report["paused_stale_hooks"] >= 1 and report["deleted_paused_hooks"] >= 1
        shown = anon.action.webhook_show(id=stale)
        assert shown["state"] == "paused" and shown["paused"]["by"] == "rule"
        assert "only failures for 5 days" in shown["paused"]["reason"]
        with pytest.raises(ckanapi.NotFound):
            anon.action.webhook_show(id=expired)
        assert anon.action.webhook_show(id=owner_paused)["paused"]["by"] == "owner"
        # Resumed, the stale hook starts afresh.
        resumed = anon.action.webhook_update(id=stale, active=True)
        assert resumed["state"] == "healthy"
        assert resumed["statistics"]["failing_since"] is None


# --- recover ------------------------------------------------------------------------------

@pytest.mark.usefixtures("worker")
class TestRecover:
    def test_recover_sends_what_a_paused_hook_missed_with_the_original_ids(
            self, anon, admin, receiver, organization):
        started = _sql("SELECT now()")[0][0]
        # In the window, but made before the hook: never the hook's business.
        before = admin.action.package_create(name=_name(), owner_org=organization["id"])
        settled(packages=[before["id"]])
        hook = anon.action.webhook_create(topics=["dataset/create", "dataset/update"],
                                          address=receiver.url("/rec"))
        anon.action.webhook_create(topic="dataset/*", address=receiver.url("/w"))
        anon.action.webhook_update(id=hook, active=False)
        public = admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_count("/w", 1)
        admin.action.package_patch(id=public["id"], title="Changed while paused")
        admin.action.package_create(name=_name(), owner_org=organization["id"], private=True)
        witnessed = receiver.wait_count("/w", 2)
        anon.action.webhook_update(id=hook, active=True)
        # Nothing was queued for it while paused, so resuming sends nothing.
        assert _sql("SELECT count(*) FROM webhooks_delivery WHERE hook_id = :h", h=hook) \
            == [(0,)]
        assert anon.action.webhook_recover(id=hook, since=started.isoformat()) == {"queued": 2}
        recovered = receiver.wait_count("/rec", 2)
        # The private dataset is not in the anonymous reader's view: not sent.
        assert {r.headers["webhook-id"] for r in recovered} == \
            {r.headers["webhook-id"] for r in witnessed}
        assert sorted(r.json["topic"] for r in recovered) == ["dataset/create",
                                                              "dataset/update"]
        assert {r.json["data"]["id"] for r in recovered} == {public["id"]}
        _wait_until(lambda: anon.action.webhook_show(id=hook)["statistics"]["successes"] == 2)

    def test_bad_windows_are_clear_errors(self, anon, receiver):
        hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/x"))
        with pytest.raises(ckanapi.ValidationError) as too_old:
            anon.action.webhook_recover(id=hook, since="2000-01-01T00:00:00")
        assert "kept for 30 days" in str(too_old.value.error_dict["since"])
        with pytest.raises(ckanapi.ValidationError) as backwards:
            anon.action.webhook_recover(id=hook, since=_sql("SELECT now()")[0][0].isoformat(),
                                        until="2001-01-01T00:00:00")
        assert "until" in backwards.value.error_dict
        for bad in ({}, {"since": "yesterday"}, {"since": ["x"]}):
            with pytest.raises(ckanapi.ValidationError):
                anon.action.webhook_recover(id=hook, **bad)
        with pytest.raises(ckanapi.NotFound):
            anon.action.webhook_recover(id="no-such-" + uuid.uuid4().hex,
                                        since=_sql("SELECT now()")[0][0].isoformat())


# --- secret rotation ----------------------------------------------------------------------

@pytest.mark.usefixtures("worker")
class TestRotation:
    def test_both_secrets_verify_during_the_window_then_only_the_new(
            self, anon, admin, receiver, organization):
        old, new = _secret(), _secret()
        hook = anon.action.webhook_create(topic="dataset/create", address=receiver.url("/r"),
                                          secret=old)
        shown = anon.action.webhook_update(id=hook, secret=new)
        assert shown["signed"] is True and shown["previous_secret_until"]
        assert old not in str(shown) and new not in str(shown)
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        [during] = receiver.wait_count("/r", 1)
        assert len(during.headers["webhook-signature"].split(" ")) == 2
        for secret in (old, new):
            Verifier(secret).verify(during.body, during.headers)
        # The window ends: only the new secret signs.
        _sql("UPDATE webhooks SET previous_secret_until = now() - interval '1 second' "
             "WHERE id = :h", h=hook)
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        _, after = receiver.wait_count("/r", 2)
        assert len(after.headers["webhook-signature"].split(" ")) == 1
        Verifier(new).verify(after.body, after.headers)
        with pytest.raises(WebhookVerificationError):
            Verifier(old).verify(after.body, after.headers)
        assert anon.action.webhook_show(id=hook)["previous_secret_until"] is None
        # Dropped: unsigned from now on.
        assert anon.action.webhook_update(id=hook, secret="")["signed"] is False
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        *_, unsigned = receiver.wait_count("/r", 3)
        assert "webhook-signature" not in unsigned.headers
