"""The actions, through call_action, the HTTP action API (anonymous) and auth."""
from __future__ import annotations

import re

import pytest

from ckan import model
from ckan.plugins import toolkit
from ckan.tests import factories, helpers

from ckanext.webhooks.model import Webhook

from .processes import closed_port

ADDRESS = f"http://127.0.0.2:{closed_port()}/callback"
# ADDRESS refuses every connection (a port the test process holds): these
# tests are about the actions themselves; test_security.py covers the
# verification handshake against real receivers.
pytestmark = pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")


def _count() -> int:
    return model.Session.query(Webhook).count()


def _api(app, action, data, token=None, status=None):
    headers = {"Authorization": token} if token else {}
    response = app.post(f"/api/3/action/{action}", json=data, headers=headers,
                        status=status)
    return response


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestSeedApi:
    def test_create_show_delete(self):
        hook = helpers.call_action("webhook_create", topic="dataset/create", address=ADDRESS)
        assert isinstance(hook, str)
        shown = helpers.call_action("webhook_show", id=hook)
        assert shown["id"] == hook
        assert shown["topic"] == "dataset/create"
        assert shown["address"] == ADDRESS
        assert shown["created"]
        assert shown["statistics"]["deliveries"] == 0
        assert shown["statistics"]["consecutive_failures"] == 0
        assert "secret" not in shown
        helpers.call_action("webhook_delete", id=hook)
        with pytest.raises(toolkit.ObjectNotFound):
            helpers.call_action("webhook_show", id=hook)
        assert _count() == 0

    def test_ids_are_long_random_and_url_safe(self):
        hooks = [helpers.call_action("webhook_create", topic="dataset/update",
                                     address=f"{ADDRESS}/{n}") for n in range(20)]
        assert len(set(hooks)) == 20
        for hook in hooks:
            assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", hook)  # >= 256 bits
        # Not time- or counter-derived: no long common prefix between consecutive ids.
        prefixes = [len(__import__("os").path.commonprefix([a, b]))
                    for a, b in zip(hooks, hooks[1:])]
        assert max(prefixes) < 6

    def test_ids_never_look_like_command_line_options(self):
        from ckanext.webhooks.ids import new_hook_id
        ids = [new_hook_id() for _ in range(5000)]  # 1 in 64 would start with "-"
        assert not [i for i in ids if i.startswith("-")]
        assert len(set(ids)) == 5000 and {len(i) for i in ids} == {43}

    def test_every_topic_is_accepted(self):
        for topic in ("dataset/create", "dataset/update", "dataset/delete",
                      "resource/create", "resource/update", "resource/delete"):
            hook = helpers.call_action("webhook_create", topic=topic, address=ADDRESS)
            assert helpers.call_action("webhook_show", id=hook)["topic"] == topic

    def test_duplicate_is_refused_without_revealing_the_id(self):
        hook = helpers.call_action("webhook_create", topic="dataset/create", address=ADDRESS)
        with pytest.raises(toolkit.ValidationError) as error:
            helpers.call_action("webhook_create", topic="dataset/create", address=ADDRESS)
        assert "address" in error.value.error_dict
        assert hook not in str(error.value.error_dict)
        assert _count() == 1
        # The same address spelled with an upper-case host is the same hook.
        with pytest.raises(toolkit.ValidationError):
            helpers.call_action("webhook_create", topic="dataset/create",
                                address=ADDRESS.replace("http", "HTTP"))
        assert _count() == 1

    def test_list_is_sysadmin_only(self, app):
        helpers.call_action("webhook_create", topic="dataset/create", address=ADDRESS)
        listed = helpers.call_action("webhook_list")
        assert [h["address"] for h in listed] == [ADDRESS]
        response = _api(app, "webhook_list", {}, status=403)
        assert response.json["success"] is False
        user = factories.User()
        token = factories.APIToken(user=user["name"])["token"]
        _api(app, "webhook_list", {}, token=token, status=403)
        sysadmin = factories.Sysadmin()
        token = factories.APIToken(user=sysadmin["name"])["token"]
        assert len(_api(app, "webhook_list", {}, token=token).json["result"]) == 1


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestAnonymousHttpApi:
    def test_anonymous_create_show_delete(self, app):
        hook = _api(app, "webhook_create",
                    {"topic": "dataset/update", "address": ADDRESS}).json["result"]
        shown = _api(app, "webhook_show", {"id": hook}).json["result"]
        assert shown["address"] == ADDRESS
        assert app.get(f"/api/3/action/webhook_show?id={hook}").json["result"]["id"] == hook
        _api(app, "webhook_delete", {"id": hook})
        assert _api(app, "webhook_show", {"id": hook}, status=404).json["success"] is False
        assert _count() == 0

    def test_hook_of_a_logged_in_user_records_the_user(self, app):
        user = factories.User()
        token = factories.APIToken(user=user["name"])["token"]
        hook = _api(app, "webhook_create", {"topic": "dataset/update", "address": ADDRESS},
                    token=token).json["result"]
        assert model.Session.get(Webhook, hook).user_id == user["id"]


