"""The ``webhooks`` CKAN plugin: registration only, the work is elsewhere."""
from __future__ import annotations

import ckan.plugins as plugins
from ckan.lib.plugins import DefaultTranslation
from ckan.plugins import toolkit

from . import capture, celery_app, views


@toolkit.blanket.actions
@toolkit.blanket.auth_functions
@toolkit.blanket.validators
@toolkit.blanket.cli
@toolkit.blanket.config_declarations
@toolkit.blanket.blueprints
@toolkit.blanket.helpers
class WebhooksPlugin(plugins.SingletonPlugin, DefaultTranslation):
    plugins.implements(plugins.ITranslation)
    plugins.implements(plugins.IConfigurer)
    plugins.implements(plugins.IConfigurable)
    plugins.implements(plugins.IDomainObjectModification, inherit=True)
    plugins.implements(plugins.IMiddleware, inherit=True)

    # IConfigurer

    def update_config(self, config):
        toolkit.add_template_directory(config, "templates")

    # IConfigurable

    def configure(self, config):
        celery_app.configure(config)  # used by the worker and the CLI
        capture.install_listeners()

    # IMiddleware

    def make_middleware(self, app, config):
        if hasattr(app, "register_error_handler"):  # the Flask app
            views.refuse_cookie_creation_with_403(app)
        return app

    # IDomainObjectModification

    def notify(self, entity, operation):
        capture.record(entity, operation)
