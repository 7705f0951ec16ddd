"""A plugin of the test suite's own (``webhooks_test_audience``) that makes
every reader's view of a dataset different, so that a delivery can be told
apart from another reader's rendering (test_audiences.py):

* ``after_dataset_show``: for a reader who is not a sysadmin, the dataset's
  ``author_email`` and each resource's ``url`` name the reader
  (``redacted-for-<user name>`` / ``redacted-for-anonymous``); for a dataset
  whose name starts with ``explode`` it raises ``RuntimeError`` instead (the
  reader's rendering fails; authorization passed);
* ``resource_show`` authorization: a resource whose name starts with
  ``restricted`` is refused to anonymous readers; everything else goes to
  CKAN's own rule (chained).

CKAN's own internal reads (``ignore_auth``, as the search index does) are
left alone, so that datasets can be written and indexed. Only sysadmins may
write datasets on a site running this plugin: a ``package_patch`` by anybody
else would read the redacted view and save it back.
"""
from __future__ import annotations

from typing import Any

from ckan import authz, model, plugins
from ckan.plugins import toolkit

REDACTED_PREFIX = "redacted-for-"


def reader_label(user_name: str | None) -> str:
    """What ``author_email`` becomes for this reader (None/"" = anonymous)."""
    return REDACTED_PREFIX + (user_name or "anonymous")


def redacted_url(user_name: str | None) -> str:
    return f"http://redacted.invalid/{user_name or 'anonymous'}"


@toolkit.chained_auth_function
@toolkit.auth_allow_anonymous_access
def resource_show(next_auth, context, data_dict):
    resource = model.Resource.get((data_dict or {}).get("id") or "")
    if resource is not None and (resource.name or "").startswith("restricted") \
            and not context.get("user"):
        return {"success": False, "msg": "restricted resources are for logged-in users"}
    return next_auth(context, data_dict)


class AudienceTestPlugin(plugins.SingletonPlugin):
    plugins.implements(plugins.IPackageController, inherit=True)
    plugins.implements(plugins.IAuthFunctions)

    def get_auth_functions(self) -> dict[str, Any]:
        return {"resource_show": resource_show}

    def after_dataset_show(self, context, pkg_dict):
        if context.get("ignore_auth"):
            return pkg_dict  # CKAN's own reads (search index): no reader
        user = context.get("user") or ""
        if authz.is_sysadmin(user):
            return pkg_dict
        if (pkg_dict.get("name") or "").startswith("explode"):
            raise RuntimeError(f"webhooks_test_audience: cannot show {pkg_dict['name']} "
                               f"to {user or 'anonymous'}")
        pkg_dict["author_email"] = reader_label(user)
        for resource in pkg_dict.get("resources") or []:
            resource["url"] = redacted_url(user)
        return pkg_dict
