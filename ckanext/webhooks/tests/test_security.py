"""Safe for anonymous use: verification handshake, signatures, who hears what,
SSRF re-checked at delivery, abuse limits, ids kept out of logs."""
from __future__ import annotations

import base64
import logging
import os
import socket
import uuid

import ckanapi
import pytest
import sqlalchemy as sa
from standardwebhooks.webhooks import Webhook as StandardWebhook, WebhookVerificationError

from ckan import model
from ckan.tests import factories, helpers

from ckanext.webhooks import ids
from ckanext.webhooks.model import Webhook

from . import dns_standin, hook_id_audit
from .receiver import Receiver
from .waiting import settled


def _name() -> str:
    return f"ds-{uuid.uuid4().hex[:12]}"


def _secret(size: int = 32) -> str:
    return "whsec_" + base64.b64encode(os.urandom(size)).decode()


def _api(app, action, data, status=None, token=None):
    headers = {"Authorization": token} if token else {}
    return app.post(f"/api/3/action/{action}", json=data, headers=headers, status=status)


def _hooks() -> int:
    return model.Session.query(Webhook).count()


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestVerificationHandshake:
    def test_echo_and_json_answers_are_accepted(self, app, receiver):
        receiver.verify_mode["/json"] = "json"
        hook = _api(app, "webhook_create", {"topic": "dataset/create",
                                            "address": receiver.url("/echo")}).json["result"]
        _api(app, "webhook_create", {"topic": "dataset/create", "address": receiver.url("/json")})
        assert _hooks() == 2
        first, second = receiver.verifications
        assert first.json["type"] == "webhook.verification"
        assert first.json["topic"] == "dataset/create"
        assert first.headers["webhook-challenge"] == first.json["challenge"]
        assert first.json["challenge"] != second.json["challenge"]  # single use
        assert len(first.json["challenge"]) >= 43
        assert hook not in first.body.decode()
        assert receiver.requests == []  # the handshake is not a delivery

    @pytest.mark.parametrize("mode", ["403", "500", "wrong", "302"])
    def test_a_receiver_that_does_not_echo_is_refused(self, app, receiver, mode):
        receiver.verify_mode["/no"] = mode
        body = _api(app, "webhook_create", {"topic": "dataset/create",
                                            "address": receiver.url("/no")}, status=409).json
        assert "verification" in body["error"]["address"][0]
        assert _hooks() == 0

    def test_nobody_listening_is_refused(self, app):
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
            port = sock.getsockname()[1]
        body = _api(app, "webhook_create", {"topic": "dataset/create",
                                            "address": f"http://127.0.0.2:{port}/x"},
                    status=409).json
        assert body["error"]["address"]
        assert _hooks() == 0

    def test_refused_addresses_are_never_contacted(self, app):
        loopback = Receiver(host="127.0.0.1").start()  # not in allowed_networks
        try:
            for address in (loopback.url("/x"),
                            f"http://2130706433:{loopback.port}/x",
                            f"http://0x7f.1:{loopback.port}/x",
                            f"http://[::ffff:127.0.0.1]:{loopback.port}/x",
                            f"http://localhost:{loopback.port}/x"):
                body = _api(app, "webhook_create", {"topic": "dataset/create",
                                                    "address": address}, status=409).json
                assert "private, local or reserved" in body["error"]["address"][0]
            assert loopback.verifications == [] and loopback.requests == []
            assert _hooks() == 0
        finally:
            loopback.stop()

    @pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")
    def test_can_be_switched_off(self, app, receiver):
        receiver.verify_mode["/off"] = "403"
        _api(app, "webhook_create", {"topic": "dataset/create", "address": receiver.url("/off")})
        assert receiver.verifications == [] and _hooks() == 1


