"""Narrow subscriptions: one dataset, one organization, one group."""
from __future__ import annotations

import collections
import uuid

import ckanapi
import pytest
import sqlalchemy as sa

from ckan import model
from ckan.tests import factories

from .processes import closed_port
from .waiting import settled

ADDRESS = f"http://127.0.0.2:{closed_port()}/cb"


def _api(app, action, data, status=None, token=None):
    headers = {"Authorization": token} if token else {}
    return app.post(f"/api/3/action/{action}", json=data, headers=headers, status=status)


@pytest.mark.usefixtures("clean_db", "with_plugins")
@pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")
class TestFilterValidation:
    def test_filters_are_resolved_to_ids_and_shown(self, app):
        org = factories.Organization()
        group = factories.Group()
        dataset = factories.Dataset(owner_org=org["id"])
        hook = _api(app, "webhook_create", {"topic": "resource/update", "address": ADDRESS,
                                            "dataset": dataset["name"],
                                            "organization": org["name"],
                                            "group": group["name"]}).json["result"]
        shown = _api(app, "webhook_show", {"id": hook}).json["result"]
        assert shown["filters"] == {"dataset": dataset["id"], "organization": org["id"],
                                    "group": group["id"]}

    def test_same_address_may_follow_two_datasets_but_not_one_twice(self, app):
        org = factories.Organization()
        first, second = (factories.Dataset(owner_org=org["id"]) for _ in range(2))
        for dataset in (first, second):
            _api(app, "webhook_create", {"topic": "dataset/update", "address": ADDRESS,
                                         "dataset": dataset["id"]})
        _api(app, "webhook_create", {"topic": "dataset/update", "address": ADDRESS,
                                     "dataset": first["name"]}, status=409)
        assert model.Session.execute(sa.text("SELECT count(*) FROM webhooks")).scalar() == 2

    @pytest.mark.parametrize("field", ["dataset", "organization", "group"])
    def test_unknown_filters_are_refused(self, app, field):
        body = _api(app, "webhook_create", {"topic": "dataset/update", "address": ADDRESS,
                                            field: "no-such-thing"}, status=409).json
        assert body["error"][field] == ["Not found, or not visible to you"]

    def test_a_private_dataset_looks_like_a_missing_one_to_outsiders(self, app):
        org = factories.Organization()
        private = factories.Dataset(owner_org=org["id"], private=True)
        body = _api(app, "webhook_create", {"topic": "dataset/update", "address": ADDRESS,
                                            "dataset": private["id"]}, status=409).json
        assert body["error"]["dataset"] == ["Not found, or not visible to you"]
        member = factories.User()
        from ckan.tests import helpers
        helpers.call_action("organization_member_create", id=org["id"],
                            username=member["name"], role="member")
        token = factories.APIToken(user=member["name"])["token"]
        _api(app, "webhook_create", {"topic": "dataset/update", "address": ADDRESS,
                                     "dataset": private["id"]}, token=token)

    def test_an_organization_is_not_a_group(self, app):
        org = factories.Organization()
        _api(app, "webhook_create", {"topic": "dataset/update", "address": ADDRESS,
                                     "group": org["id"]}, status=409)


@pytest.mark.usefixtures("with_plugins", "worker")
def test_filtered_hooks_hear_only_their_datasets(live_ckan, receiver, sysadmin_token,
                                                 organization):
    model.Session.execute(sa.text("DELETE FROM webhooks"))
    model.Session.commit()
    anon = ckanapi.RemoteCKAN(live_ckan)
    admin = ckanapi.RemoteCKAN(live_ckan, apikey=sysadmin_token["token"])
    other_org = admin.action.organization_create(name=f"org-{uuid.uuid4().hex[:8]}")
    group = admin.action.group_create(name=f"grp-{uuid.uuid4().hex[:8]}")
    followed = admin.action.package_create(name=f"ds-{uuid.uuid4().hex[:8]}",
                                           owner_org=organization["id"],
                                           groups=[{"id": group["id"]}])
    elsewhere = admin.action.package_create(name=f"ds-{uuid.uuid4().hex[:8]}",
                                            owner_org=other_org["id"])
    anon.action.webhook_create(topic="dataset/update", address=receiver.url("/one"),
                               dataset=followed["name"])
    anon.action.webhook_create(topic="resource/create", address=receiver.url("/one-res"),
                               dataset=followed["id"])
    anon.action.webhook_create(topic="dataset/update", address=receiver.url("/org"),
                               organization=other_org["name"])
    anon.action.webhook_create(topic="dataset/update", address=receiver.url("/grp"),
                               group=group["name"])
    anon.action.webhook_create(topic="dataset/update", address=receiver.url("/all"))
    for dataset in (followed, elsewhere):
        admin.action.package_patch(id=dataset["id"], notes="changed")
        admin.action.resource_create(package_id=dataset["id"], url="http://data.invalid/x")
    receiver.wait_count("/all", 4)
    # Every delivery of the two datasets' events is sent and recorded: the
    # receiver has all it will ever get of them.
    settled(packages=[followed["id"], elsewhere["id"]])

    def datasets(path: str, key: str = "id") -> collections.Counter:
        return collections.Counter(r.json["data"][key] for r in receiver.on(path))
    # Each dataset's patch and its resource_create's dataset/update.
    assert datasets("/one") == {followed["id"]: 2}
    assert datasets("/one-res", "package_id") == {followed["id"]: 1}
    assert datasets("/org") == {elsewhere["id"]: 2}
    assert datasets("/grp") == {followed["id"]: 2}
    assert datasets("/all") == {followed["id"]: 2, elsewhere["id"]: 2}
