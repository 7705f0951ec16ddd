"""Rate limits of hook creation (and pings), counted in Redis so that every
CKAN process shares the count (fixed windows): anonymous clients per IP
address (an IPv6 client per network prefix, /64 by default: one subscriber
holds a whole /64), logged-in users per user, with a higher limit."""
from __future__ import annotations

import ipaddress
import logging
import time
from typing import Optional

from ckan.lib.redis import connect_to_redis
from . import settings

log = logging.getLogger(__name__)


def client_key(remote_addr: Optional[str]) -> str:
    """An anonymous client: its IPv4 address, or its IPv6 network."""
    try:
        ip = ipaddress.ip_address(remote_addr or "")
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, settings.ipv6_client_prefix()), strict=False))
    return str(ip)


def hit(client: str, limit: Optional[int] = None) -> Optional[int]:
    """Count one creation attempt of ``client`` (see :func:`client_key`, or
    ``user:<id>``); returns seconds to wait if over the limit (by default the
    anonymous one)."""
    limit = settings.anonymous_create_limit() if limit is None else limit
    period = settings.anonymous_create_period()
    window = int(time.time() // period)
    key = f"ckanext-webhooks:create:{client}:{window}"
    try:
        redis = connect_to_redis()
        with redis.pipeline() as pipe:
            count, _ = pipe.incr(key).expire(key, period).execute()
    except Exception as error:  # noqa: BLE001 - fail open: Redis down must not block users
        log.warning("rate limit unavailable (%s); allowing the request", error)
        return None
    if count > limit:
        return max(1, (window + 1) * period - int(time.time()))
    return None
