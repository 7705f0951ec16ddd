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


@webhooks.command(name="list")
@click.option("--topic", default=None, help="Only hooks of this topic.")
def list_hooks(topic):
    """List hooks with their delivery statistics, as JSON lines."""
    site_user = toolkit.get_action("get_site_user")({"ignore_auth": True}, {})
    offset = 0
    while True:
        page = toolkit.get_action("webhook_list")(
            {"user": site_user["name"]},
            {"topic": topic, "limit": 500, "offset": offset} if topic
            else {"limit": 500, "offset": offset})
        for hook in page:
            click.echo(json.dumps(hook))
        if len(page) < 500:
            break
        offset += 500

