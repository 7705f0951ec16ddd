"""Every reader gets exactly their own view: end to end, on the real stack.

One CKAN server and one Celery worker for the whole module, both running the
suite's ``webhooks_test_audience`` plugin (audience_plugin.py), which makes
each reader's ``package_show`` different (``author_email`` and resource URLs
name the reader, sysadmins excepted), refuses ``restricted*`` resources to
anonymous readers and makes rendering an ``explode*`` dataset fail for
anyone but a sysadmin.

Readers, side by side, each with a hook on each of the six topics:
``anon`` (hooks created without a login), ``editor`` (an editor of
organization A, hooks created with its API token), ``outsider`` (a user of
no organization, API token) and ``sysadmin`` (API token). Filtered hooks
(``dataset/create`` and ``dataset/delete`` only): ``anon-org`` and
``outsider-org`` (organization A), ``anon-grp`` and ``outsider-grp``
(group G).

How the tests judge: a ``Ledger`` lists, for every hook, the deliveries each
step must add (topic, ``reason``, dataset, resource); after each step it
waits for them, fails on any missing or extra delivery at any hook, and
compares each delivery's ``data`` with what that reader gets from the live
action API at that moment (its own token, its own session cookie, or none).
"Nothing arrives" rests on the tables: ``Ledger.finish`` waits until every
event of the datasets judged is settled (fanned out, no rendering due again,
no delivery left in the queue: tests/waiting.py ``settled``), so what the
receiver has of them is all it will ever get; it also makes a fresh public
dataset in A and G go through every topic and waits until every hook heard
of it (each hook is still alive). Where a hook must hear nothing at all (a
deleted user's), the evidence is in the tables too: the event was fanned out
and the hook has no delivery, attempt or pending rendering for it.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import ckan
import ckanapi
import pytest
import requests
import sqlalchemy as sa
from ckan import model
from ckan.plugins import toolkit
from ckan.tests import factories

from . import processes
from .audience_plugin import reader_label, redacted_url
from .receiver import Receiver
from .waiting import settled, until

READERS = ("anon", "editor", "outsider", "sysadmin")
TOPICS = ("dataset/create", "dataset/update", "dataset/delete",
          "resource/create", "resource/update", "resource/delete")
# label -> (reader, filter kind); these hooks are on dataset/create and dataset/delete.
FILTERED = {"anon-org": ("anon", "organization"), "anon-grp": ("anon", "group"),
            "outsider-org": ("outsider", "organization"),
            "outsider-grp": ("outsider", "group")}
ALL4 = ["anon", "editor", "outsider", "sysadmin"]
ORG_HOOKS = ["anon-org", "outsider-org"]
GRP_HOOKS = ["anon-grp", "outsider-grp"]
PASSWORD = "Audiences-test-passw0rd"
CKAN_2_11 = ckan.__version__.startswith("2.11.")
ABSENT = "<absent>"
# A deadline, never a pause: long enough for a worker to take over work whose
# lease ran out (60 s) if PostgreSQL restarts under the run.
WAIT = 90.0


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _rows(sql: str, **params) -> list:
    with model.meta.engine.connect() as conn:
        return list(conn.execute(sa.text(sql), params).mappings().all())


def _schedule() -> list[float]:
    raw = toolkit.config.get("ckanext.webhooks.retry_schedule")
    return [float(x) for x in (raw.split() if isinstance(raw, str) else raw)]


def _csrf_token(html: str) -> str:
    found = (re.search(r'name="_csrf_token" value="([^"]+)"', html)
             or re.search(r'<meta name="_csrf_token" content="([^"]+)"', html))
    assert found, "no CSRF token in the page"
    return found.group(1)


# --------------------------------------------------------------------------
# The stack and its readers


@dataclass
class Reader:
    """A reader, and how to ask the live action API as that reader."""
    label: str
    url: str
    user: dict | None = None
    token: str | None = None
    session: requests.Session | None = None

    @property
    def name(self) -> str | None:
        return self.user["name"] if self.user else None

    @property
    def audience(self) -> str:
        return self.user["id"] if self.user else ""

    @property
    def client(self) -> ckanapi.RemoteCKAN:
        return ckanapi.RemoteCKAN(self.url, apikey=self.token)

    def show(self, action: str, id: str) -> dict:
        if self.session is not None:
            answer = self.session.get(f"{self.url}/api/3/action/{action}", params={"id": id})
            assert answer.status_code == 200, (self.label, action, answer.status_code)
            return answer.json()["result"]
        return getattr(self.client.action, action)(id=id)


@dataclass
class HookPath:
    reader: Reader
    hook_id: str
    # Whether the hook hears of Ledger.finish's public dataset.
    hears_sync: bool = True


@dataclass
class World:
    url: str
    worker: processes.Process
    receiver: Receiver
    admin: ckanapi.RemoteCKAN
    readers: dict[str, Reader]
    org_a: dict
    org_b: dict
    group: dict
    paths: dict[str, HookPath] = field(default_factory=dict)

    def new_user(self, org_role: str | None = None) -> dict:
        user = factories.User(password=PASSWORD, image_url="")
        if org_role:
            self.admin.action.organization_member_create(
                id=self.org_a["id"], username=user["name"], role=org_role)
        return user

    def dataset(self, prefix: str = "ds", **fields) -> dict:
        fields.setdefault("owner_org", self.org_a["id"])
        fields.setdefault("author_email", "author@example.invalid")
        return self.admin.action.package_create(name=_name(prefix), **fields)


def _shared_workers(request) -> list:
    """The suite's shared worker (conftest's ``worker`` fixture), if running:
    it runs without this module's plugin, so it must not deliver meanwhile."""
    for plugin in request.config.pluginmanager.get_plugins():
        workers = getattr(plugin, "_session_workers", None)
        if isinstance(workers, list) and hasattr(plugin, "private_stack"):
            return workers
    return []


