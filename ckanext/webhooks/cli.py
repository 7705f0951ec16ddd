"""``ckan webhooks ...`` commands for site admins."""
from __future__ import annotations

import json

import click

from ckan.plugins import toolkit

from . import __version__

__all__ = ["webhooks"]


@click.group(short_help="Webhooks: run the delivery worker, inspect and prune hooks.")
@click.version_option(__version__, prog_name="ckanext-webhooks")
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
    from .worker import run_worker
    run_worker(ctx.meta["flask_app"], concurrency, beat, loglevel, pool)


@webhooks.command()
def prune():
    """Pause stale hooks, delete those paused by a rule past the grace period,
    delete old events and attempts now, and report what was done."""
    from .maintenance import prune as run_prune
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
@click.option("--state", type=click.Choice(["healthy", "failing", "paused"]), default=None,
              help="healthy: last attempt succeeded or none yet; failing: failing now; "
                   "paused: hears nothing until resumed.")
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
@click.option("--address", default=None, help="A new address (verified by the handshake).")
@click.option("--topic", "topics", multiple=True,
              help="The new topics (repeat it; replaces the old ones).")
@click.option("--dataset", default=None, help="A new dataset filter ('' removes it).")
@click.option("--organization", default=None, help="A new organization filter ('' removes it).")
@click.option("--group", default=None, help="A new group filter ('' removes it).")
@click.option("--secret", default=None,
              help="A new signing secret (the old one signs beside it for the rotation "
                   "window); '' drops the secret.")
def update(hook_id, address, topics, dataset, organization, group, secret):
    """Change one hook (only what is given changes)."""
    data = {key: value for key, value in dict(
        address=address, dataset=dataset, organization=organization, group=group,
        secret=secret).items() if value is not None}
    if topics:
        data["topics"] = list(topics)
    click.echo(json.dumps(_action("webhook_update", id=hook_id, **data), indent=2))


@webhooks.command()
@click.argument("hook_id")
def pause(hook_id):
    """Pause one hook: nothing is queued for it, its pending deliveries are held."""
    _action("webhook_update", id=hook_id, active=False)
    click.echo("paused")


@webhooks.command()
@click.argument("hook_id")
def resume(hook_id):
    """Resume a paused hook: its held deliveries go out."""
    _action("webhook_update", id=hook_id, active=True)
    click.echo("resumed")


@webhooks.command()
@click.argument("hook_id")
@click.option("--since", required=True, type=click.DateTime(),
              help="Events since this time (UTC), e.g. 2026-11-23T10:00:00.")
@click.option("--until", default=None, type=click.DateTime(),
              help="Events until this time (UTC; default now).")
def recover(hook_id, since, until):
    """Send one hook again every event it would have heard in a window."""
    data = {"since": since.isoformat()}
    if until:
        data["until"] = until.isoformat()
    click.echo(json.dumps(_action("webhook_recover", id=hook_id, **data)))


@webhooks.command()
@click.argument("hook_id")
def ping(hook_id):
    """Send a ping event to one hook now and show the outcome."""
    click.echo(json.dumps(_action("webhook_ping", id=hook_id)))


@webhooks.command()
@click.option("--max-lag", type=float, default=300.0, show_default=True,
              help="Seconds an event may wait for its fan-out, or a due delivery for a "
                   "worker, before delivery counts as unhealthy.")
def health(max_lag):
    """Exit 0 when workers are alive, one listens, and nothing has waited longer
    than --max-lag; else exit 2 (Nagios: critical) with the reasons on one line.
    For a systemd watchdog, a Kubernetes probe or a Nagios check."""
    from . import health as checks
    found = checks.problems(max_lag)
    if found:
        click.echo("UNHEALTHY: " + "; ".join(found))
        raise SystemExit(2)
    now = checks.state()
    click.echo(f"OK: {now['workers']} worker(s) alive, {now['due']} delivery(ies) due")


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
    from .delivery_queue import requeue
    failed = report.failed_deliveries(since)
    with click.progressbar(failed, label=f"Queueing {len(failed)} failed deliveries") as bar:
        requeue(bar)
    click.echo(f"queued {len(failed)}")


def _passphrase(option: str | None, confirm: bool) -> str:
    """From the option, the environment, or a prompt (never echoed)."""
    import os
    value = option or os.environ.get("CKANEXT_WEBHOOKS_EXPORT_PASSPHRASE")
    if not value:
        value = click.prompt("Passphrase for the secrets in the file", hide_input=True,
                             confirmation_prompt=confirm)
    if len(value) < 12:
        raise click.ClickException("The passphrase must have at least 12 characters")
    return value


@webhooks.command(name="export")
@click.option("--output", "-o", type=click.File("w"), default="-",
              help="File to write (default: standard output).")
@click.option("--passphrase", default=None,
              help="Encrypts the signing secrets in the file (else "
                   "CKANEXT_WEBHOOKS_EXPORT_PASSPHRASE, else asked for).")
@click.option("--without-secrets", is_flag=True,
              help="Leave the signing secrets out (the hooks are imported unsigned).")
