"""``ckan webhooks ...`` commands for site admins."""
from __future__ import annotations

import json

import click

from ckan.plugins import toolkit

__all__ = ["webhooks"]


@click.group(short_help="Webhooks: run the delivery worker, inspect and prune hooks.")
def webhooks():
    """Manage ckanext-webhooks."""


@webhooks.command()
@click.option("--concurrency", "-c", type=int, default=None,
              help="Worker processes (default: one per CPU core).")
@click.option("--beat/--no-beat", default=True, show_default=True,
              help="Also run the periodic sweep and prune tasks in this worker.")
@click.option("--pool", type=click.Choice(["prefork", "solo", "threads"]), default=None,
              help="Celery execution pool (default: prefork).")
@click.option("--loglevel", default="INFO", show_default=True)
@click.pass_context
def worker(ctx, concurrency, beat, pool, loglevel):
    """Start the Celery worker that delivers webhooks."""
    from .celery_app import run_worker
    run_worker(ctx.meta["flask_app"], concurrency, beat, loglevel, pool)


@webhooks.command()
def prune():
    """Delete stale hooks and old events now, and report what was removed."""
    from .dispatcher import prune as run_prune
    click.echo(json.dumps(run_prune()))


def _site() -> dict:
    site_user = toolkit.get_action("get_site_user")({"ignore_auth": True}, {})
    return {"user": site_user["name"], "ignore_auth": True}


def _action(name: str, **data):
    try:
        return toolkit.get_action(name)(_site(), data)
    except toolkit.ObjectNotFound:
        raise click.ClickException("No webhook with that id")
    except toolkit.ValidationError as error:
        raise click.ClickException(json.dumps(error.error_dict))


@webhooks.command(name="list")
@click.option("--topic", default=None, help="Only hooks of this topic.")
@click.option("--host", default=None, help="Only hooks whose address is on this host.")
@click.option("--state", type=click.Choice(["healthy", "failing"]), default=None,
              help="healthy: last attempt succeeded or none yet; failing: failing now.")
def list_hooks(topic, host, state):
    """List hooks with their statistics, one JSON object per line."""
    from . import report
    from .logic.action import _dictize
    for hook in report.hooks(topic, host, state).yield_per(500):
        click.echo(json.dumps(_dictize(hook)))


@webhooks.command()
@click.argument("hook_id")
def show(hook_id):
    """Show one hook."""
    click.echo(json.dumps(_action("webhook_show", id=hook_id), indent=2))


@webhooks.command()
@click.argument("hook_id")
def delete(hook_id):
    """Delete one hook."""
    _action("webhook_delete", id=hook_id)
    click.echo("deleted")


@webhooks.command()
@click.argument("hook_id")
def ping(hook_id):
    """Send a ping event to one hook now and show the outcome."""
    click.echo(json.dumps(_action("webhook_ping", id=hook_id)))


@webhooks.command()
def stats():
    """Hooks, their health and the delivery queue, in numbers."""
    from . import report
    click.echo(json.dumps(report.totals(), indent=2))


@webhooks.command()
@click.option("--since", required=True, type=click.DateTime(),
              help="Failed attempts since this time (UTC), e.g. 2026-11-23T10:00:00.")
def redeliver(since):
    """Queue again every event whose delivery failed since a time."""
    from . import report
    from .dispatcher import requeue
    failed = report.failed_deliveries(since)
    with click.progressbar(failed, label=f"Queueing {len(failed)} failed deliveries") as bar:
        requeue(bar)
    click.echo(f"queued {len(failed)}")


@webhooks.command(name="export")
@click.option("--output", "-o", type=click.File("w"), default="-",
              help="File to write (default: standard output). It holds signing secrets.")
def export_hooks(output):
    """Write every hook (with its id and secret) as JSON, to move it to another portal."""
    from ckan import model
    from .model import Webhook
    hooks = [{"id": h.id, "topic": h.topic, "address": h.address, "secret": h.secret,
              "dataset": h.dataset_id, "organization": h.organization_id, "group": h.group_id,
              "user_id": h.user_id, "token_id": h.token_id, "created": h.created.isoformat()}
             for h in model.Session.query(Webhook).order_by(Webhook.created)]
    json.dump(hooks, output, indent=2)
    output.write("\n")
    click.echo(f"exported {len(hooks)} hooks", err=True)


@webhooks.command(name="import")
@click.argument("source", type=click.File("r"))
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the verification handshake with each address first.")
def import_hooks(source, verify):
    """Create hooks from an export, keeping their ids; each address is checked
    (and verified) as on creation, and refused ones are reported, not imported."""
    from ckan import model
    from . import guard, verification
    from .logic.validators import webhooks_secret
    from .model import Webhook, utcnow
    from .topics import TOPICS
    imported, refused = 0, []
    for item in json.load(source):
        try:
            if item.get("topic") not in TOPICS:
                raise ValueError("unknown topic")
            target = guard.resolve(item["address"])
            if verify:
                verification.verify(item["address"], item["topic"])
            if model.Session.get(Webhook, item["id"]) is not None:
                raise ValueError("a hook with this id exists")
            model.Session.add(Webhook(
                id=item["id"], topic=item["topic"], address=item["address"],
                host=target.host, secret=webhooks_secret(item.get("secret")),
                dataset_id=item.get("dataset"), organization_id=item.get("organization"),
                group_id=item.get("group"), user_id=item.get("user_id"),
                token_id=item.get("token_id"), created=utcnow()))
            model.Session.commit()
            imported += 1
        except Exception as error:  # noqa: BLE001 - report and go on with the others
            model.Session.rollback()
            refused.append({"address": item.get("address"), "error": str(error)})
    click.echo(json.dumps({"imported": imported, "refused": refused}))