@pytest.mark.usefixtures("clean_db", "with_plugins")
class TestSecretsAndLimits:
    def test_secret_is_never_shown(self, app, receiver):
        secret = _secret()
        hook = _api(app, "webhook_create", {"topic": "dataset/create", "secret": secret,
                                            "address": receiver.url()}).json["result"]
        shown = _api(app, "webhook_show", {"id": hook}).json["result"]
        assert shown["signed"] is True and secret not in str(shown)

    @pytest.mark.parametrize("secret", [
        "whsec_", "whsec_" + base64.b64encode(os.urandom(23)).decode(),
        "whsec_" + base64.b64encode(os.urandom(65)).decode(), "whsec_not base64!",
        base64.b64encode(os.urandom(32)).decode(),
        "WHSEC_" + base64.b64encode(os.urandom(32)).decode(),
        "whsec_" + "A" * 300])
    def test_bad_secrets_are_refused(self, app, receiver, secret):
        body = _api(app, "webhook_create", {"topic": "dataset/create", "secret": secret,
                                            "address": receiver.url()}, status=409).json
        assert body["error"]["secret"]
        assert _hooks() == 0

    @pytest.mark.ckan_config("ckanext.webhooks.anonymous_create_limit", "3")
    @pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")
    def test_anonymous_creation_is_rate_limited_per_ip(self, app):
        _clear_rate_limits()
        env = {"REMOTE_ADDR": "127.0.0.9"}
        for n in range(3):
            app.post("/api/3/action/webhook_create", extra_environ=env,
                     json={"topic": "dataset/create", "address": f"http://127.0.0.2/{n}"})
        response = app.post("/api/3/action/webhook_create", extra_environ=env, status=429,
                            json={"topic": "dataset/create", "address": "http://127.0.0.2/4"})
        assert response.json["error"]["__type"] == "Rate Limit Error"
        assert int(response.headers["Retry-After"]) > 0
        assert _hooks() == 3
        # Another address, and logged-in users, are not affected.
        app.post("/api/3/action/webhook_create", extra_environ={"REMOTE_ADDR": "127.0.0.10"},
                 json={"topic": "dataset/create", "address": "http://127.0.0.2/5"})
        user = factories.User()
        token = factories.APIToken(user=user["name"])["token"]
        app.post("/api/3/action/webhook_create", extra_environ=env,
                 headers={"Authorization": token},
                 json={"topic": "dataset/create", "address": "http://127.0.0.2/6"})
        assert _hooks() == 5

    @pytest.mark.ckan_config("ckanext.webhooks.anonymous_create_limit", "2")
    @pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")
    def test_an_ipv6_client_is_counted_by_its_64(self, app):
        _clear_rate_limits()
        for n, client in enumerate(("2001:db8:1:2::1", "2001:db8:1:2:ffff:1:2:3")):
            app.post("/api/3/action/webhook_create", extra_environ={"REMOTE_ADDR": client},
                     json={"topic": "dataset/create", "address": f"http://127.0.0.2/v6/{n}"})
        # A third address of the same /64 is the same client.
        app.post("/api/3/action/webhook_create", status=429,
                 extra_environ={"REMOTE_ADDR": "2001:db8:1:2:abcd::9"},
                 json={"topic": "dataset/create", "address": "http://127.0.0.2/v6/2"})
        # The next /64 is another.
        app.post("/api/3/action/webhook_create", extra_environ={"REMOTE_ADDR": "2001:db8:1:3::1"},
                 json={"topic": "dataset/create", "address": "http://127.0.0.2/v6/3"})
        assert _hooks() == 3

    @pytest.mark.ckan_config("ckanext.webhooks.anonymous_create_limit", "1")
    @pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")
    def test_recover_is_limited_like_ping(self, app):
        _clear_rate_limits()
        hook = _api(app, "webhook_create", {"topic": "dataset/create",
                                            "address": "http://127.0.0.2/r"}).json["result"]
        env = {"REMOTE_ADDR": "127.0.0.12"}
        since = "2999-01-01T00:00:00"  # in the future: nothing to send
        app.post("/api/3/action/webhook_recover", extra_environ=env,
                 json={"id": hook, "since": since, "until": since})
        app.post("/api/3/action/webhook_recover", extra_environ=env, status=429,
                 json={"id": hook, "since": since, "until": since})

    @pytest.mark.ckan_config("ckanext.webhooks.user_create_limit", "2")
    @pytest.mark.ckan_config("ckanext.webhooks.anonymous_create_limit", "1")
    @pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")
    def test_logged_in_users_have_a_limit_of_their_own(self, app):
        _clear_rate_limits()
        tokens = [factories.APIToken(user=factories.User()["name"])["token"]
                  for _ in range(2)]
        env = {"REMOTE_ADDR": "127.0.0.11"}
        for n in range(2):
            app.post("/api/3/action/webhook_create", extra_environ=env,
                     headers={"Authorization": tokens[0]},
                     json={"topic": "dataset/create", "address": f"http://127.0.0.2/u/{n}"})
        refused = app.post("/api/3/action/webhook_create", extra_environ=env, status=429,
                           headers={"Authorization": tokens[0]},
                           json={"topic": "dataset/create", "address": "http://127.0.0.2/u/2"})
        assert "by you" in refused.json["error"]["message"]
        app.post("/api/3/action/webhook_create", extra_environ=env,
                 headers={"Authorization": tokens[1]},
                 json={"topic": "dataset/create", "address": "http://127.0.0.2/u/3"})
        assert _hooks() == 3

    @pytest.mark.ckan_config("ckanext.webhooks.max_hooks_per_host", "2")
    @pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")
    def test_hooks_per_receiver_host_are_capped(self, app):
        for n in range(2):
            _api(app, "webhook_create", {"topic": "dataset/create",
                                         "address": f"http://127.0.0.2:{8000 + n}/x"})
        body = _api(app, "webhook_create", {"topic": "dataset/update",
                                            "address": "http://127.0.0.2/y"}, status=409).json
        assert "at most 2" in body["error"]["address"][0]
        _api(app, "webhook_create", {"topic": "dataset/create", "address": "http://127.0.0.3/x"})
        assert _hooks() == 3

    @pytest.mark.ckan_config("ckanext.webhooks.max_hooks_per_host", "2")
    @pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")
    def test_subdomains_share_their_registrable_domains_cap(self, app):
        """The stand-in resolver answers the names (no query leaves the
        process); the public suffix list is the package's own copy."""
        suffix = dns_standin.name("evil")  # e.g. evil-1a2b3c4d.dns-standin
        names = [f"{label}.{suffix}" for label in ("a", "b", "c")]
        other = f"other.{dns_standin.name('fine')}"
        for host in names + [other]:
            dns_standin.answer(host, "127.0.0.2")
        for host in names[:2]:
            _api(app, "webhook_create", {"topic": "dataset/create",
                                         "address": f"http://{host}:8080/x"})
        body = _api(app, "webhook_create", {"topic": "dataset/create",
                                            "address": f"http://{names[2]}:8080/x"},
                    status=409).json
        assert "at most 2" in body["error"]["address"][0]
        _api(app, "webhook_create", {"topic": "dataset/create",
                                     "address": f"http://{other}:8080/"})
        assert _hooks() == 3

    @pytest.mark.parametrize("address, refused", [
        ("http://127.0.0.2:22/x", True), ("http://127.0.0.2:25/x", True),
        ("https://127.0.0.2:993/x", True), ("http://127.0.0.2:80/x", False),
        ("https://127.0.0.2:443/x", False), ("http://127.0.0.2:1024/x", False)])
    @pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")
    def test_well_known_ports_other_than_80_and_443_are_refused(self, app, address, refused):
        body = _api(app, "webhook_create", {"topic": "dataset/create", "address": address},
                    status=409 if refused else 200).json
        if refused:
            assert "Ports below 1024" in body["error"]["address"][0] and _hooks() == 0
        else:
            assert _hooks() == 1

    @pytest.mark.ckan_config("ckanext.webhooks.allowed_ports_below_1024", "80 443 8")
    @pytest.mark.ckan_config("ckanext.webhooks.verify_on_create", "false")
    def test_the_low_ports_are_configurable(self, app):
        _api(app, "webhook_create", {"topic": "dataset/create", "address": "http://127.0.0.2:8/"})
        assert _hooks() == 1

    def test_a_failed_verification_says_the_same_for_closed_silent_and_refusing_ports(
            self, app, receiver):
        """A closed port (connection refused), a silent one (accepts, never
        answers: a timeout) and a receiver answering 403: one message."""
        closed = socket.socket()
        closed.bind(("127.0.0.2", 0))  # bound, not listening: connections are refused
        silent = socket.socket()
        silent.bind(("127.0.0.2", 0))
        silent.listen(8)
        receiver.verify_mode["/no"] = "403"
        try:
            messages = [_api(app, "webhook_create", {"topic": "dataset/create",
                                                     "address": address}, status=409)
                        .json["error"]["address"]
                        for address in (f"http://127.0.0.2:{closed.getsockname()[1]}/x",
                                        f"http://127.0.0.2:{silent.getsockname()[1]}/x",
                                        receiver.url("/no"))]
        finally:
            closed.close()
            silent.close()
        assert messages[0] == messages[1] == messages[2]
        assert [v.path for v in receiver.verifications] == ["/no"]
        assert _hooks() == 0