@pytest.fixture(scope="module")
def stack(request, webhooks_tables):
    """conftest's private_stack for a whole module: a CKAN server and a worker
    with the audience plugin, the shared worker frozen meanwhile."""
    frozen = []
    for proc in _shared_workers(request):
        os.killpg(proc.proc.pid, signal.SIGSTOP)
        frozen.append(proc)
    web_port, solr_port = processes.free_port(), processes.free_port()
    url = f"http://127.0.0.1:{web_port}"
    # A Solr stand-in of its own: the suite's is shared with other runs on
    # this machine (test slots), and goes when the run that started it ends.
    ini = processes.write_ini({"ckan.site_url": url,
                               "solr_url": f"http://127.0.0.1:{solr_port}/solr/ckan",
                               "ckan.plugins": "webhooks webhooks_test_audience",
                               "ckan.auth.allow_dataset_collaborators": "true"})
    started = []
    receiver = Receiver().start()
    try:
        with model.meta.engine.begin() as conn:  # hooks of earlier tests: gone receivers
            conn.execute(sa.text("DELETE FROM webhooks"))
        started.append(processes.start_solr_standin(solr_port))
        started.append(processes.start_ckan(ini, web_port))
        worker = processes.start_worker(ini, concurrency=1, name="worker-audiences")
        started.append(worker)
        yield url, worker, receiver
    finally:
        receiver.stop()
        for proc in reversed(started):
            proc.stop()
        with model.meta.engine.begin() as conn:  # no later test delivers to these receivers
            conn.execute(sa.text("DELETE FROM webhooks"))
        ini.unlink()
        for proc in frozen:
            os.killpg(proc.proc.pid, signal.SIGCONT)
        model.Session.remove()


@pytest.fixture(scope="module")
def world(stack) -> World:
    url, worker, receiver = stack
    sysadmin = factories.Sysadmin(password=PASSWORD, image_url="")
    admin = ckanapi.RemoteCKAN(url, apikey=factories.APIToken(user=sysadmin["name"])["token"])
    org_a = admin.action.organization_create(name=_name("org-a"))
    org_b = admin.action.organization_create(name=_name("org-b"))
    group = admin.action.group_create(name=_name("grp"))
    readers = {"anon": Reader("anon", url),
               "sysadmin": Reader("sysadmin", url, sysadmin, admin.apikey)}
    world = World(url, worker, receiver, admin, readers, org_a, org_b, group)
    for label, role in (("editor", "editor"), ("outsider", None)):
        user = world.new_user(role)
        readers[label] = Reader(label, url, user, factories.APIToken(user=user["name"])["token"])
    for label in READERS:
        for topic in TOPICS:
            path = f"/{label}/{topic}"
            hook = readers[label].client.action.webhook_create(
                topic=topic, address=receiver.url(path))
            world.paths[path] = HookPath(readers[label], hook)
    for label, (reader, kind) in FILTERED.items():
        target = org_a["id"] if kind == "organization" else group["id"]
        for topic in ("dataset/create", "dataset/delete"):
            path = f"/{label}/{topic}"
            hook = readers[reader].client.action.webhook_create(
                topic=topic, address=receiver.url(path), **{kind: target})
            world.paths[path] = HookPath(readers[reader], hook)
    return world


# --------------------------------------------------------------------------
# The ledger


@dataclass(frozen=True)
class Want:
    topic: str
    dataset: str
    reason: str | None = None
    name: str | None = None      # dataset/delete: the name before the change
    resource: str | None = None  # resource/*

    def key(self) -> tuple:
        return (self.topic, self.reason or ABSENT, self.dataset, self.resource)


def want(labels: list[str], topic: str, dataset: str, reason: str | None = None,
         name: str | None = None, resource: str | None = None) -> list[tuple[str, Want]]:
    if topic in ("dataset/create", "dataset/delete"):
        assert reason, "dataset/create and dataset/delete always carry a reason"
    if topic == "dataset/delete":
        assert name, "a dataset/delete names the dataset as it was"
    return [(f"/{label}/{topic}", Want(topic, dataset, reason, name, resource))
            for label in labels]


def first_move_echo(labels: list[str], dataset: str) -> list[tuple[str, Want]]:
    """CKAN 2.11's package_owner_org_update commits in the middle of
    package_update (``Member.save()`` for the old organization's membership),
    then commits the new organization's membership row: a move into an
    organization the dataset was never in is two commits there, and the
    second is a dataset/update for whoever reads the dataset after the move
    (it is in their view before and after that commit). CKAN 2.12 commits
    once; so does 2.11 moving back into an organization the dataset was in
    (its membership row is kept)."""
    return want(labels, "dataset/update", dataset) if CKAN_2_11 else []


def id_of(reader: Reader) -> tuple:
    return (reader.label, reader.token, id(reader.session))


def _key(body: dict) -> tuple:
    data = body.get("data") or {}
    reason = body.get("reason", ABSENT)
    if body.get("topic", "").startswith("resource/"):
        return (body.get("topic"), reason, data.get("package_id"), data.get("id"))
    return (body.get("topic"), reason, data.get("id"), None)


