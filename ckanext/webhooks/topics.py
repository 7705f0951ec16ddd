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


WILDCARD = "*"


def is_wildcard(pattern: str) -> bool:
    """``*``, or ``<kind>/*``: every topic, or every topic of that kind."""
    return pattern == WILDCARD or pattern.endswith("/*")


def matches(pattern: str, topic: str) -> bool:
    """Does a subscribed ``pattern`` (a topic or a wildcard) cover ``topic``?"""
    if pattern == WILDCARD or pattern == topic:
        return True
    return pattern.endswith("/*") and topic.split("/", 1)[0] == pattern[:-2]


def patterns_for(topic: str) -> list[str]:
    """The subscriptions that cover ``topic``: itself, its kind's wildcard, ``*``."""
    return [topic, object_type(topic) + "/*", WILDCARD]


def overlap(these: list[str], those: list[str]) -> bool:
    """Could one event be heard through both lists of patterns?"""
    for a in these:
        for b in those:
            if a == b or WILDCARD in (a, b):
                return True
            kind_a, kind_b = object_type(a), object_type(b)
            if kind_a == kind_b and (is_wildcard(a) or is_wildcard(b)):
                return True
    return False


def valid_patterns() -> tuple[str, ...]:
    """What a hook may subscribe to: every topic, and the wildcards of their kinds."""
    known = all_topics()
    kinds = sorted({object_type(topic) for topic in known if "/" in topic})
    return known + tuple(f"{kind}/*" for kind in kinds) + (WILDCARD,)
