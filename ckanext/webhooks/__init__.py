"""ckanext-webhooks: push CKAN dataset and resource events to subscribers."""
__version__ = "0.1.0"