class Ledger:
    def __init__(self, world: World) -> None:
        self.world = world
        self.start = len(world.receiver.requests)  # what arrived before is not judged
        self.paths: dict[str, HookPath] = dict(world.paths)
        self.subjects: set[str] = set()
        self.counts: dict[str, int] = {path: 0 for path in self.paths}
        self._bodies: dict[int, dict] = {}

    def track(self, *dataset_ids: str) -> None:
        self.subjects.update(dataset_ids)

    def add_path(self, path: str, reader: Reader, hook_id: str, hears_sync: bool = True) -> None:
        self.paths[path] = HookPath(reader, hook_id, hears_sync)
        self.counts[path] = 0

    def _body(self, received) -> dict:
        key = id(received)
        if key not in self._bodies:
            self._bodies[key] = received.json
        return self._bodies[key]

    def _dataset_of(self, body: dict) -> str | None:
        data = body.get("data") or {}
        if body.get("topic", "").startswith("resource/"):
            return data.get("package_id")
        return data.get("id")

    def received(self, path: str, requests_: list | None = None,
                 datasets: set | None = None) -> list[dict]:
        requests_ = self.world.receiver.requests if requests_ is None else requests_
        datasets = self.subjects if datasets is None else datasets
        return [self._body(r) for r in requests_[self.start:]
                if r.path == path and self._dataset_of(self._body(r)) in datasets]

    def step(self, what: str, *groups: list[tuple[str, Want]],
             timeout: float = WAIT) -> dict[str, list[dict]]:
        """The deliveries the change just made must add, exactly; returns the
        new bodies by path."""
        new: dict[str, list[Want]] = collections.defaultdict(list)
        for group in groups:
            for path, wanted in group:
                assert path in self.paths, f"no hook at {path}"
                new[path].append(wanted)
        target = {path: self.counts[path] + len(new.get(path, [])) for path in self.paths}

        def arrived(requests_) -> bool:
            return all(len(self.received(p, requests_)) >= n for p, n in target.items())

        try:
            self.world.receiver.wait_for(arrived, timeout)
        except AssertionError:
            missing = {p: [_key(b) for b in self.received(p)[self.counts[p]:]]
                       for p, n in target.items() if len(self.received(p)) < n}
            raise AssertionError(
                f"{what}: deliveries missing after {timeout}s; expected new "
                f"{ {p: [w.key() for w in new[p]] for p in missing} }, got {missing}") from None
        problems = []
        bodies: dict[str, list[dict]] = {}
        for path, n in target.items():
            got = self.received(path)
            fresh = got[self.counts[path]:]
            if len(got) != n or (collections.Counter(map(_key, fresh))
                                 != collections.Counter(w.key() for w in new.get(path, []))):
                problems.append(f"{path}: expected new {[w.key() for w in new.get(path, [])]}, "
                                f"got {[_key(b) for b in fresh]}")
            bodies[path] = fresh
        assert not problems, f"{what}:\n  " + "\n  ".join(problems)
        views: dict = {}  # (reader, action, id) -> the live API's answer, once per step
        for path, wanted in new.items():
            by_key = collections.defaultdict(list)
            for wish in wanted:
                by_key[wish.key()].append(wish)
            for body in bodies[path]:
                self._check(what, path, body, by_key[_key(body)].pop(), views)
        self.counts = target
        return {path: bodies[path] for path in new}

    def _check(self, what: str, path: str, body: dict, wish: Want, views: dict) -> None:
        hook = self.paths[path]

        def live(action: str, id: str) -> dict:
            key = (id_of(hook.reader), action, id)
            if key not in views:
                views[key] = hook.reader.show(action, id)
            return views[key]

        where = f"{what}: {path}"
        assert body["webhook_id"] == hook.hook_id, where
        assert body["topic"] == wish.topic, where
        if wish.topic in ("dataset/create", "dataset/delete"):
            assert body.get("reason") == wish.reason, where
        else:
            assert "reason" not in body, where
        data = body["data"]
        if wish.topic == "dataset/delete":
            assert data == {"id": wish.dataset, "name": wish.name}, where
        elif wish.topic == "resource/delete":
            assert data == {"id": wish.resource, "package_id": wish.dataset}, where
        elif wish.topic.startswith("dataset/"):
            assert data == live("package_show", wish.dataset), where
        else:
            assert data == live("resource_show", wish.resource), where

    def sync(self) -> str:
        """A later public dataset (in A and G) through every topic; returns when
        every hook that may see it heard of it. Each change waits for the one
        before to be heard: an event is rendered when it is fanned out, and a
        dataset deleted by then is nobody's to render."""
        admin = self.world.admin.action
        waiting = [p for p, hook in self.paths.items() if hook.hears_sync]
        sync = {}

        def heard(*topics: str) -> None:
            paths = [p for p in waiting if "/".join(p.split("/")[-2:]) in topics]
            try:
                self.world.receiver.wait_for(lambda rs: all(
                    self.received(p, rs, {sync["id"]}) for p in paths), WAIT)
            except AssertionError:
                deaf = [p for p in paths if not self.received(p, datasets={sync["id"]})]
                raise AssertionError(f"sync dataset: {topics} not heard at {deaf}") from None

        sync.update(self.world.dataset("sync", groups=[{"id": self.world.group["id"]}],
                                       resources=[{"name": "data",
                                                   "url": "http://data.invalid/s"}]))
        heard("dataset/create", "resource/create")
        resource = sync["resources"][0]["id"]
        admin.resource_patch(id=resource, description="sync")
        heard("dataset/update", "resource/update")
        admin.resource_delete(id=resource)
        heard("resource/delete")
        admin.package_delete(id=sync["id"])
        heard("dataset/delete")
        return sync["id"]

    def finish(self) -> str:
        """Nothing more arrives for the tracked datasets: every event of them
        is settled (fanned out, no rendering due again, no delivery left in
        the queue), a later dataset went through every hook, and the counts
        are still those expected. Returns the later dataset's id."""
        sync_id = self.sync()
        settled(packages=sorted(self.subjects) + [sync_id], timeout=WAIT)
        extra = {p: [_key(b) for b in self.received(p)[n:]]
                 for p, n in self.counts.items() if len(self.received(p)) != n}
        assert not extra, f"deliveries nobody expected: {extra}"
        return sync_id


