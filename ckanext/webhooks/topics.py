"""The event topics a hook can subscribe to."""
DATASET_CREATE = "dataset/create"
DATASET_UPDATE = "dataset/update"
DATASET_DELETE = "dataset/delete"
RESOURCE_CREATE = "resource/create"
RESOURCE_UPDATE = "resource/update"
RESOURCE_DELETE = "resource/delete"

TOPICS = (
    DATASET_CREATE, DATASET_UPDATE, DATASET_DELETE,
    RESOURCE_CREATE, RESOURCE_UPDATE, RESOURCE_DELETE,
)


def object_type(topic: str) -> str:
    """``dataset`` or ``resource``: the part of the topic before the slash."""
    return topic.split("/", 1)[0]


def all_topics() -> tuple[str, ...]:
    """The core topics and those added by IWebhooks plugins."""
    from ckan.plugins import PluginImplementations
    from .interfaces import IWebhooks
    extra = [topic for plugin in PluginImplementations(IWebhooks)
             for topic in plugin.webhooks_topics() if topic not in TOPICS]
    return TOPICS + tuple(extra)
