"""IWebhooks: what other CKAN extensions can build on ckanext-webhooks.

* add topics of their own (``webhooks_topics``) and emit events for them with
  :func:`ckanext.webhooks.emit` inside the transaction of the change;
* change a payload before it is sent (``webhooks_payload``);
* veto a delivery (``webhooks_veto``).

Events of a plugin's own topics carry the ``data`` the plugin gave; unless it
names a ``package_id`` (then the dataset's visibility rules apply), every hook
of the topic may hear them: veto what some hooks must not see.
"""
from __future__ import annotations

from typing import Any

from ckan.plugins.interfaces import Interface


class IWebhooks(Interface):

    def webhooks_topics(self) -> list[str]:
        """Topics this plugin emits, besides the dataset and resource ones."""
        return []

    def webhooks_payload(self, payload: dict[str, Any], hook: dict[str, Any]
                         ) -> dict[str, Any]:
        """Return the payload to send to ``hook`` (``id``, ``topic``,
        ``address``, ``user_id``), changed as needed. Called once per delivery
        attempt; the ``event_id`` must stay (receivers de-duplicate on it)."""
        return payload

    def webhooks_veto(self, payload: dict[str, Any], hook: dict[str, Any]) -> bool:
        """Return True to not deliver ``payload`` to ``hook`` (no retry)."""
        return False
