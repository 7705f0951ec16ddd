"""Rate limit of anonymous hook creation, per client IP, counted in Redis so
that every CKAN process shares the count (fixed windows)."""
from __future__ import annotations

import logging
import time
from typing import Optional

from ckan.lib.redis import connect_to_redis
from . import settings

log = logging.getLogger(__name__)


def hit(client: str) -> Optional[int]:
    """Count one creation attempt; returns seconds to wait if over the limit."""
    limit = settings.anonymous_create_limit()
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
