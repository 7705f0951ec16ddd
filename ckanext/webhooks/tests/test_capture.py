"""Event capture into the outbox, inside the writer's transaction (no worker)."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from ckan import model
from ckan.plugins import toolkit
from ckan.tests import factories, helpers

from ckanext.webhooks.model import WebhookEvent


def _events(since: int = 0) -> list[tuple[str, str]]:
    rows = model.Session.query(WebhookEvent).order_by(WebhookEvent.created).all()
    return [(e.topic, e.object_id) for e in rows][since:]


def _topics(since: int = 0) -> list[str]:
    return sorted(topic for topic, _ in _events(since))


@pytest.fixture
def org():
    return factories.Organization()


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestTopics:
    def test_new_dataset_with_resources(self, org):
        dataset = factories.Dataset(owner_org=org["id"],
                                    resources=[{"url": "http://a.test/1"},
                                               {"url": "http://a.test/2"}])
        events = _events()
        assert sorted(t for t, _ in events) == [
            "dataset/create", "resource/create", "resource/create"]
        assert ("dataset/create", dataset["id"]) in events
        assert {oid for t, oid in events if t == "resource/create"} == {
            r["id"] for r in dataset["resources"]}

    def test_update(self, org):
        dataset = factories.Dataset(owner_org=org["id"])
        before = len(_events())
        helpers.call_action("package_patch", id=dataset["id"], title="New title")
        assert _events(before) == [("dataset/update", dataset["id"])]

    def test_resource_create_update_delete(self, org):
        dataset = factories.Dataset(owner_org=org["id"])
        n = len(_events())
        resource = helpers.call_action("resource_create", package_id=dataset["id"],
                                       url="http://a.test/r")
        assert _topics(n) == ["dataset/update", "resource/create"]
        n = len(_events())
        helpers.call_action("resource_patch", id=resource["id"], name="renamed")
        assert _topics(n) == ["dataset/update", "resource/update"]
        n = len(_events())
        helpers.call_action("resource_delete", id=resource["id"])
        assert _topics(n) == ["dataset/update", "resource/delete"]
        assert ("resource/delete", resource["id"]) in _events(n)

    def test_soft_delete_and_purge(self, org):
        dataset = factories.Dataset(owner_org=org["id"], resources=[{"url": "http://a.test"}])
        n = len(_events())
        helpers.call_action("package_delete", id=dataset["id"])
        assert _events(n) == [("dataset/delete", dataset["id"])]
        n = len(_events())
        helpers.call_action("dataset_purge", id=dataset["id"])
        assert _events(n) == []  # already announced

    def test_purge_of_an_active_dataset_sends_delete_with_what_was_known(self, org):
        dataset = factories.Dataset(owner_org=org["id"], title="Known title")
        n = len(_events())
        helpers.call_action("dataset_purge", id=dataset["id"])
        assert _events(n) == [("dataset/delete", dataset["id"])]
        event = model.Session.query(WebhookEvent).filter_by(topic="dataset/delete").one()
        assert event.snapshot["title"] == "Known title"
        before = dict(event.snapshot["_before"])
        assert before.pop("groups") == [org["id"]]  # its memberships, purged with it
        assert before == {"state": "active", "private": False,
                          "owner_org": org["id"], "name": dataset["name"]}
        assert event.snapshot["_after"]["state"] == "purged"

    def test_drafts_send_nothing_until_active(self, org):
        dataset = factories.Dataset(owner_org=org["id"], state="draft")
        assert _events() == []
        helpers.call_action("package_patch", id=dataset["id"], title="still draft")
        assert _events() == []
        helpers.call_action("package_patch", id=dataset["id"], state="active")
        assert _events() == [("dataset/create", dataset["id"])]

    def test_private_datasets_are_captured_and_filtered_at_delivery(self, org):
        dataset = factories.Dataset(owner_org=org["id"], private=True)
        event = model.Session.query(WebhookEvent).one()
        assert event.object_id == dataset["id"]
        assert event.snapshot["_before"] is None  # new: nobody saw it before
        assert event.snapshot["_after"] == {"state": "active", "private": True,
                                            "owner_org": org["id"], "name": dataset["name"]}

    def test_visibility_before_and_after_a_change_are_captured(self, org):
        dataset = factories.Dataset(owner_org=org["id"])
        other = factories.Organization(image_url="")
        group = factories.Group(image_url="")
        n = len(_events())
        helpers.call_action("package_patch", id=dataset["id"], private=True,
                            owner_org=other["id"], name=dataset["name"] + "-renamed")
        # One commit on 2.12; on 2.11 package_owner_org_update commits part-way,
        # so the change is two commits and two events: the first starts from
        # what was, the last ends at what is.
        patch_events = model.Session.query(WebhookEvent).order_by(
            WebhookEvent.created).all()[n:]
        assert len(patch_events) in (1, 2)
        before = dict(patch_events[0].snapshot["_before"])
        assert org["id"] in before.pop("groups")  # CKAN keeps the organization as a member
        assert before == {"state": "active", "private": False,
                          "owner_org": org["id"], "name": dataset["name"]}
        assert patch_events[-1].snapshot["_after"] == {
            "state": "active", "private": True, "owner_org": other["id"],
            "name": dataset["name"] + "-renamed"}
        m = n + len(patch_events)
        helpers.call_action("member_create", id=group["id"], object=dataset["id"],
                            object_type="package", capacity="public")
        (added,) = model.Session.query(WebhookEvent).order_by(WebhookEvent.created).all()[m:]
        assert added.snapshot["_before"]["groups"] == [other["id"]]  # not yet the group


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestTransactions:
    def test_rollback_leaves_no_event(self, org):
        dataset = factories.Dataset(owner_org=org["id"])
        n = len(_events())
        pkg = model.Package.get(dataset["id"])
        pkg.title = "never committed"
        model.Session.flush()
        model.Session.rollback()
        model.Session.remove()
        assert len(_events()) == n
        # A failed action (validation error) stores nothing either.
        with pytest.raises(toolkit.ValidationError):
            helpers.call_action("package_patch", id=dataset["id"], name="")
        model.Session.remove()
        assert len(_events()) == n

    def test_one_event_per_entity_per_commit(self, org):
        dataset = factories.Dataset(owner_org=org["id"], resources=[{"url": "http://a.test"}])
        n = len(_events())
        pkg = model.Package.get(dataset["id"])
        pkg.title = "one"
        model.Session.flush()
        pkg.notes = "two"
        model.Session.flush()
        pkg.resources[0].name = "three"
        model.Session.commit()
        assert _topics(n) == ["dataset/update", "resource/update"]

    def test_a_broken_outbox_never_breaks_the_save(self, org):
        model.Session.execute(sa.text("ALTER TABLE webhooks_event RENAME TO webhooks_event_x"))
        model.Session.commit()
        try:
            dataset = factories.Dataset(owner_org=org["id"], title="saved anyway")
            model.Session.remove()
            assert model.Package.get(dataset["id"]).title == "saved anyway"
        finally:
            model.Session.remove()
            model.Session.execute(sa.text(
                "ALTER TABLE webhooks_event_x RENAME TO webhooks_event"))
            model.Session.commit()

    def test_notify_raising_never_breaks_the_save(self, org, monkeypatch):
        from ckanext.webhooks import capture

        def boom(*args):
            raise RuntimeError("webhooks bug")
        monkeypatch.setattr(capture, "_dataset_topic", boom)
        dataset = factories.Dataset(owner_org=org["id"], title="saved despite a bug")
        model.Session.remove()
        assert model.Package.get(dataset["id"]).title == "saved despite a bug"
