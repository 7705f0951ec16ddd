"""The web pages through CKAN's test client: forms, CSRF, errors, 404/403,
escaping, the rate limit and the all-or-nothing multi-topic subscription.
test_browser.py clicks through the same pages in a real Chromium."""
from __future__ import annotations

import datetime as dt
import re
from html import unescape
from pathlib import Path

import pytest

from ckan import model
from ckan.tests import factories, helpers

from ckanext.webhooks import crypto
from ckanext.webhooks.model import Webhook

TEMPLATES = Path(__file__).parents[1] / "templates"


def _hooks() -> list[Webhook]:
    return model.Session.query(Webhook).order_by(Webhook.created).all()


def _csrf(page_html: str) -> str:
    return re.search(r'name="_csrf_token" value="([^"]+)"', page_html).group(1)


def _form(web, url: str, token: str | None = None) -> tuple[str, dict]:
    headers = {"Authorization": token} if token else {}
    page = web.get(url, headers=headers)
    assert page.status_code == 200
    return page.body, {"_csrf_token": _csrf(page.body)}


@pytest.fixture
def web(app):
    """One client for a whole test, keeping its cookies (the session holds the
    CSRF token): CKAN 2.11's test app opens a new client for every request."""
    return app.test_client()


@pytest.fixture
def dataset():
    return factories.Dataset(owner_org=factories.Organization()["id"])


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestSubscribe:
    def test_dataset_page_links_to_its_form(self, web, dataset):
        page = web.get(f"/dataset/{dataset['name']}")
        link = re.search(r'<a class="btn btn-secondary webhooks-subscribe" href="([^"]+)"',
                         page.body)
        assert link and link.group(1) == f"/dataset/{dataset['name']}/webhooks/new"
        assert "Get notified of changes" in page.body

    def test_form_is_prefilled_for_the_dataset(self, web, dataset):
        body, _ = _form(web, f"/dataset/{dataset['name']}/webhooks/new")
        assert dataset["title"] in body
        topics = re.findall(r'name="topic" value="([^"]+)"', body)
        assert topics == ["dataset/create", "dataset/update", "dataset/delete",
                          "resource/create", "resource/update", "resource/delete"]
        assert 'name="address"' in body and 'name="secret"' in body

    def test_subscribing_stores_one_hook_for_the_ticked_topics_with_the_dataset_filter(
            self, web, dataset, receiver):
        _, form = _form(web, f"/dataset/{dataset['name']}/webhooks/new")
        page = web.post(f"/dataset/{dataset['name']}/webhooks/new", data=dict(
            form, topic=["dataset/update", "resource/create"], address=receiver.url("/p")))
        assert page.status_code == 200
        [hook] = _hooks()
        assert hook.topics == ["dataset/update", "resource/create"]
        assert hook.dataset_id == dataset["id"] and hook.address == receiver.url("/p")
        assert page.body.count(hook.id) == 2  # the id and its manage link, shown once
        assert "shown only this once" in page.body
        assert "no-store" in page.headers["Cache-Control"]
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert len(receiver.verifications) == 1  # one handshake for the hook

    def test_site_wide_form_has_no_dataset_filter(self, web, receiver):
        _, form = _form(web, "/webhooks/new")
        web.post("/webhooks/new", data=dict(form, topic="dataset/create",
                                            address=receiver.url("/site"),
                                            secret="whsec_" + "A" * 32))
        [hook] = _hooks()
        assert hook.dataset_id is None and hook.topics == ["dataset/create"]
        assert crypto.unseal(hook.secret) == "whsec_" + "A" * 32

    @pytest.mark.parametrize("fields, field_id, message", [
        ({"topic": "dataset/update", "address": "ftp://127.0.0.2/x"}, "field-address",
         "http"),
        ({"topic": "dataset/update", "address": "http://10.1.2.3/x"}, "field-address",
         "private"),
        ({"topic": "dataset/update", "address": ""}, "field-address", "Missing value"),
        ({"address": "http://127.0.0.2:9999/x"}, "field-topics", "Choose at least one event"),
        ({"topic": "dataset/update", "address": "http://127.0.0.2:9999/x", "secret": "nope"},
         "field-secret", "whsec_"),
    ])
    def test_bad_input_is_shown_inline_and_nothing_stored(self, web, fields, field_id,
                                                          message):
        _, form = _form(web, "/webhooks/new")
        page = web.post("/webhooks/new", data=dict(form, **fields))
        assert page.status_code == 200
        assert _hooks() == []
        assert 'class="error-explanation' in page.body  # the summary at the top
        # ... and the message beside its field
        block = page.body[page.body.index(f'id="{field_id}"') - 400:]
        assert message.lower() in unescape(block[:3000]).lower()
        # what was typed is kept
        if fields.get("address"):
            assert fields["address"] in unescape(page.body)

    def test_unverified_address_is_refused(self, web, receiver):
        receiver.verify_mode["/no"] = "403"
        _, form = _form(web, "/webhooks/new")
        page = web.post("/webhooks/new", data=dict(form, topic="dataset/update",
                                                   address=receiver.url("/no")))
        assert "verif" in page.body.lower() or "challenge" in page.body.lower()
        assert _hooks() == []

    def test_an_overlapping_subscription_is_refused_whole(self, web, receiver):
        """One ticked topic is already heard at this address: nothing is stored."""
        helpers.call_action("webhook_create", topic="dataset/delete",
                            address=receiver.url("/dup"))
        _, form = _form(web, "/webhooks/new")
        page = web.post("/webhooks/new", data=dict(
            form, topic=["dataset/create", "dataset/delete"], address=receiver.url("/dup")))
        assert "already exists" in page.body
        assert [h.topics for h in _hooks()] == [["dataset/delete"]]

    def test_post_without_csrf_token_is_refused(self, web, receiver):
        page = web.post("/webhooks/new", data={"topic": "dataset/update",
                                               "address": receiver.url("/csrf")},
                        status=400)
        assert "not from this site" in page.body
        assert _hooks() == [] and receiver.verifications == []

    def test_logged_in_post_without_token_is_refused_after_anonymous_visits(
            self, app, web, receiver):
        """CKAN exempts a view from its own CSRF check once an anonymous
        visitor used it; these forms keep checking for everyone."""
        app.test_client().get("/webhooks/new")  # an anonymous visitor first
        user = factories.User(password="Pages-test-passw0rd")
        _, form = _form(web, "/user/login")
        web.post("/user/login", data=dict(form, login=user["name"],
                                          password="Pages-test-passw0rd"))
        assert user["name"] in web.get("/dashboard/datasets", status=200).body
        page = web.post("/webhooks/new", data={"topic": "dataset/update",
                                               "address": receiver.url("/u")})
        assert page.status_code == 400
        assert _hooks() == [] and receiver.verifications == []
        # and with the token, the same user may subscribe
        _, form = _form(web, "/webhooks/new")
        web.post("/webhooks/new", data=dict(form, topic="dataset/update",
                                            address=receiver.url("/u")), status=200)
        [hook] = _hooks()
        assert hook.user_id == user["id"]

    def test_private_or_unknown_dataset_is_a_404(self, web):
        org = factories.Organization()
        private = factories.Dataset(owner_org=org["id"], private=True)
        for name in (private["name"], "no-such-dataset"):
            web.get(f"/dataset/{name}/webhooks/new", status=404)
            assert "Get notified" not in web.get(f"/dataset/{name}", status=404).body

    def test_unknown_topic_values_are_ignored_not_stored(self, web, receiver):
        _, form = _form(web, "/webhooks/new")
        web.post("/webhooks/new", data=dict(form, topic=["dataset/update", "<script>"],
                                            address=receiver.url("/t")))
        assert [h.topics for h in _hooks()] == [["dataset/update"]]

    @pytest.mark.ckan_config("ckanext.webhooks.anonymous_create_limit", "1")
    def test_anonymous_form_posts_are_rate_limited(self, web, receiver):
        import redis
        from ckan.plugins import toolkit
        client = redis.Redis.from_url(toolkit.config["ckan.redis.url"])
        for key in client.scan_iter("ckanext-webhooks:create:*"):
            client.delete(key)
        _, form = _form(web, "/webhooks/new")
        data = dict(form, topic="dataset/update", address=receiver.url("/rl"))
        web.post("/webhooks/new", data=data, status=200)
        page = web.post("/webhooks/new", data=dict(data, address=receiver.url("/rl2")),
                        status=429)
        assert int(page.headers["Retry-After"]) > 0
        assert "Too many webhooks" in page.body
        assert len(_hooks()) == 1

    @pytest.mark.ckan_config("ckanext.webhooks.minimum_auth", "user")
    def test_no_link_and_no_form_when_the_portal_requires_login(self, web, dataset):
        assert "Get notified" not in web.get(f"/dataset/{dataset['name']}").body
        _, form = _form(web, "/webhooks/new")
        web.post("/webhooks/new", data=dict(form, topic="dataset/update",
                                            address="http://127.0.0.2:9999/x"), status=403)


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestManage:
    @pytest.fixture
    def hook(self, receiver):
        return helpers.call_action("webhook_create", topic="dataset/update",
                                   address=receiver.url("/m"))

    def test_hook_page_shows_it(self, web, hook, receiver):
        page = web.get(f"/webhooks/{hook}")
        assert receiver.url("/m") in page.body
        assert "dataset/update" in page.body
        assert "No delivery attempts yet" in page.body
        assert "no-store" in page.headers["Cache-Control"]
        assert page.headers["Referrer-Policy"] == "no-referrer"

    def test_unknown_id_is_ckans_404_page(self, web):
        page = web.get("/webhooks/" + "x" * 43, status=404)
        assert "Webhook not found" in page.body
        web.get("/webhooks/" + "x" * 5000, status=404)

    def test_ping_then_log_then_delete(self, web, hook, receiver):
        body, form = _form(web, f"/webhooks/{hook}")
        page = web.post(f"/webhooks/{hook}/ping", data=form, follow_redirects=True)
        assert "Ping delivered: HTTP 200" in page.body
        [ping] = receiver.on("/m")
        assert ping.json["topic"] == "ping" and ping.json["webhook_id"] == hook
        assert "<code>ping</code>" in page.body  # the attempt is in the log table
        confirm, form = _form(web, f"/webhooks/{hook}/delete")
        assert "This cannot be undone" in confirm
        assert _hooks()  # a GET deletes nothing
        page = web.post(f"/webhooks/{hook}/delete", data=form, follow_redirects=True)
        assert "will receive no more events" in page.body
        assert _hooks() == []
        web.get(f"/webhooks/{hook}", status=404)

    def test_buttons_need_the_csrf_token(self, web, hook, receiver):
        web.post(f"/webhooks/{hook}/ping", data={}, status=400)
        web.post(f"/webhooks/{hook}/delete", data={}, status=400)
        assert receiver.on("/m") == [] and len(_hooks()) == 1

    def test_edit_changes_topics_address_and_filters(self, web, hook, receiver):
        dataset = factories.Dataset(title="Rivers of the county",
                                    owner_org=factories.Organization()["id"])
        body, form = _form(web, f"/webhooks/{hook}/edit")
        assert 'value="dataset/update"' in body and "checked" in body
        receiver.verify_mode["/refuses"] = "403"
        page = web.post(f"/webhooks/{hook}/edit", data=dict(
            form, topic=["dataset/*"], address=receiver.url("/refuses"), dataset=""))
        assert page.status_code == 200 and "verification" in unescape(page.body)
        assert _hooks()[0].address == receiver.url("/m")  # nothing changed
        page = web.post(f"/webhooks/{hook}/edit", follow_redirects=True, data=dict(
            form, topic=["dataset/*", "resource/create"], address=receiver.url("/m2"),
            dataset=dataset["name"]))
        assert "Webhook changed" in page.body
        [stored] = _hooks()
        assert stored.topics == ["dataset/*", "resource/create"]
        assert stored.address == receiver.url("/m2") and stored.dataset_id == dataset["id"]
        # The filter is shown by its title, linked, not as a bare id.
        assert f'href="/dataset/{dataset["name"]}">Rivers of the county</a>' in page.body

    def test_pause_resume_rotate_and_recover_buttons(self, web, hook, receiver):
        body, form = _form(web, f"/webhooks/{hook}")
        assert 'id="webhook-pause"' in body
        page = web.post(f"/webhooks/{hook}/pause", data=form, follow_redirects=True)
        assert "Webhook paused" in page.body and 'id="webhook-resume"' in page.body
        assert _hooks()[0].active is False
        page = web.post(f"/webhooks/{hook}/resume", data=form, follow_redirects=True)
        assert "Webhook resumed" in page.body and _hooks()[0].active is True
        first = "whsec_" + "B" * 32
        page = web.post(f"/webhooks/{hook}/secret", data=dict(form, secret=first),
                        follow_redirects=True)
        assert "deliveries are signed from now on" in page.body
        page = web.post(f"/webhooks/{hook}/secret", data=dict(form, secret="whsec_" + "C" * 32),
                        follow_redirects=True)
        assert "the old one also signs until" in page.body
        stored = _hooks()[0]
        assert crypto.unseal(stored.previous_secret) == first
        page = web.post(f"/webhooks/{hook}/secret", data=dict(form, secret="nope"),
                        follow_redirects=True)
        assert "whsec_" in unescape(page.body)  # the validation error, nothing changed
        page = web.post(f"/webhooks/{hook}/secret", data=dict(form, drop="1"),
                        follow_redirects=True)
        assert "Secret removed" in page.body and _hooks()[0].secret is None
        page = web.post(f"/webhooks/{hook}/recover", data=dict(form, since="2000-01-01T00:00"),
                        follow_redirects=True)
        assert "kept for" in unescape(page.body)
        recent = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5))
        page = web.post(f"/webhooks/{hook}/recover", follow_redirects=True,
                        data=dict(form, since=recent.strftime("%Y-%m-%dT%H:%M")))
        assert "0 past events queued" in page.body  # the hook heard nothing since

    def test_manage_buttons_need_the_csrf_token_and_a_known_id(self, web, hook):
        for action in ("pause", "resume", "secret", "recover", "edit"):
            web.post(f"/webhooks/{hook}/{action}", data={}, status=400)
        assert _hooks()[0].active is True
        _, form = _form(web, f"/webhooks/{hook}")
        for action in ("pause", "resume", "secret", "recover", "edit"):
            web.post(f"/webhooks/nope/{action}", data=form, status=404)

    def test_delete_and_ping_of_unknown_ids_are_404(self, web, hook):
        _, form = _form(web, f"/webhooks/{hook}")
        web.post("/webhooks/nope/ping", data=form, status=404)
        web.post("/webhooks/nope/delete", data=form, status=404)


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestDashboard:
    def test_only_sysadmins(self, web):
        user = factories.User()
        token = factories.APIToken(user=user["name"])["token"]
        web.get("/ckan-admin/webhooks", status=403)
        web.get("/ckan-admin/webhooks", headers={"Authorization": token}, status=403)
        _, form = _form(web, "/webhooks/new", token)
        web.post("/ckan-admin/webhooks/redeliver", headers={"Authorization": token},
                 data=dict(form, since="2000-01-01"), status=403)

    def test_sysadmin_sees_every_hook_and_the_chart(self, web, sysadmin_token, receiver):
        for topic in ("dataset/create", "resource/update"):
            helpers.call_action("webhook_create", topic=topic, address=receiver.url("/d"))
        page = web.get("/ckan-admin/webhooks", headers={"Authorization": sysadmin_token["token"]})
        assert page.body.count('class="webhook-row"') == 2
        assert "<svg" in page.body and page.body.count('class="webhooks-bar"') == 7 * 24
        assert 'href="/ckan-admin/webhooks"' in page.body  # the admin area's tab
        assert "cdn" not in page.body.lower().replace("ckan", "")  # no external chart library
        filtered = web.get("/ckan-admin/webhooks?topic=resource/update",
                           headers={"Authorization": sysadmin_token["token"]})
        assert filtered.body.count('class="webhook-row"') == 1
        assert 'data-topic="resource/update"' in filtered.body

    @pytest.mark.parametrize("query, field", [
        ("sort=password", "sort"), ("state=weird", "state"), ("topic=nope", "topic")])
    def test_bad_parameters_are_a_clear_error(self, web, sysadmin_token, query, field):
        page = web.get(f"/ckan-admin/webhooks?{query}", status=400,
                       headers={"Authorization": sysadmin_token["token"]})
        assert f"{field}: " in unescape(page.body)  # the parameter, named
        assert "Internal server error" not in page.body

    @pytest.mark.parametrize("query", [
        "page=-1&sort=created", "page=0", "page=abc", "page=99999999999999999999",
        # Not "true": not descending (CKAN's boolean parameters read anything else as false).
        "descending=maybe"])
    def test_odd_paging_and_flags_show_the_first_page_in_order(
            self, web, sysadmin_token, receiver, query):
        for path in ("/first", "/second"):
            helpers.call_action("webhook_create", topic="dataset/create",
                                address=receiver.url(path))
        page = web.get(f"/ckan-admin/webhooks?{query}", status=200,
                       headers={"Authorization": sysadmin_token["token"]})
        rows = re.findall(r'<td class="webhook-address"><a [^>]*title="([^"]+)"', page.body)
        assert rows == [receiver.url("/first"), receiver.url("/second")]  # oldest first
        assert "Previous" not in page.body  # the first page

    def test_user_input_is_escaped(self, web, sysadmin_token):
        page = web.get("/ckan-admin/webhooks?host=<script>alert(1)</script>",
                       headers={"Authorization": sysadmin_token["token"]})
        assert "<script>alert(1)" not in page.body
        assert "&lt;script&gt;alert(1)" in page.body


