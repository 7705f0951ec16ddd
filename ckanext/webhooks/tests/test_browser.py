"""The pages in a real headless Chromium (Debian's, driven by Playwright),
against a real CKAN server, a real worker and a real receiver on 127.0.0.2.

The subscriber's flow runs with JavaScript turned off: subscribing and
deleting must work without it. Screenshots of every page are saved under
test-artifacts/screenshots/.
"""
from __future__ import annotations

import base64
import os
import shutil
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import ckanapi
import pytest

from ckan.tests import factories
from standardwebhooks.webhooks import Webhook as Verifier

from . import processes
from .waiting import until

pytestmark = pytest.mark.usefixtures("no_leftover_hooks")

SHOTS = processes.ARTIFACTS / "screenshots"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PASSWORD = "browser-test-Passw0rd"
# Chromium is not a Python process, so the suite's network guard does not see
# it: its resolver answers only localhost, its background services are off,
# and every request a page makes is checked against loopback below.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-domain-reliability",
    "--disable-client-side-phishing-detection", "--no-proxy-server",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    if not Path(CHROMIUM).exists():
        pytest.fail("Chromium is missing: run scripts/stack services (installs Debian's chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def visit(browser, live_ckan):
    """visit(javascript=True) -> a page of a fresh browser context (no cookies)
    whose requests may only go to the live CKAN; any other is refused and
    fails the test."""
    contexts, strays = [], []

    def only_loopback(route):
        host = urlsplit(route.request.url).hostname
        if host == "127.0.0.1":
            return route.continue_()
        strays.append(route.request.url)
        return route.abort()

    def open_page(javascript: bool = True):
        context = browser.new_context(java_script_enabled=javascript,
                                      viewport={"width": 1280, "height": 900})
        context.route("**/*", only_loopback)
        context.set_default_timeout(20000)
        contexts.append(context)
        return context.new_page()
    yield open_page
    for context in contexts:
        context.close()
    assert strays == [], f"pages asked for non-loopback addresses: {strays}"


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _log_in(page, live_ckan: str, user: dict) -> None:
    page.goto(f"{live_ckan}/user/login")
    page.fill("#field-login", user["name"])
    page.fill("#field-password", PASSWORD)
    page.click("form:has(#field-login) button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("form[action$='/user/_logout']").count() > 0, "login failed"


@pytest.fixture
def dataset(live_ckan, sysadmin_token, organization):
    admin = ckanapi.RemoteCKAN(live_ckan, apikey=sysadmin_token["token"])
    return admin, admin.action.package_create(
        name=f"browser-{uuid.uuid4().hex[:10]}", title="Air quality, hourly",
        owner_org=organization["id"])


@pytest.mark.usefixtures("worker")
def test_subscribe_receive_ping_delete_without_javascript(visit, live_ckan, receiver,
                                                          dataset):
    admin, ds = dataset
    page = visit(javascript=False)
    page.goto(f"{live_ckan}/dataset/{ds['name']}")
    _shot(page, "01-dataset-page")
    page.click("text=Get notified of changes")
    assert page.url == f"{live_ckan}/dataset/{ds['name']}/webhooks/new"
    assert "Air quality, hourly" in page.inner_text("#content")
    assert page.is_checked("input[name=topic][value='dataset/update']")  # the default
    _shot(page, "02-subscribe-form")

    # A refused address: the error is shown beside the field, nothing stored.
    page.fill("#field-address", "http://10.20.30.40/hook")
    page.click("button[name=save]")
    assert "private, local or reserved" in page.inner_text("#field-address >> xpath=..")
    _shot(page, "03-subscribe-error")

    page.fill("#field-address", receiver.url("/browser"))
    page.click("button[name=save]")
    warning = page.inner_text("#webhook-keep-id")
    assert "shown only this once" in warning
    hook_id = page.inner_text("code.webhook-id")
    _shot(page, "04-subscribed")
    assert [v.path for v in receiver.verifications] == ["/browser"]

    admin.action.package_patch(id=ds["id"], notes="Now with PM2.5")
    [delivery] = receiver.wait_count("/browser", 1)
    assert delivery.json["webhook_id"] == hook_id
    assert delivery.json["topic"] == "dataset/update"
    assert delivery.json["data"]["notes"] == "Now with PM2.5"

    page.click("text=Manage this webhook")
    assert page.url == f"{live_ckan}/webhooks/{hook_id}"

    def delivered():
        page.reload()
        return page.inner_text("#webhook-successes") == "1"
    until(delivered, 20, "the delivery in the hook's statistics", interval=0.3)
    assert receiver.url("/browser") in page.inner_text("#webhook-details")
    assert "HTTP 200" in page.inner_text("#webhook-attempts")
    _shot(page, "05-hook-page")

    page.click("#webhook-ping button")
    assert "Ping delivered: HTTP 200" in page.inner_text(".flash-messages")
    [ping] = [r for r in receiver.on("/browser") if r.json["topic"] == "ping"]
    assert ping.json["webhook_id"] == hook_id
    _shot(page, "06-pinged")

    page.click("#webhook-delete")
    assert "cannot be undone" in page.inner_text("#content")
    _shot(page, "07-confirm-delete")
    page.click("#webhook-confirm-delete button[type=submit]")
    assert "will receive no more events" in page.inner_text(".flash-messages")
    _shot(page, "08-deleted")
    with pytest.raises(ckanapi.NotFound):
        ckanapi.RemoteCKAN(live_ckan).action.webhook_show(id=hook_id)
    assert page.goto(f"{live_ckan}/webhooks/{hook_id}").status == 404
    _shot(page, "09-unknown-hook-404")


@pytest.mark.usefixtures("worker")
def test_sysadmin_dashboard_shows_the_hooks_statistics(visit, live_ckan, receiver, dataset):
    admin, ds = dataset
    anon = ckanapi.RemoteCKAN(live_ckan)
    healthy = anon.action.webhook_create(topic="dataset/update", address=receiver.url("/ok"))
    receiver.scripts["/down"] = [503]
    failing = anon.action.webhook_create(topic="dataset/update", address=receiver.url("/down"))
    admin.action.package_patch(id=ds["id"], title="Changed once")
    until(lambda: anon.action.webhook_show(id=healthy)["statistics"]["successes"] == 1,
          20, "the delivery to the healthy hook")

    def given_up():  # every retry of the schedule failed: nothing left to send
        stats = anon.action.webhook_show(id=failing)["statistics"]
        return stats["consecutive_failures"] >= 2 and stats["pending_deliveries"] == 0
    until(given_up, 40, "the failing hook's retries to run out")

    sysadmin = factories.Sysadmin(password=PASSWORD, image_url="")
    page = visit()
    _log_in(page, live_ckan, sysadmin)
    # (CKAN's /ckan-admin lists every sysadmin with the random internet avatars
    # that the factories give them: start on the tab itself.)
    page.goto(f"{live_ckan}/ckan-admin/webhooks")
    tab = page.locator("ul.nav-tabs li.active a, ul.nav-tabs a.active")
    assert tab.inner_text().strip() == "Webhooks"
    assert page.locator("ul.nav-tabs a[href='/ckan-admin/trash']").count() == 1
    rows = {row.get_attribute("data-topic") + " " + row.inner_text()
            for row in page.query_selector_all("tr.webhook-row")}
    [ok_row] = [r for r in rows if "/ok" in r]
    [down_row] = [r for r in rows if "/down" in r]
    assert "Healthy" in ok_row and "100%" in ok_row
    assert "Failing" in down_row and "503" in down_row and "0%" in down_row
    assert page.locator("svg.webhooks-chart rect.webhooks-bar").count() == 7 * 24
    assert page.inner_text("#webhooks-totals")
    _shot(page, "10-dashboard")

    page.select_option("#filter-state", "failing")
    page.click("#webhooks-filter button[type=submit]")
    # The click returns once the filtered page starts loading; its rows are
    # there once it has loaded (query_selector_all does not wait).
    page.wait_for_load_state()
    assert "state=failing" in page.url
    [row] = page.query_selector_all("tr.webhook-row")
    assert "/down" in row.inner_text()
    _shot(page, "11-dashboard-failing")

    receiver.scripts["/down"] = [200]
    row.query_selector("text=Redeliver failures").click()
    assert "1 failed deliveries queued again" in page.inner_text(".flash-messages")
    [resent] = receiver.wait_for(
        lambda got: [r for r in got if r.path == "/down" and r.status == 200])[-1:]
    assert resent.json["webhook_id"] == failing
    assert {healthy, failing} <= {h["id"] for h in admin.action.webhook_list()}


def test_dashboard_is_forbidden_to_others(visit, live_ckan):
    page = visit()
    assert page.goto(f"{live_ckan}/ckan-admin/webhooks").status == 403
    user = factories.User(password=PASSWORD, image_url="")
    _log_in(page, live_ckan, user)
    response = page.goto(f"{live_ckan}/ckan-admin/webhooks")
    assert response.status == 403
    assert "Only sysadmins" in page.inner_text("#content")
    _shot(page, "12-dashboard-403")


@pytest.mark.usefixtures("worker")
def test_manage_a_hook_without_javascript(visit, live_ckan, receiver, dataset):
    """Edit, pause, resume, rotate the secret and recover, on the hook's page
    with JavaScript off; the dashboard shows the paused hook as a state of its
    own and its table fits its panel at 1280 px."""
    admin, ds = dataset
    anon = ckanapi.RemoteCKAN(live_ckan)
    old = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    hook = anon.action.webhook_create(topic="dataset/update", address=receiver.url("/mine"),
                                      dataset=ds["id"], secret=old)
    anon.action.webhook_create(topic="dataset/update", address=receiver.url("/witness"))
    page = visit(javascript=False)
    page.goto(f"{live_ckan}/webhooks/{hook}")
    link = page.locator("#webhook-filter-dataset a")
    assert link.inner_text() == "Air quality, hourly"
    assert link.get_attribute("href") == f"/dataset/{ds['name']}"
    _shot(page, "13-hook-page-manage")

    page.click("#webhook-edit")
    page.check("input[name=topic][value='dataset/delete']")
    page.click("button[name=save]")
    assert "Webhook changed" in page.inner_text(".flash-messages")
    assert anon.action.webhook_show(id=hook)["topics"] == ["dataset/update", "dataset/delete"]
    _shot(page, "14-hook-edited")

    started = admin.action.webhook_show(id=hook)["created"]
    page.click("#webhook-pause button")
    assert "Webhook paused" in page.inner_text(".flash-messages")
    assert page.inner_text("#webhook-state").startswith("Paused")
    admin.action.package_patch(id=ds["id"], notes="While paused")
    [missed] = receiver.wait_count("/witness", 1)
    # The witness got the event, so it was fanned out: nothing was queued for
    # the paused hook, and its log holds no attempt of it.
    statistics = anon.action.webhook_show(id=hook)["statistics"]
    assert statistics["pending_deliveries"] == 0 and statistics["deliveries"] == 0
    assert anon.action.webhook_deliveries(id=hook) == []
    _shot(page, "15-hook-paused")

    sysadmin = factories.Sysadmin(password=PASSWORD, image_url="")
    dashboard = visit()
    _log_in(dashboard, live_ckan, sysadmin)
    dashboard.goto(f"{live_ckan}/ckan-admin/webhooks?state=paused")
    [row] = dashboard.query_selector_all("tr.webhook-row")
    assert "Paused" in row.inner_text() and "/mine" in row.inner_text()
    fits = dashboard.evaluate("""() => {
        const wrapper = document.querySelector('#webhooks-table-wrapper');
        const column = wrapper.closest('.primary, .col-md-9, main') || wrapper.parentElement;
        const actions = document.querySelector('#webhooks-table th:last-child');
        return {wrapper: wrapper.getBoundingClientRect().right,
                column: column.getBoundingClientRect().right,
                actions: actions.getBoundingClientRect().right,
                scrolls: wrapper.scrollWidth > wrapper.clientWidth};
    }""")
    assert fits["wrapper"] <= fits["column"] + 1
    assert fits["actions"] <= fits["wrapper"] + 1 or fits["scrolls"], fits
    _shot(dashboard, "16-dashboard-paused")

    page.click("#webhook-resume button")
    assert "Webhook resumed" in page.inner_text(".flash-messages")
    new = page.input_value("#field-new-secret")
    page.click("#webhook-secret button[name=rotate]")
    assert "the old one also signs until" in page.inner_text(".flash-messages")
    _shot(page, "17-secret-rotated")

    page.fill("#field-since", started[:16])
    page.click("#webhook-recover button[type=submit]")
    assert "1 past events queued" in page.inner_text(".flash-messages")
    [recovered] = receiver.wait_count("/mine", 1)
    assert recovered.headers["webhook-id"] == missed.headers["webhook-id"]
    assert recovered.json["data"]["notes"] == "While paused"
    for secret in (old, new):  # both sign during the rotation window
        Verifier(secret).verify(recovered.body, recovered.headers)
    _shot(page, "18-recovered")