def _rendering(event_id: str) -> dict[str, Any]:
    return {row["audience"]: row for row in _rows(
        "SELECT audience, data, attempts, due, error FROM webhooks_rendering"
        " WHERE event_id = :e", e=event_id)}


def _wait_rendering(event_id: str, audiences: set[str], state: Callable[[Any], bool],
                    what: str, timeout: float = WAIT) -> dict[str, Any]:
    """Poll webhooks_rendering until each audience's row is in ``state``."""
    def ready():
        rows = _rendering(event_id)
        return rows if audiences <= set(rows) and all(state(rows[a]) for a in audiences) \
            else None
    return until(ready, timeout, what, interval=0.1)


# --------------------------------------------------------------------------
# The tests


def test_each_reader_gets_its_own_package_show_and_resource_show(world):
    """Four readers side by side get four different renderings of the same
    events, each equal to that reader's own action API answer; a resource
    anonymous readers may not resource_show never reaches anonymous hooks."""
    for path, hook in world.paths.items():
        shown = world.readers["anon"].client.action.webhook_show(id=hook.hook_id)
        assert shown["reader"] == hook.reader.name, path  # None for anonymous hooks
    ledger = Ledger(world)
    view = world.dataset("view", resources=[
        {"name": "data", "url": "http://data.invalid/data.csv"},
        {"name": "restricted-secret", "url": "http://data.invalid/secret.csv"}])
    ledger.track(view["id"])
    data, secret = (r["id"] for r in view["resources"])
    got = ledger.step(
        "created with two resources",
        want(ALL4 + ORG_HOOKS, "dataset/create", view["id"], "created"),
        want(ALL4, "resource/create", view["id"], resource=data),
        want(["editor", "outsider", "sysadmin"], "resource/create", view["id"],
             resource=secret))
    # The plugin ran in the worker as each reader: four different renderings.
    emails = {label: got[f"/{label}/dataset/create"][0]["data"]["author_email"]
              for label in ALL4}
    assert emails == {"anon": reader_label(None),
                      "editor": reader_label(world.readers["editor"].name),
                      "outsider": reader_label(world.readers["outsider"].name),
                      "sysadmin": "author@example.invalid"}
    for label in ("anon", "editor", "outsider"):
        for resource in got[f"/{label}/dataset/create"][0]["data"]["resources"]:
            assert resource["url"] == redacted_url(world.readers[label].name)
        for body in got[f"/{label}/resource/create"]:
            assert body["data"]["url"] == redacted_url(world.readers[label].name)
    assert {r["url"] for r in got["/sysadmin/dataset/create"][0]["data"]["resources"]} == {
        "http://data.invalid/data.csv", "http://data.invalid/secret.csv"}

    world.admin.action.package_patch(id=view["id"], notes="changed")
    ledger.step("dataset edited", want(ALL4, "dataset/update", view["id"]))
    world.admin.action.resource_patch(id=secret, description="changed")
    ledger.step("restricted resource edited",
                want(ALL4, "dataset/update", view["id"]),
                want(["editor", "outsider", "sysadmin"], "resource/update", view["id"],
                     resource=secret))
    world.admin.action.resource_patch(id=data, description="changed")
    ledger.step("plain resource edited",
                want(ALL4, "dataset/update", view["id"]),
                want(ALL4, "resource/update", view["id"], resource=data))
    world.admin.action.resource_delete(id=secret)
    ledger.step("restricted resource deleted",
                want(ALL4, "dataset/update", view["id"]),
                want(["editor", "outsider", "sysadmin"], "resource/delete", view["id"],
                     resource=secret))
    world.admin.action.resource_delete(id=data)
    ledger.step("plain resource deleted",
                want(ALL4, "dataset/update", view["id"]),
                want(ALL4, "resource/delete", view["id"], resource=data))
    ledger.finish()


