"""Fan-out faults stay with their event: a database error while one event fans
out rolls back that event's savepoint only; the others in the same batch are
queued, and an event that keeps failing is set aside (and reported) instead
of heading every later batch. In process, against the real database."""
from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from ckan import model
from ckan.tests import factories

from ckanext.webhooks import fanout, ids, report
from ckanext.webhooks.model import Webhook, WebhookEvent, utcnow

from .processes import closed_port


def _hook(topic: str) -> str:
    hook = Webhook(id=ids.new_hook_id(), topics=[topic], address=f"http://127.0.0.2:{closed_port()}/x",
                   host="127.0.0.2", site="127.0.0.2", created=utcnow())
    model.Session.add(hook)
    model.Session.commit()
    return hook.id


def _deliveries(event_id: str) -> int:
    return model.Session.execute(sa.text(
        "SELECT count(*) FROM webhooks_delivery WHERE event_id = :e"), {"e": event_id}).scalar()


# The suite's shared worker is frozen: this test fans out in process.
@pytest.mark.usefixtures("clean_db", "with_plugins", "only_my_workers")
def test_a_failing_event_is_retried_then_set_aside_while_others_fan_out():
    org = factories.Organization(image_url="")
    _hook("dataset/update")
    dataset = factories.Dataset(owner_org=org["id"])
    model.Session.execute(sa.text("UPDATE webhooks_event SET fanned_out = now()"))
    model.Session.commit()

    poisoned = _poisoned_update_event(dataset)
    healthy = _new_update_event(dataset)

    events, queued = fanout.fan_out()
    model.Session.expire_all()
    assert (events, queued) == (2, 1)
    assert _deliveries(healthy) == 1  # the healthy event went on, in the same batch
    assert _deliveries(poisoned.id) == 0
    event = model.Session.get(WebhookEvent, poisoned.id)
    assert (event.fanout_attempts, event.fanned_out, event.set_aside) == (1, None, None)

    for attempt in range(2, fanout.MAX_FANOUT_ATTEMPTS + 1):
        fanout.fan_out()
        model.Session.expire_all()
        assert model.Session.get(WebhookEvent, poisoned.id).fanout_attempts == attempt
    event = model.Session.get(WebhookEvent, poisoned.id)
    assert event.set_aside is not None and event.fanned_out is not None
    assert fanout.fan_out() == (0, 0)  # no longer heads the batches
    assert report.totals()["events_set_aside"] == 1


def _poisoned_update_event(dataset) -> WebhookEvent:
    """An update event whose captured groups are not a valid array for
    PostgreSQL, so its fan-out statement fails in the database itself."""
    poisoned = model.Session.get(WebhookEvent, _new_update_event(dataset))
    poisoned.snapshot = {**poisoned.snapshot,
                         "_before": {**poisoned.snapshot["_before"], "groups": "{"}}
    model.Session.commit()
    return poisoned


def _new_update_event(dataset) -> str:
    before = {e.id for e in model.Session.query(WebhookEvent)}
    model.Session.remove()
    pkg = model.Package.get(dataset["id"])
    pkg.title = "changed " + ids.new_event_id()
    model.Session.commit()
    (new,) = {e.id for e in model.Session.query(WebhookEvent)} - before
    return new


# The suite's shared worker is frozen: the event waits for its fan-out while
# a hook is created, as it may on a busy portal.
@pytest.mark.usefixtures("clean_db", "with_plugins", "only_my_workers")
def test_a_hook_made_while_an_event_waits_for_its_fan_out_does_not_hear_it():
    org = factories.Organization(image_url="")
    before = _hook("dataset/update")
    dataset = factories.Dataset(owner_org=org["id"])
    model.Session.execute(sa.text("UPDATE webhooks_event SET fanned_out = now()"))
    model.Session.commit()
    event = _new_update_event(dataset)
    after = _hook("dataset/update")

    assert fanout.fan_out() == (1, 1)
    queued = model.Session.execute(sa.text(
        "SELECT hook_id FROM webhooks_delivery WHERE event_id = :e"), {"e": event}
    ).scalars().all()
    assert queued == [before]
    # The next event is the new hook's business.
    later = _new_update_event(dataset)
    assert fanout.fan_out() == (1, 2)
    assert sorted(model.Session.execute(sa.text(
        "SELECT hook_id FROM webhooks_delivery WHERE event_id = :e"), {"e": later}
    ).scalars().all()) == sorted([before, after])


# The suite's shared worker is frozen: this test fans out in process.
@pytest.mark.usefixtures("clean_db", "with_plugins", "only_my_workers")
def test_the_first_claim_takes_its_room_of_what_is_queued_and_nothing_rolled_back():
    """The fan-out claims, in the statement that queues them, as many
    deliveries as its claim has room for, none for a skipped host and none of
    an event whose fan-out failed; the rest are queued due now. The rendering
    it keeps for the deliveries right after is the stored one, keys in the
    same order (the same bytes whether kept or read back)."""
    from ckanext.webhooks import delivery_queue, prepare
    org = factories.Organization(image_url="")
    near = sorted(_hook("dataset/update") for _ in range(3))
    far = _hook("dataset/update")
    model.Session.execute(sa.text("UPDATE webhooks SET host = '127.0.0.4' WHERE id = :id"),
                          {"id": far})
    dataset = factories.Dataset(owner_org=org["id"], notes="x", extras=[
        {"key": "a_longer_key", "value": "1"}, {"key": "b", "value": "2"}])
    model.Session.execute(sa.text("UPDATE webhooks_event SET fanned_out = now()"))
    model.Session.commit()
    poisoned = _poisoned_update_event(dataset)
    healthy = _new_update_event(dataset)

    claim = delivery_queue.FirstClaim(2, ["127.0.0.4"])
    assert fanout.fan_out(claim=claim) == (2, 4)
    jobs = claim.jobs
    assert {job.event_id for job in jobs} == {healthy}  # nothing of the rolled-back event
    assert len(jobs) == 2 and {job.hook_id for job in jobs} < set(near)
    assert {(job.attempts, job.claim_token, job.reader_now, job.hook.address[:17])
            for job in jobs} == {(1, claim.token, "", "http://127.0.0.2:")}
    rows = {hook_id: (token, attempts, later) for hook_id, token, attempts, later in
            model.Session.execute(sa.text("""
                SELECT hook_id, claim_token, attempts, due > now() + interval '30 seconds'
                  FROM webhooks_delivery WHERE event_id = :e"""), {"e": healthy})}
    claimed = {job.hook_id for job in jobs}
    assert rows == {hook_id: ((claim.token, 1, True) if hook_id in claimed else (None, 0, False))
                    for hook_id in near + [far]}

    assert (healthy, "") in prepare._kept_renderings
    kept = prepare._rendering(healthy, "")
    stored = model.Session.execute(sa.text(
        "SELECT data FROM webhooks_rendering WHERE event_id = :e AND audience = ''"),
        {"e": healthy}).scalar()
    assert kept["notes"] == "x" and list(kept)[0] == "id"  # jsonb: shortest keys first
    assert json.dumps(kept) == json.dumps(stored)
    assert prepare._event(healthy).id == healthy
    assert poisoned.id not in prepare._events