BAD_CREATE = [
    ({}, {"topic", "address"}),
    ({"topic": "dataset/create"}, {"address"}),
    ({"address": ADDRESS}, {"topic"}),
    ({"topic": "", "address": ADDRESS}, {"topic"}),
    ({"topic": "dataset/create", "address": ""}, {"address"}),
    ({"topic": "dataset/explode", "address": ADDRESS}, {"topic"}),
    ({"topic": "DATASET/CREATE", "address": ADDRESS}, {"topic"}),
    ({"topic": ["dataset/create"], "address": ADDRESS}, {"topic"}),
    ({"topic": {"a": "b"}, "address": ADDRESS}, {"topic"}),
    ({"topic": 5, "address": ADDRESS}, {"topic"}),
    ({"topic": None, "address": ADDRESS}, {"topic"}),
    ({"topic": "dataset/create", "address": [ADDRESS]}, {"address"}),
    ({"topic": "dataset/create", "address": {"url": ADDRESS}}, {"address"}),
    ({"topic": "dataset/create", "address": 42}, {"address"}),
    ({"topic": "dataset/create", "address": True}, {"address"}),
    ({"topic": "dataset/create", "address": "127.0.0.2/callback"}, {"address"}),
    ({"topic": "dataset/create", "address": "/callback"}, {"address"}),
    ({"topic": "dataset/create", "address": "ftp://127.0.0.2/x"}, {"address"}),
    ({"topic": "dataset/create", "address": "file:///etc/passwd"}, {"address"}),
    ({"topic": "dataset/create", "address": "javascript:alert(1)"}, {"address"}),
    ({"topic": "dataset/create", "address": "http://"}, {"address"}),
    ({"topic": "dataset/create", "address": "http://127.0.0.2:99999/x"}, {"address"}),
    ({"topic": "dataset/create", "address": "http://127.0.0.2/" + "a" * 2000}, {"address"}),
    ({"topic": "dataset/create", "address": "http://127.0.0.2/a b"}, {"address"}),
    ({"topic": "dataset/create", "address": ADDRESS, "secret": "nope"}, {"secret"}),
    ({"topic": "dataset/create", "address": ADDRESS, "secret": ["whsec_x"]}, {"secret"}),
    ({"topic": "dataset/create", "address": ADDRESS, "id": "chosen"}, {"id"}),
]


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestBadInput:
    @pytest.mark.parametrize("data,fields", BAD_CREATE)
    def test_create_refuses_with_409_and_stores_nothing(self, app, data, fields):
        response = _api(app, "webhook_create", data, status=409)
        body = response.json
        assert body["success"] is False
        assert body["error"]["__type"] == "Validation Error"
        errors = {k for k in body["error"] if k != "__type"}
        assert fields <= errors, body
        for field in fields:
            assert body["error"][field] and all(isinstance(m, str) and m
                                                for m in body["error"][field])
        assert _count() == 0

    @pytest.mark.parametrize("action", ["webhook_show", "webhook_delete"])
    @pytest.mark.parametrize("data,status", [
        ({}, 409), ({"id": ""}, 409), ({"id": ["x"]}, 409), ({"id": {"a": 1}}, 409),
        ({"id": 7}, 409), ({"id": "x" * 5000}, 409), ({"id": "ab\x00cd"}, 409),
        ({"id": "no-such-hook"}, 404),
    ])
    def test_show_and_delete_refuse_bad_ids(self, app, action, data, status):
        hook = helpers.call_action("webhook_create", topic="dataset/create", address=ADDRESS)
        body = _api(app, action, data, status=status).json
        assert body["success"] is False
        if status == 404:
            assert body["error"]["__type"] == "Not Found Error"
        # A prefix or a case change of a real id is just as unknown.
        for near in (hook[:-1], hook.upper() if hook.upper() != hook else hook.lower(),
                     hook + "x"):
            _api(app, action, {"id": near}, status=404)
        assert _count() == 1

    def test_malformed_json_body_is_not_a_500(self, app):
        # (The client checks the status: a 400, not a 500.)
        response = app.post("/api/3/action/webhook_create", data="{not json",
                            headers={"Content-Type": "application/json"}, status=400)
        assert "JSON" in response.get_data(as_text=True)
        assert _count() == 0


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestMinimumAuth:
    def _try(self, app, token=None, status=200):
        return _api(app, "webhook_create", {"topic": "dataset/create", "address": ADDRESS},
                    token=token, status=status)

    @pytest.mark.ckan_config("ckanext.webhooks.minimum_auth", "user")
    def test_user_level(self, app):
        body = self._try(app, status=403).json
        assert body["error"]["__type"] == "Authorization Error"
        _api(app, "webhook_show", {"id": "whatever"}, status=403)
        user = factories.User()
        self._try(app, factories.APIToken(user=user["name"])["token"])
        assert _count() == 1

    @pytest.mark.ckan_config("ckanext.webhooks.minimum_auth", "editor")
    def test_editor_level(self, app):
        user = factories.User()
        self._try(app, factories.APIToken(user=user["name"])["token"], status=403)
        editor = factories.User()
        factories.Organization(users=[{"name": editor["name"], "capacity": "editor"}])
        self._try(app, factories.APIToken(user=editor["name"])["token"])
        assert _count() == 1

    @pytest.mark.ckan_config("ckanext.webhooks.minimum_auth", "admin")
    def test_admin_level(self, app):
        editor = factories.User()
        factories.Organization(users=[{"name": editor["name"], "capacity": "editor"}])
        self._try(app, factories.APIToken(user=editor["name"])["token"], status=403)
        admin = factories.User()
        factories.Organization(users=[{"name": admin["name"], "capacity": "admin"}])
        self._try(app, factories.APIToken(user=admin["name"])["token"])
        assert _count() == 1

    @pytest.mark.ckan_config("ckanext.webhooks.minimum_auth", "sysadmin")
    def test_sysadmin_level(self, app):
        admin = factories.User()
        factories.Organization(users=[{"name": admin["name"], "capacity": "admin"}])
        self._try(app, factories.APIToken(user=admin["name"])["token"], status=403)
        sysadmin = factories.Sysadmin()
        self._try(app, factories.APIToken(user=sysadmin["name"])["token"])
        assert _count() == 1

    @pytest.mark.ckan_config("ckanext.webhooks.minimum_auth", "anonymuos")
    def test_a_typo_closes_rather_than_opens(self, app):
        self._try(app, status=403)