def test_a_reader_whose_rendering_fails_gets_nothing_and_delays_nobody(world):
    """package_show raises for non-sysadmins on 'explode*' datasets: those
    readers get nothing for the event, their rendering is retried on the
    retry schedule and given up; the sysadmin gets it at once, and the next
    event reaches everybody while the failed renderings are still retried."""
    ledger = Ledger(world)
    boom = world.dataset("explode")
    ledger.track(boom["id"])
    got = ledger.step("explode created",
                      want(["sysadmin"], "dataset/create", boom["id"], "created"))
    body = got["/sysadmin/dataset/create"][0]
    event_id = body["event_id"]
    failing = {world.readers[label].audience for label in ("anon", "editor", "outsider")}
    sysadmin = world.readers["sysadmin"].audience
    rows = _wait_rendering(
        event_id, failing,
        lambda row: row["data"] is None and row["attempts"] >= 1 and row["error"],
        "a pending rendering per failing audience")
    rows = _wait_rendering(event_id, {sysadmin}, lambda row: row["data"] is not None,
                           "the sysadmin's rendering")
    assert rows[sysadmin]["data"] == body["data"]
    for audience in failing:
        assert ("RuntimeError" in rows[audience]["error"]
                or "cannot show" in rows[audience]["error"]), rows[audience]["error"]

    fine = world.dataset("fine")
    ledger.track(fine["id"])
    got = ledger.step("a later dataset created",
                      want(ALL4 + ORG_HOOKS, "dataset/create", fine["id"], "created"))
    rows = _rendering(event_id)
    for audience in failing:  # not waiting behind the failing renderings
        assert rows[audience]["data"] is None and rows[audience]["due"] is not None, (
            "the later event waited until the failed rendering was given up", rows[audience])
    fine_event = got["/anon/dataset/create"][0]["event_id"]
    fine_rows = _rendering(fine_event)
    for label in ALL4:
        assert (fine_rows[world.readers[label].audience]["data"]
                == got[f"/{label}/dataset/create"][0]["data"]), label

    schedule = _schedule()
    rows = _wait_rendering(event_id, failing, lambda row: row["due"] is None,
                           "the failed renderings given up",
                           timeout=WAIT + sum(schedule) * 1.2)
    for audience in failing:
        assert rows[audience]["data"] is None and rows[audience]["error"], rows[audience]
        assert rows[audience]["attempts"] == len(schedule), rows[audience]
    ledger.finish()


def test_visibility_transitions(world):
    """Private, public, renamed while hidden, moved to an organization the
    editor cannot read and back, deleted, undeleted, purged; a draft made
    active. Each reader hears create/update/delete as its own view changes,
    with the reason, and never an update of what it cannot read."""
    ledger = Ledger(world)
    admin = world.admin.action
    ds = world.dataset("vis", private=True)
    ledger.track(ds["id"])
    ledger.step("created private",
                want(["editor", "sysadmin"], "dataset/create", ds["id"], "created"))
    admin.package_patch(id=ds["id"], title="Private edit")
    ledger.step("private edited", want(["editor", "sysadmin"], "dataset/update", ds["id"]))
    resource = admin.resource_create(package_id=ds["id"], name="data",
                                     url="http://data.invalid/v")["id"]
    ledger.step("resource added while private",
                want(["editor", "sysadmin"], "dataset/update", ds["id"]),
                want(["editor", "sysadmin"], "resource/create", ds["id"], resource=resource))
    admin.resource_delete(id=resource)
    ledger.step("resource deleted while private",
                want(["editor", "sysadmin"], "dataset/update", ds["id"]),
                want(["editor", "sysadmin"], "resource/delete", ds["id"], resource=resource))

    admin.package_patch(id=ds["id"], private=False)
    ledger.step("made public",
                want(["anon", "outsider"] + ORG_HOOKS, "dataset/create", ds["id"], "visible"),
                want(["editor", "sysadmin"], "dataset/update", ds["id"]))
    old_name, new_name = ds["name"], _name("vis-renamed")
    admin.package_patch(id=ds["id"], private=True, name=new_name)
    ledger.step("renamed and made private in one change",
                want(["anon", "outsider"] + ORG_HOOKS, "dataset/delete", ds["id"], "hidden",
                     name=old_name),
                want(["editor", "sysadmin"], "dataset/update", ds["id"]))
    admin.package_patch(id=ds["id"], owner_org=world.org_b["id"])
    ledger.step("private, moved to an organization the editor cannot read",
                want(["editor"], "dataset/delete", ds["id"], "hidden", name=new_name),
                want(["sysadmin"], "dataset/update", ds["id"]),
                first_move_echo(["sysadmin"], ds["id"]))
    admin.package_patch(id=ds["id"], title="Edited elsewhere")
    ledger.step("edited where only the sysadmin reads it",
                want(["sysadmin"], "dataset/update", ds["id"]))
    admin.package_patch(id=ds["id"], owner_org=world.org_a["id"])
    ledger.step("moved back into the editor's organization",
                want(["editor"], "dataset/create", ds["id"], "visible"),
                want(["sysadmin"], "dataset/update", ds["id"]))
    admin.package_patch(id=ds["id"], private=False)
    ledger.step("made public again",
                want(["anon", "outsider"] + ORG_HOOKS, "dataset/create", ds["id"], "visible"),
                want(["editor", "sysadmin"], "dataset/update", ds["id"]))
    admin.package_delete(id=ds["id"])
    ledger.step("deleted",
                want(ALL4 + ORG_HOOKS, "dataset/delete", ds["id"], "deleted", name=new_name))
    admin.package_patch(id=ds["id"], state="active")
    ledger.step("undeleted",
                want(ALL4 + ORG_HOOKS, "dataset/create", ds["id"], "restored"))
    admin.dataset_purge(id=ds["id"])
    ledger.step("purged",
                want(ALL4 + ORG_HOOKS, "dataset/delete", ds["id"], "purged", name=new_name))

    draft = world.dataset("draft", state="draft")
    ledger.track(draft["id"])
    admin.package_patch(id=draft["id"], state="active")
    ledger.step("a draft made active (the draft itself sent nothing)",
                want(ALL4 + ORG_HOOKS, "dataset/create", draft["id"], "created"))
    ledger.finish()