def export_hooks(output, passphrase, without_secrets):
    """Write every hook (with its id, and its secret encrypted with a
    passphrase) as JSON, to move it to another portal."""
    import base64
    import os
    from ckan import model
    from . import crypto
    from .model import Webhook
    sealed = None
    document = {"format": "ckanext-webhooks-export/2", "hooks": []}
    if not without_secrets:
        salt = os.urandom(16)
        sealed = crypto.passphrase_key(_passphrase(passphrase, confirm=True), salt)
        document["secrets"] = {"cipher": "fernet", "kdf": "scrypt", "n": 2 ** 15, "r": 8,
                               "p": 1, "salt": base64.b64encode(salt).decode("ascii")}
    for h in model.Session.query(Webhook).order_by(Webhook.created):
        secret = crypto.unseal(h.secret) if sealed is not None else None
        document["hooks"].append({
            "id": h.id, "topics": list(h.topics), "address": h.address, "active": h.active,
            "secret": sealed.encrypt(secret.encode()).decode("ascii") if secret else None,
            "dataset": h.dataset_id, "organization": h.organization_id, "group": h.group_id,
            "user_id": h.user_id, "token_id": h.token_id, "created": h.created.isoformat()})
    json.dump(document, output, indent=2)
    output.write("\n")
    click.echo(f"exported {len(document['hooks'])} hooks", err=True)


@webhooks.command(name="import")
@click.argument("source", type=click.File("r"))
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the verification handshake with each address first.")
@click.option("--passphrase", default=None,
              help="The export's passphrase (else CKANEXT_WEBHOOKS_EXPORT_PASSPHRASE, else "
                   "asked for).")
def import_hooks(source, verify, passphrase):
    """Create hooks from an export, keeping their ids; each address is checked
    (and verified) as on creation, and refused ones are reported, not imported."""
    import base64
    from ckan import model
    from . import crypto, guard, verification
    from .logic.validators import webhooks_secret, webhooks_topics
    from .model import Webhook, utcnow
    document = json.load(source)
    # An export of 0.1.0 is a plain list, its secrets in clear.
    items = document if isinstance(document, list) else document.get("hooks", [])
    sealed = None
    if isinstance(document, dict) and document.get("secrets"):
        sealed = crypto.passphrase_key(_passphrase(passphrase, confirm=False),
                                       base64.b64decode(document["secrets"]["salt"]))
    imported, refused = 0, []
    for item in items:
        try:
            chosen = item.get("topics") or ([item["topic"]] if item.get("topic") else None)
            try:
                chosen = webhooks_topics(chosen)
            except toolkit.Invalid:
                raise ValueError("unknown topic")
            secret = item.get("secret")
            if secret and sealed is not None:
                try:
                    secret = sealed.decrypt(secret.encode("ascii")).decode("utf-8")
                except Exception:  # noqa: BLE001 - a wrong passphrase, reported per hook
                    raise ValueError("its secret does not decrypt with this passphrase")
            target = guard.resolve(item["address"])
            if verify:
                verification.verify(item["address"], chosen)
            if model.Session.get(Webhook, item["id"]) is not None:
                raise ValueError("a hook with this id exists")
            model.Session.add(Webhook(
                id=item["id"], topics=chosen, address=item["address"],
                active=item.get("active", True) is not False,
                host=target.host, site=guard.site_of(target.host),
                secret=crypto.seal(webhooks_secret(secret)),
                dataset_id=item.get("dataset"), organization_id=item.get("organization"),
                group_id=item.get("group"), user_id=item.get("user_id"),
                token_id=item.get("token_id"), created=utcnow()))
            model.Session.commit()
            imported += 1
        except Exception as error:  # noqa: BLE001 - report and go on with the others
            model.Session.rollback()
            refused.append({"address": item.get("address"), "error": str(error)})
    click.echo(json.dumps({"imported": imported, "refused": refused}))


@webhooks.command(name="new-key")
def new_key():
    """Print a new key for ckanext.webhooks.secret_keys."""
    from . import crypto
    click.echo(crypto.new_key())


@webhooks.command(name="rotate-key")
def rotate_key():
    """Re-encrypt every stored signing secret with the first configured key
    (put the new key first in ckanext.webhooks.secret_keys, keep the old one
    after it, run this, then remove the old one)."""
    import sqlalchemy as sa
    from ckan import model
    from . import crypto
    rotated = failed = 0
    for hook_id, secret, previous in model.Session.execute(sa.text(
            "SELECT id, secret, previous_secret FROM webhooks "
            "WHERE secret IS NOT NULL OR previous_secret IS NOT NULL")).all():
        try:
            model.Session.execute(sa.text(
                "UPDATE webhooks SET secret = :s, previous_secret = :p WHERE id = :id"),
                {"s": crypto.rotate(secret) if secret else None,
                 "p": crypto.rotate(previous) if previous else None, "id": hook_id})
            rotated += 1
        except crypto.SecretUnreadable:
            failed += 1
    model.Session.commit()
    click.echo(json.dumps({"rotated": rotated, "unreadable": failed}))
    if failed:
        raise click.ClickException(f"{failed} secret(s) decrypt with none of the keys")