def _clear_rate_limits() -> None:
    from ckan.lib.redis import connect_to_redis
    for key in connect_to_redis().scan_iter("ckanext-webhooks:create:*"):
        connect_to_redis().delete(key)


@pytest.fixture
def member_token(organization):
    """A plain user, member of the organization, with an API token."""
    user = factories.User()
    helpers.call_action("organization_member_create", id=organization["id"],
                        username=user["name"], role="member")
    return {"user": user, "token": factories.APIToken(user=user["name"])["token"]}




def _clients(url, member_token, sysadmin_token):
    """ckanapi clients: anonymous, the organization member, a sysadmin."""
    return (ckanapi.RemoteCKAN(url),
            ckanapi.RemoteCKAN(url, apikey=member_token["token"]),
            ckanapi.RemoteCKAN(url, apikey=sysadmin_token["token"]))


@pytest.mark.usefixtures("with_plugins", "no_leftover_hooks")
class TestWhoHearsWhat:
    def test_signed_deliveries_verify_with_the_standardwebhooks_library(
            self, worker, live_ckan, receiver, sysadmin_token, organization):
        secret = _secret(48)
        anon = ckanapi.RemoteCKAN(live_ckan)
        admin = ckanapi.RemoteCKAN(live_ckan, apikey=sysadmin_token["token"])
        anon.action.webhook_create(topic="dataset/create", address=receiver.url("/s"),
                                   secret=secret)
        anon.action.webhook_create(topic="dataset/create", address=receiver.url("/u"))
        admin.action.package_create(name=_name(), owner_org=organization["id"])
        [signed] = receiver.wait_count("/s", 1)
        [unsigned] = receiver.wait_count("/u", 1)
        payload = StandardWebhook(secret).verify(signed.body, signed.headers)
        assert payload["event_id"] == signed.headers["webhook-id"]
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            StandardWebhook(_secret(48)).verify(signed.body, signed.headers)
        tampered = signed.body.replace(b'"topic"', b'"Topic"')
        with pytest.raises(WebhookVerificationError, match="No matching signature"):
            StandardWebhook(secret).verify(tampered, signed.headers)
        assert "webhook-signature" not in unsigned.headers

    def test_user_hooks_follow_the_users_permissions(
            self, worker, live_ckan, receiver, sysadmin_token, organization, member_token):
        anon, member, admin = _clients(live_ckan, member_token, sysadmin_token)
        anon.action.webhook_create(topic="dataset/create", address=receiver.url("/anon"))
        anon.action.webhook_create(topic="resource/create", address=receiver.url("/anon-res"))
        member.action.webhook_create(topic="dataset/create", address=receiver.url("/member"))
        private = admin.action.package_create(name=_name(), owner_org=organization["id"],
                                              private=True)
        admin.action.resource_create(package_id=private["id"], url="http://a.test/secret.csv")
        draft = admin.action.package_create(name=_name(), owner_org=organization["id"],
                                            state="draft")
        public = admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_count("/member", 2)
        receiver.wait_count("/anon", 1)
        # Every delivery of these datasets' events is recorded: nothing more arrives.
        settled(packages=[private["id"], draft["id"], public["id"]])
        assert [r.json["data"]["id"] for r in receiver.on("/anon")] == [public["id"]]
        assert receiver.on("/anon-res") == []
        assert {r.json["data"]["id"] for r in receiver.on("/member")} == {
            private["id"], public["id"]}
        assert draft["id"] not in str([r.body for r in receiver.requests])

        # The member leaves the organization: private datasets stop reaching them.
        as_admin = {"user": sysadmin_token["user"]["name"]}
        helpers.call_action("organization_member_delete", context=dict(as_admin),
                            id=organization["id"], username=member_token["user"]["name"])
        hidden = admin.action.package_create(name=_name(), owner_org=organization["id"],
                                             private=True)
        last = admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_for(lambda rs: any(r.path == "/member" and r.json["data"]["id"] == last["id"]
                                         for r in rs))
        settled(packages=[hidden["id"], last["id"]])
        assert len(receiver.on("/member")) == 3

        # The user is deleted: nothing reaches their hooks any more.
        helpers.call_action("user_delete", context=dict(as_admin), id=member_token["user"]["id"])
        final = admin.action.package_create(name=_name(), owner_org=organization["id"])
        receiver.wait_for(lambda rs: any(r.path == "/anon" and r.json["data"]["id"] == final["id"]
                                         for r in rs))
        settled(packages=[final["id"]])
        assert len(receiver.on("/member")) == 3

    def test_made_private_after_capture_is_not_delivered(
            self, only_my_workers, live_ckan, receiver, sysadmin_token, organization,
            member_token):
        anon, member, admin = _clients(live_ckan, member_token, sysadmin_token)
        anon.action.webhook_create(topic="dataset/create", address=receiver.url("/anon"))
        member.action.webhook_create(topic="dataset/create", address=receiver.url("/member"))
        # Captured while public; made private before any worker ran.
        dataset = admin.action.package_create(name=_name(), owner_org=organization["id"])
        admin.action.package_patch(id=dataset["id"], private=True)
        from . import processes
        worker = processes.start_worker(name="worker-private-after")
        try:
            receiver.wait_count("/member", 1)
            settled(packages=[dataset["id"]])
            assert receiver.on("/anon") == []
        finally:
            worker.stop()

    def test_delete_events_reveal_nothing_new(
            self, worker, live_ckan, receiver, sysadmin_token, organization, member_token):
        anon, member, admin = _clients(live_ckan, member_token, sysadmin_token)
        anon.action.webhook_create(topic="dataset/delete", address=receiver.url("/anon"))
        member.action.webhook_create(topic="dataset/delete", address=receiver.url("/member"))
        private = admin.action.package_create(name=_name(), owner_org=organization["id"],
                                              private=True)
        public = admin.action.package_create(name=_name(), owner_org=organization["id"])
        admin.action.package_delete(id=private["id"])
        admin.action.dataset_purge(id=public["id"])
        receiver.wait_count("/member", 2)
        receiver.wait_count("/anon", 1)
        settled(packages=[private["id"], public["id"]])
        assert [r.json["data"]["id"] for r in receiver.on("/anon")] == [public["id"]]
        purged = receiver.on("/anon")[0].json["data"]
        assert purged["name"] == public["name"]  # what was last known of it

    def test_delivery_rechecks_the_address(self, worker, sysadmin_token, organization):
        """A stored address that became refused (DNS changed, or allowed_networks
        was narrowed) is not contacted at delivery: the attempt is logged as
        refused, and the receiver there saw nothing."""
        loopback = Receiver(host="127.0.0.1").start()
        hook_id = ids.new_hook_id()
        model.Session.add(Webhook(id=hook_id, topics=["dataset/create"], host="127.0.0.1",
                                  site="127.0.0.1",
                                  address=loopback.url("/x"), created=model.Session.execute(
                                      sa.text("select now()")).scalar()))
        model.Session.commit()
        try:
            dataset = factories.Dataset(owner_org=organization["id"])
            settled(packages=[dataset["id"]])
            attempts = model.Session.execute(sa.text(
                "SELECT status, error FROM webhooks_attempt WHERE hook_id = :id"),
                {"id": hook_id}).all()
            assert [tuple(a) for a in attempts] == [(None, "refused_address")]
            model.Session.expire_all()
            hook = model.Session.get(Webhook, hook_id)
            assert hook.delivery_count == 1 and hook.last_error == "refused_address"
            assert loopback.requests == [] and loopback.verifications == []
        finally:
            loopback.stop()
            model.Session.remove()


