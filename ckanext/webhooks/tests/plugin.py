"""A plugin of the test suite's own that uses all of IWebhooks: a topic of its
own (organization/update, emitted when an organization is edited), a payload
change, a veto, and a veto that raises (for addresses with ``/veto-raises``)."""
from __future__ import annotations

import ckan.plugins as plugins

from ckanext.webhooks import emit
from ckanext.webhooks.interfaces import IWebhooks


class WebhooksTestPlugin(plugins.SingletonPlugin):
    plugins.implements(IWebhooks)
    plugins.implements(plugins.IOrganizationController, inherit=True)

    def webhooks_topics(self):
        return ["organization/update"]

    def edit(self, entity):
        emit("organization/update", entity.id,
             {"id": entity.id, "name": entity.name, "title": entity.title})

    def webhooks_payload(self, payload, hook):
        payload["x_test_plugin"] = f"seen by {hook['topic']}"
        return payload

    def webhooks_veto(self, payload, hook):
        if "/veto-raises" in hook["address"]:  # a plugin's bug (test_ownership.py)
            raise RuntimeError(f"test plugin failed for {hook['id']} at {hook['address']}")
        return "/vetoed" in hook["address"]