def test_organization_and_group_filter_moves(world):
    """A dataset that stays visible but leaves or joins a hook's organization or
    group filter is filtered_out / filtered_in for that hook (anonymous and
    user-bound alike); made private inside the filter it is hidden."""
    ledger = Ledger(world)
    admin = world.admin.action
    ds = world.dataset("filt")
    ledger.track(ds["id"])
    ledger.step("created in organization A",
                want(ALL4 + ORG_HOOKS, "dataset/create", ds["id"], "created"))
    admin.package_patch(id=ds["id"], owner_org=world.org_b["id"])
    ledger.step("moved to organization B",
                want(ORG_HOOKS, "dataset/delete", ds["id"], "filtered_out", name=ds["name"]),
                want(ALL4, "dataset/update", ds["id"]),
                first_move_echo(ALL4, ds["id"]))
    admin.package_patch(id=ds["id"], owner_org=world.org_a["id"])
    ledger.step("moved back to organization A",
                want(ORG_HOOKS, "dataset/create", ds["id"], "filtered_in"),
                want(ALL4, "dataset/update", ds["id"]))
    admin.package_patch(id=ds["id"], groups=[{"id": world.group["id"]}])
    ledger.step("added to group G",
                want(GRP_HOOKS, "dataset/create", ds["id"], "filtered_in"),
                want(ALL4, "dataset/update", ds["id"]))
    admin.package_patch(id=ds["id"], private=True)
    ledger.step("made private inside both filters",
                want(["anon", "outsider"] + ORG_HOOKS + GRP_HOOKS, "dataset/delete", ds["id"],
                     "hidden", name=ds["name"]),
                want(["editor", "sysadmin"], "dataset/update", ds["id"]))
    admin.package_patch(id=ds["id"], private=False)
    ledger.step("made public inside both filters",
                want(["anon", "outsider"] + ORG_HOOKS + GRP_HOOKS, "dataset/create", ds["id"],
                     "visible"),
                want(["editor", "sysadmin"], "dataset/update", ds["id"]))
    admin.package_patch(id=ds["id"], groups=[])
    ledger.step("removed from group G",
                want(GRP_HOOKS, "dataset/delete", ds["id"], "filtered_out", name=ds["name"]),
                want(ALL4, "dataset/update", ds["id"]))
    ledger.finish()


def test_collaborators_count_and_deletes_are_judged_before_the_delete(world):
    """The outsider, a collaborator of a dataset, keeps reading it when it is
    made private (update, not delete), and hears its deletion: CKAN's own
    authorization with the state before the delete decides."""
    admin = world.admin.action
    ds = world.dataset("collab")
    admin.package_collaborator_create(id=ds["id"], user_id=world.readers["outsider"].name,
                                      capacity="member")
    # Judged from here on (what adding the collaborator sent, if anything, is not).
    Ledger(world).sync()
    ledger = Ledger(world)
    ledger.track(ds["id"])
    admin.package_patch(id=ds["id"], private=True)
    ledger.step("made private: the collaborator still reads it",
                want(["anon", "anon-org"], "dataset/delete", ds["id"], "hidden", name=ds["name"]),
                want(["editor", "outsider", "sysadmin"], "dataset/update", ds["id"]))
    admin.package_patch(id=ds["id"], title="Collaborators only")
    ledger.step("edited while private",
                want(["editor", "outsider", "sysadmin"], "dataset/update", ds["id"]))
    admin.package_delete(id=ds["id"])
    ledger.step("deleted while private",
                want(["editor", "outsider", "sysadmin", "outsider-org"], "dataset/delete",
                     ds["id"], "deleted", name=ds["name"]))
    ledger.finish()


def test_organization_bulk_actions(world):
    """bulk_update_private / _public / _delete (CKAN 2.11 writes these with one
    SQL UPDATE, 2.12 with package_patch) give the same per-reader events."""
    ledger = Ledger(world)
    admin = world.admin.action
    first, second = world.dataset("bulk"), world.dataset("bulk")
    ids = [first["id"], second["id"]]
    ledger.track(*ids)
    ledger.step("two datasets created", *(
        want(ALL4 + ORG_HOOKS, "dataset/create", i, "created") for i in ids))
    admin.bulk_update_private(datasets=ids, org_id=world.org_a["id"])
    ledger.step("bulk made private", *(
        group for d in (first, second) for group in (
            want(["anon", "outsider"] + ORG_HOOKS, "dataset/delete", d["id"], "hidden",
                 name=d["name"]),
            want(["editor", "sysadmin"], "dataset/update", d["id"]))))
    admin.bulk_update_public(datasets=ids, org_id=world.org_a["id"])
    ledger.step("bulk made public", *(
        group for i in ids for group in (
            want(["anon", "outsider"] + ORG_HOOKS, "dataset/create", i, "visible"),
            want(["editor", "sysadmin"], "dataset/update", i))))
    admin.bulk_update_delete(datasets=ids, org_id=world.org_a["id"])
    ledger.step("bulk deleted", *(
        want(ALL4 + ORG_HOOKS, "dataset/delete", d["id"], "deleted", name=d["name"])
        for d in (first, second)))
    ledger.finish()