# The end-of-session search for hook ids in every log (hook_id_audit, run by
# conftest's pytest_sessionfinish) rests on these: what it searches for, where,
# and how.

def test_the_hook_id_audit_records_every_hook_whoever_made_it(live_ckan, receiver):
    """A hook made by a live CKAN server (another process) and one written by
    SQL are in the record, and stay there once deleted."""
    client = ckanapi.RemoteCKAN(live_ckan)
    through_api = client.action.webhook_create(topic="dataset/create",
                                               address=receiver.url("/audit"))
    by_sql = f"audit-{uuid.uuid4().hex}{uuid.uuid4().hex}"
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO webhooks (id, topics, address, host, site, created)
            VALUES (:id, ARRAY['dataset/create'], 'http://127.0.0.2:9/a', '127.0.0.2',
                    '127.0.0.2', now())"""), {"id": by_sql})
    client.action.webhook_delete(id=through_api)
    with model.meta.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM webhooks WHERE id = :id"), {"id": by_sql})
    assert {through_api, by_sql} <= hook_id_audit.recorded()


def test_the_hook_id_search_finds_an_id_wherever_a_line_has_it(tmp_path):
    from ckanext.webhooks.ids import fingerprint
    hook_id, absent = ids.new_hook_id(), ids.new_hook_id()
    clean = tmp_path / "clean.log"
    clean.write_text(f"worker ready\npruned webhook {fingerprint(hook_id)}: gone\n")
    leaky = tmp_path / "leaky.log"
    leaky.write_text(
        "worker ready\n"
        f"INFO [ckanext.webhooks.sender] delivered to {hook_id} in 3 ms\n"
        f"key=prefix{hook_id}suffix\n"  # inside a longer token
        # The README's one exception: the request line of an access log.
        f'127.0.0.1 - - [02/Dec/2025 03:00:00] "GET /webhooks/{hook_id} HTTP/1.1" 200 -\n'
        f'127.0.0.1 - - [02/Dec/2025 03:00:00] "\x1b[32mPOST /webhooks/{hook_id}/ping '
        'HTTP/1.1\x1b[0m" 302 -\n'
        f'127.0.0.1 - - [02/Dec/2025 03:00:00] "GET /x HTTP/1.1" 200 - {hook_id}\n')
    finds = hook_id_audit.search([clean, leaky], [hook_id, absent])
    assert [(find.path.name, find.line) for find in finds] == [
        ("leaky.log", 2), ("leaky.log", 3), ("leaky.log", 6)]
    assert {find.fingerprint for find in finds} == {fingerprint(hook_id)}


@pytest.mark.usefixtures("clean_db")  # migrates in this process: that reconfigures logging
def test_the_hook_id_search_covers_workers_and_this_process(worker):
    """The workers' logs and this pytest process's own log records (the
    extension's, at INFO) are among the logs searched."""
    marker = f"audit-marker-{uuid.uuid4().hex}"
    logging.getLogger("ckanext.webhooks.logic.action").info("marker %s", marker)
    searched = hook_id_audit.session_logs()
    assert worker.log_path in searched
    [find] = hook_id_audit.search(searched, [marker])
    assert find.path.name.startswith("pytest-")


def test_network_guard_refuses_before_sending(tmp_path, monkeypatch):
    """The suite's own safety net: connecting outside loopback raises."""
    monkeypatch.setenv("WEBHOOKS_NETGUARD_LOG", str(tmp_path / "log"))
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("10.0.0.1", 80), timeout=1)
    with pytest.raises(socket.gaierror):
        socket.getaddrinfo("receiver.example", 80)
    assert "10.0.0.1" in (tmp_path / "log").read_text()
