"""Every ``ckanext.webhooks.*`` setting, read in one place and typed.

The defaults are declared once, in ``config_declaration.yaml``: CKAN's config
returns them for options the ini leaves out. A value that is not given and
has no declared default (``broker_url``, ``allowed_networks``) is None or empty.
"""
from __future__ import annotations

from typing import Any, Optional

from ckan.plugins import toolkit

PREFIX = "ckanext.webhooks."


def _raw(key: str, config: Any = None) -> Any:
    value = (config if config is not None else toolkit.config).get(PREFIX + key)
    return None if value == "" else value


def _float(key: str) -> float:
    return float(_raw(key))


def _int(key: str) -> int:
    return int(_raw(key))


def _list(key: str) -> list[str]:
    raw = _raw(key) or []
    return raw.split() if isinstance(raw, str) else [str(item) for item in raw]


# Who may use the API
def minimum_auth() -> str:
    return str(_raw("minimum_auth")).strip()


def verify_on_create() -> bool:
    return toolkit.asbool(_raw("verify_on_create"))


def max_hooks_per_host() -> int:
    return _int("max_hooks_per_host")


def anonymous_create_limit() -> int:
    return _int("anonymous_create_limit")


def user_create_limit() -> int:
    return _int("user_create_limit")


def ipv6_client_prefix() -> int:
    return max(0, min(128, _int("ipv6_client_prefix")))


def allowed_ports_below_1024() -> set[int]:
    return {int(port) for port in _list("allowed_ports_below_1024")}


def anonymous_create_period() -> int:
    return _int("anonymous_create_period")


# Addresses
def allowed_networks() -> list[str]:
    return _list("allowed_networks")


def https_only() -> bool:
    return toolkit.asbool(_raw("https_only"))


def dns_timeout() -> float:
    return _float("dns_timeout")


def ca_bundle() -> Optional[str]:
    """The PEM CA bundle receivers' certificates are verified against; None:
    certifi's."""
    raw = _raw("ca_bundle")
    return (str(raw).strip() or None) if raw is not None else None


# Sending
def connect_timeout() -> float:
    return _float("connect_timeout")


def timeout() -> float:
    return _float("timeout")


def log_body_bytes() -> int:
    return max(0, _int("log_body_bytes"))


def max_response_bytes() -> int:
    return _int("max_response_bytes")


def concurrency() -> int:
    return _int("concurrency")


def connections_per_host() -> int:
    return _int("connections_per_host")


def slow_after() -> float:
    return _float("slow_after")


def slow_lane_seconds() -> float:
    return _float("slow_lane_seconds")


def slow_lane_concurrency() -> int:
    return _int("slow_lane_concurrency")


def slow_lane_per_host() -> int:
    return _int("slow_lane_per_host")


# The delivery queue and its policy
def retry_schedule() -> list[float]:
    return [float(delay) for delay in _list("retry_schedule")]


def batch_size() -> int:
    return _int("batch_size")


def lease_seconds() -> float:
    return _float("lease_seconds")


def max_consecutive_4xx() -> int:
    return _int("max_consecutive_4xx")


def stale_after_days() -> float:
    return _float("stale_after_days")


def pause_grace_days() -> float:
    return _float("pause_grace_days")


def secret_rotation_hours() -> float:
    return _float("secret_rotation_hours")


def log_retention_days() -> float:
    return _float("log_retention_days")


def event_retention_days() -> float:
    return _float("event_retention_days")


# Secrets at rest (see crypto.py)
def secret_keys() -> list[str]:
    return _list("secret_keys")


def ckan_secret_key() -> Optional[str]:
    """CKAN's own ``SECRET_KEY`` (a key derived from it always decrypts)."""
    return toolkit.config.get("SECRET_KEY") or toolkit.config.get("beaker.session.secret")


def metrics_port() -> int:
    return int(_raw("metrics_port") or 0)


def metrics_host() -> str:
    return str(_raw("metrics_host"))


def listen_url() -> Optional[str]:
    return _raw("listen_url")


def heartbeat_seconds() -> float:
    return max(0.5, _float("heartbeat_seconds"))


# The Celery wiring (read from the config being loaded, too)
def broker_url(config: Any = None) -> Optional[str]:
    return _raw("broker_url", config)


def queue_name(config: Any = None) -> str:
    return str(_raw("celery.queue", config))


def sweep_interval(config: Any = None) -> float:
    return float(_raw("sweep_interval", config))


def prune_interval(config: Any = None) -> float:
    return float(_raw("prune_interval", config))