class HoldingReceiver:
    """A receiver (127.0.0.3) that answers the verification handshake and
    holds the first delivery until ``release`` is set, then answers it 503;
    later deliveries get 200. Records (body, status) of each delivery."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.first_arrived = threading.Event()
        self.deliveries: list[tuple[dict, int]] = []
        self._lock = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                challenge = self.headers.get("webhook-challenge")
                if challenge is not None:
                    return self._answer(200, challenge.encode())
                with receiver._lock:
                    first = not receiver.deliveries
                    status = 503 if first else 200
                    receiver.deliveries.append((json.loads(body), status))
                    receiver._lock.notify_all()
                if first:
                    receiver.first_arrived.set()
                    receiver.release.wait(WAIT)
                self._answer(status, b"{}")

            def _answer(self, status: int, reply: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.3", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.3:{self.server.server_address[1]}{path}"

    def wait_for(self, predicate, what: str) -> None:
        with self._lock:
            if not self._lock.wait_for(lambda: predicate(self.deliveries), WAIT):
                raise AssertionError(f"{what}: got {self.deliveries}")

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def test_resource_authorization_is_checked_again_at_delivery(world):
    """An anonymous resource/update delivery is held in flight at the receiver
    while the resource becomes 'restricted' (anonymous may no longer
    resource_show it), then answered 503: the retry, prepared after the
    change, is not sent; the restricted update itself never arrives; the
    next allowed update does."""
    admin = world.admin.action
    ds = world.dataset("recheck", resources=[{"name": "data", "url": "http://data.invalid/r"}])
    resource = ds["resources"][0]["id"]
    holding = HoldingReceiver()
    try:
        hook = world.readers["anon"].client.action.webhook_create(
            topic="resource/update", address=holding.url("/recheck"), dataset=ds["id"])
        admin.resource_patch(id=resource, description="first")
        assert holding.first_arrived.wait(WAIT), "the first update did not arrive"
        [(first, _status)] = holding.deliveries
        assert first["data"]["description"] == "first" and first["data"]["name"] == "data"
        assert first["data"] == world.readers["anon"].show("resource_show", resource)
        admin.resource_patch(id=resource, name="restricted-now")  # committed before the 503
        holding.release.set()
        # The restricted update is an event, fanned out while the resource is
        # restricted (the sysadmin heard it so) ...
        world.receiver.wait_for(lambda rs: any(
            r.path == "/sysadmin/resource/update" and r.json["data"]["id"] == resource
            and r.json["data"]["name"] == "restricted-now" for r in rs), WAIT)
        # ... and the first event's retry, due while the resource is restricted,
        # is settled (its row gone) without being sent again ...
        until(lambda: not _rows("SELECT 1 FROM webhooks_delivery WHERE hook_id = :h"
                                " AND event_id = :e", h=hook, e=first["event_id"]),
              WAIT, "the failed delivery settled")
        # ... and the next allowed update arrives.
        admin.resource_patch(id=resource, name="data-again")
        holding.wait_for(lambda ds_: any(b["data"]["name"] == "data-again" for b, _ in ds_),
                         "the allowed update after the restricted one")
        sent = [(b["event_id"], b["data"]["name"], status) for b, status in holding.deliveries]
        assert len(sent) == 2 and sent[0] == (first["event_id"], "data", 503), sent
        assert sent[1][0] != first["event_id"] and sent[1][1:] == ("data-again", 200), sent
        assert holding.deliveries[1][0]["data"] == world.readers["anon"].show(
            "resource_show", resource)
    finally:
        holding.stop()


def _log_in(url: str, user: dict) -> requests.Session:
    web = requests.Session()
    form = _csrf_token(web.get(f"{url}/user/login").text)
    web.post(f"{url}/user/login", data={"login": user["name"], "password": PASSWORD,
                                        "_csrf_token": form})
    page = web.get(f"{url}/dashboard/datasets")
    assert page.status_code == 200 and user["name"] in page.text, "login failed"
    return web


def test_a_session_cookie_binds_a_hook_only_with_the_csrf_token(world):
    """A logged-in browser's cookie alone cannot create a hook through the
    action API (403, nothing stored), even after anonymous API use; with
    CKAN's CSRF token (header or form field), or through the extension's own
    form, the hook is bound to that user and hears that user's view."""
    member = world.new_user("member")
    web = _log_in(world.url, member)
    ckanapi.RemoteCKAN(world.url).action.status_show()  # anonymous API use first
    api = f"{world.url}/api/3/action/webhook_create"
    refused = {
        "form": {"data": {"topic": "dataset/update"}},
        "json": {"json": {"topic": "dataset/update"}},
        "bad-token": {"data": {"topic": "dataset/update"},
                          "headers": {"X-CSRFToken": "not-the-token"}},
    }
    addresses, statuses = [], {}
    for kind, request in refused.items():
        address = world.receiver.url(f"/csrf-refused/{kind}")
        body = request.get("data") or request.get("json")
        body["address"] = address
        statuses[kind] = web.post(api, **request).status_code
        addresses.append(address)
    assert _rows("SELECT id FROM webhooks WHERE address = ANY(:a)", a=addresses) == []
    assert not {kind: status for kind, status in statuses.items() if status == 200}

    token = _csrf_token(web.get(f"{world.url}/webhooks/new").text)
    reader = Reader("member", world.url, member, session=web)
    ledger = Ledger(world)
    bound = {}
    accepted = {
        "header-form": {"data": {}, "headers": {"X-CSRFToken": token}},
        "field-form": {"data": {"_csrf_token": token}},
        "header-json": {"json": {}, "headers": {"X-CSRFToken": token}},
    }
    for kind, request in accepted.items():
        path = f"/csrf-bound/{kind}/dataset/update"
        body = request.get("data") if "data" in request else request["json"]
        body.update(topic="dataset/update", address=world.receiver.url(path))
        answer = web.post(api, **request)
        assert answer.status_code == 200, (kind, answer.status_code, answer.text[:300])
        bound[path] = answer.json()["result"]
    path = "/csrf-bound/page/dataset/update"
    page = web.post(f"{world.url}/webhooks/new", data={
        "_csrf_token": _csrf_token(web.get(f"{world.url}/webhooks/new").text),
        "topic": "dataset/update", "address": world.receiver.url(path)})
    assert page.status_code == 200
    [row] = _rows("SELECT id FROM webhooks WHERE address = :a", a=world.receiver.url(path))
    bound[path] = row["id"]
    anon = world.readers["anon"].client
    for path, hook in bound.items():
        [row] = _rows("SELECT user_id FROM webhooks WHERE id = :h", h=hook)
        assert row["user_id"] == member["id"], path
        assert anon.action.webhook_show(id=hook)["reader"] == member["name"], path
        ledger.add_path(path, reader, hook)

    ds = world.dataset("csrf", private=True)
    ledger.track(ds["id"])
    ledger.step("private dataset created",
                want(["editor", "sysadmin"], "dataset/create", ds["id"], "created"))
    world.admin.action.package_patch(id=ds["id"], notes="for members")
    got = ledger.step("private dataset edited",
                      want(["editor", "sysadmin"], "dataset/update", ds["id"]),
                      [(path, Want("dataset/update", ds["id"])) for path in bound])
    for path in bound:
        assert got[path][0]["data"]["author_email"] == reader_label(member["name"])
    ledger.finish()
    # Refused as the contract says (checked last, so that the rest is judged too).
    assert statuses == {kind: 403 for kind in refused}