def test_every_template_string_is_translatable():
    """Text in the templates is inside _() / {% trans %}: strip those, the
    markup and Jinja, and nothing readable is left."""
    for path in TEMPLATES.rglob("*.html"):
        text = path.read_text()
        text = re.sub(r"\{#.*?#\}", "", text, flags=re.S)
        text = re.sub(r"\{%-?\s*trans\b.*?endtrans\s*-?%\}", "", text, flags=re.S)
        text = re.sub(r"\{\{.*?\}\}|\{%.*?%\}", "", text, flags=re.S)
        text = re.sub(r"<(script|style)\b.*?</\1>", "", text, flags=re.S)
        text = re.sub(r"<[^>]+>", " ", text)
        text = unescape(text)
        leftovers = re.findall(r"[A-Za-z]{2,}", text)
        allowed = {"HTTP", "ms"}  # a protocol name and a unit
        assert set(leftovers) <= allowed, (path.name, leftovers)


def test_message_catalogue_is_current(tmp_path):
    """ckanext/webhooks/i18n/ckanext-webhooks.pot holds every translatable
    string (make i18n refreshes it)."""
    import subprocess
    import sys
    root = Path(__file__).parents[3]
    fresh = tmp_path / "fresh.pot"
    subprocess.run([str(Path(sys.executable).parent / "pybabel"), "extract",
                    "-F", str(root / "babel.cfg"), "--no-location", "--omit-header",
                    "-o", str(fresh), str(root / "ckanext" / "webhooks")],
                   check=True, capture_output=True)
    msgids = lambda path: set(re.findall(r'^msgid "(.+)"$', path.read_text(), re.M))  # noqa: E731
    committed = msgids(root / "ckanext" / "webhooks" / "i18n" / "ckanext-webhooks.pot")
    assert len(committed) > 80
    assert msgids(fresh) == committed


@pytest.mark.usefixtures("clean_db", "with_plugins")
@pytest.mark.parametrize("path, status, shown", [
    ("/dataset/" + "x" * 3000 + "/webhooks/new", 404, "Dataset not found"),
    ("/dataset/%00/webhooks/new", 404, "Dataset not found"),
    ("/webhooks/%00", 404, "Webhook not found"),
    ("/webhooks/" + "%FF" * 50, 404, "Webhook not found"),
    ("/webhooks/..%2F..%2Fetc%2Fpasswd", 404, "Not Found"),
    ("/webhooks/x/delete", 404, "Webhook not found"),
    # Out of range: the first page, and a filter that matches nothing.
    ("/ckan-admin/webhooks?page=99999999999999999999", 200, 'id="webhooks-chart"'),
    ("/ckan-admin/webhooks?host=" + "h" * 5000, 200, "No webhooks match."),
])
def test_odd_urls_are_never_a_500(web, sysadmin_token, path, status, shown):
    page = web.get(path, headers={"Authorization": sysadmin_token["token"]})
    assert page.status_code == status, (path[:80], page.status_code)
    assert shown in page.body, (path[:80], page.body[:500])
