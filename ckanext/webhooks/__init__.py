"""ckanext-webhooks: push CKAN dataset and resource events to subscribers."""
__version__ = "0.1.0"


def emit(topic: str, object_id: str, data: dict, package_id: str | None = None) -> str:
    """Record an event of a plugin's own topic (see :class:`interfaces.IWebhooks`)
    in the current transaction; it is delivered once that transaction commits.
    Returns the event id."""
    from .capture import emit_event
    return emit_event(topic, object_id, data, package_id)
