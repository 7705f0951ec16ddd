# -*- coding: utf-8 -*-
import re
from pathlib import Path

from setuptools import setup, find_namespace_packages

# The version is declared once, in ckanext/webhooks/__init__.py (the User-Agent
# and `ckan webhooks --version` read it there). It is parsed, not imported:
# importing the package here would need its dependencies before they are installed.
_INIT = Path(__file__).resolve().parent / "ckanext" / "webhooks" / "__init__.py"
_VERSION = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""",
                     _INIT.read_text(encoding="utf-8"), re.M)
if not _VERSION:
    raise RuntimeError(f"no __version__ = \"...\" line in {_INIT}")

setup(
    name="ckanext-webhooks",
    version=_VERSION.group(1),
    description="Webhooks for CKAN: push dataset and resource events to subscribers",
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="AGPL-3.0-or-later",
    python_requires=">=3.11",
    packages=find_namespace_packages(include=["ckanext", "ckanext.*"]),
    include_package_data=True,
    zip_safe=False,
    install_requires=[
        "celery>=5.5,<6",
        "kombu>=5.5,<6",
        "standardwebhooks>=1.0.1,<2",
        "httptools>=0.6,<1",
        "cryptography>=42",
        "publicsuffixlist>=1.0,<2",
        "prometheus_client>=0.20,<1",
    ],
    entry_points={
        "ckan.plugins": [
            "webhooks = ckanext.webhooks.plugin:WebhooksPlugin",
            # Used by the test suite only: exercises the IWebhooks interface.
            "webhooks_test_plugin = ckanext.webhooks.tests.plugin:WebhooksTestPlugin",
            # Used by the test suite only: every reader gets a view of its own.
            "webhooks_test_audience = ckanext.webhooks.tests.audience_plugin:AudienceTestPlugin",
        ],
    },
    classifiers=[
        "Framework :: CKAN",
        "Programming Language :: Python :: 3.11",
    ],
)
