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
DELETE_TOPICS = frozenset({DATASET_DELETE, RESOURCE_DELETE})


def object_type(topic: str) -> str:
    """``dataset`` or ``resource``: the part of the topic before the slash."""
    return topic.split("/", 1)[0]
