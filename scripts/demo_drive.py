"""Drives the demo through ckanapi, as a real client: subscribe anonymously,
change a dataset as an editor, and show the deliveries the receiver printed."""
import argparse
import json
import time
import uuid
from urllib.parse import urlsplit

import ckanapi

from ckanext.webhooks.ids import fingerprint


def wait_for_lines(path, hook_ids, count, timeout=30):
    """The receiver's lines for our hooks, once ``count`` of them arrived."""
    printed = {fingerprint(hook_id) for hook_id in hook_ids}  # the receiver prints no ids
    deadline = time.time() + timeout
    while True:
        with open(path) as handle:
            lines = [line for line in handle
                     if line.startswith("{") and json.loads(line).get("hook") in printed]
        if len(lines) >= count:
            return lines
        if time.time() > deadline:
            raise SystemExit(f"demo: {len(lines)} of {count} deliveries arrived in {timeout}s")
        time.sleep(0.2)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--receiver", required=True)
    parser.add_argument("--receiver-log", required=True)
    args = parser.parse_args()

    anonymous = ckanapi.RemoteCKAN(args.url)
    editor = ckanapi.RemoteCKAN(args.url, apikey=args.token)  # a sysadmin's token
    # Hooks left in the demo database by an earlier run (of this checkout or
    # another) would receive the same events with the same event ids, and the
    # receiver would drop ours as duplicates: delete every hook on its host.
    receiver_host = urlsplit(args.receiver).hostname
    while old := editor.action.webhook_list(host=receiver_host, limit=1000):
        for hook in old:
            editor.action.webhook_delete(id=hook["id"])
    run = uuid.uuid4().hex[:6]

    print("1. An anonymous consumer subscribes (ckanapi, no API token):")
    hooks = {}
    for topic in ("dataset/create", "dataset/update"):
        address = f"{args.receiver}/{topic}/{run}"
        hooks[topic] = anonymous.action.webhook_create(topic=topic, address=address)
        print(f"   webhook_create(topic={topic!r}, address={address!r})")
    shown = anonymous.action.webhook_show(id=hooks["dataset/update"])
    print("   webhook_show ->", json.dumps({k: shown[k] for k in ("topic", "address", "created")}))

    print("2. An editor creates and then updates a dataset:")
    org = editor.action.organization_create(name=f"demo-org-{run}", title="Demo organization")
    dataset = editor.action.package_create(name=f"demo-dataset-{run}", title="Demo dataset",
                                           owner_org=org["id"],
                                           resources=[{"url": "http://data.invalid/a.csv"}])
    editor.action.package_patch(id=dataset["id"], title="Demo dataset, revised")
    print(f"   package_create + package_patch of {dataset['name']}")

    print("3. The receiver got (from examples/receiver.py's output):")
    for line in wait_for_lines(args.receiver_log, set(hooks.values()), 2):
        print("  ", line.strip())
    # The receiver has it; the worker records the outcome right after.
    deadline = time.monotonic() + 30
    stats = anonymous.action.webhook_show(id=hooks["dataset/update"])["statistics"]
    while stats["deliveries"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        stats = anonymous.action.webhook_show(id=hooks["dataset/update"])["statistics"]
    print("4. webhook_show statistics:", json.dumps(stats))
    print("5. The same in a browser:")
    print(f"   {args.url}/dataset/{dataset['name']}  ('Get notified of changes')")
    print(f"   {args.url}/webhooks/{hooks['dataset/update']}  (this hook: ping, delete)")
    print(f"   {args.url}/ckan-admin/webhooks  (sysadmins: every hook, last 7 days)")


if __name__ == "__main__":
    main()