def test_revoked_token_falls_back_to_anonymous_and_deleted_user_hears_nothing(world):
    """A hook bound through an API token hears its user's view; once the token
    is revoked, public data only, as anonymous sees it. A deleted user's
    hook hears nothing at all."""
    admin = world.admin.action
    keeper = world.new_user("member")
    keeper_token = factories.APIToken(user=keeper["name"])["token"]
    keeper_reader = Reader("keeper", world.url, keeper, keeper_token)
    leaver = world.new_user("member")
    leaver_reader = Reader("leaver", world.url, leaver,
                           factories.APIToken(user=leaver["name"])["token"])
    ledger = Ledger(world)
    hooks = {}
    for reader in (keeper_reader, leaver_reader):
        path = f"/{reader.label}/dataset/update"
        hooks[reader.label] = reader.client.action.webhook_create(
            topic="dataset/update", address=world.receiver.url(path))
        assert world.readers["anon"].client.action.webhook_show(
            id=hooks[reader.label])["reader"] == reader.name
        ledger.add_path(path, reader, hooks[reader.label])
    private = world.dataset("tok-private", private=True)
    public = world.dataset("tok-public")
    ledger.track(private["id"], public["id"])
    ledger.step("created",
                want(["editor", "sysadmin"], "dataset/create", private["id"], "created"),
                want(ALL4 + ORG_HOOKS, "dataset/create", public["id"], "created"))
    admin.package_patch(id=private["id"], notes="members only")
    got = ledger.step("private edited",
                      want(["editor", "sysadmin", "keeper", "leaver"], "dataset/update",
                           private["id"]))
    assert got["/keeper/dataset/update"][0]["data"]["author_email"] == reader_label(
        keeper["name"])

    keeper_reader.client.action.api_token_revoke(token=keeper_token)
    admin.user_delete(id=leaver["id"])
    ledger.paths["/keeper/dataset/update"].reader = world.readers["anon"]
    ledger.paths["/leaver/dataset/update"].hears_sync = False
    admin.package_patch(id=private["id"], notes="members only, again")
    ledger.step("private edited after the revocation",
                want(["editor", "sysadmin"], "dataset/update", private["id"]))
    admin.package_patch(id=public["id"], notes="for everyone")
    got = ledger.step("public edited after the revocation",
                      want(ALL4 + ["keeper"], "dataset/update", public["id"]))
    assert got["/keeper/dataset/update"][0]["data"]["author_email"] == reader_label(None)
    sync_id = ledger.finish()
    # The deleted user's hook: every event since its deletion (two edits and
    # the later dataset's) was fanned out, and the hook has no delivery,
    # attempt or pending rendering for any of them.
    events = {b["event_id"] for b in ledger.received("/editor/dataset/update")[1:]}
    events |= {b["event_id"] for path in ledger.paths if path.startswith("/anon/")
               for b in ledger.received(path, datasets={sync_id})}
    assert len(events) >= 5
    fanned = _rows("SELECT id FROM webhooks_event WHERE id = ANY(:e) AND fanned_out IS NOT NULL",
                   e=list(events))
    assert len(fanned) == len(events)
    assert _rows("SELECT event_id FROM webhooks_delivery WHERE hook_id = :h",
                 h=hooks["leaver"]) == []
    assert _rows("SELECT event_id FROM webhooks_attempt WHERE hook_id = :h AND event_id = ANY(:e)",
                 h=hooks["leaver"], e=list(events)) == []
    assert _rows("SELECT event_id FROM webhooks_rendering WHERE audience = :a"
                 " AND event_id = ANY(:e) AND data IS NULL AND due IS NOT NULL",
                 a=leaver["id"], e=list(events)) == []
    assert len(ledger.received("/leaver/dataset/update")) == 1  # the edit before
    assert ledger.received("/leaver/dataset/update", datasets={sync_id}) == []
