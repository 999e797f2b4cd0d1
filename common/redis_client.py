"""Redis clients that ride out a Redis restart: every service connects through here.

A command that meets a dropped connection, a refused one, or a server still loading its AOF
(LOADING) is retried with exponential backoff (with jitter, capped at `BACKOFF_CAP_S`) for
about `RETRY_BUDGET_S` before the error reaches the caller; the connection pool reconnects on
its own. So a Redis restarted by its supervisor (`tessera serve`, Kubernetes) is, to the
services, a pause. NOTE: a retried write whose reply was lost may apply twice; our writes are
idempotent (SET, HSET, XACK) or carry their own index (output events), except XADD of a new
request, which a restart of Redis mid-reply could duplicate.
"""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

BACKOFF_BASE_S, BACKOFF_CAP_S = 0.05, 2.0
RETRY_BUDGET_S = 60.0
_ERRORS = (ConnectionError, TimeoutError, BusyLoadingError, ConnectionRefusedError, OSError)


def _retries() -> int:
    """Retries whose capped delays add up to about RETRY_BUDGET_S."""
    total, delay, n = 0.0, BACKOFF_BASE_S, 0
    while total < RETRY_BUDGET_S:
        # with jitter a delay is uniform in [0, its cap]: half of it on average
        total, delay, n = total + min(delay, BACKOFF_CAP_S) / 2, delay * 2, n + 1
    return n


def connect(url: str, **kwargs) -> aioredis.Redis:
    """An asyncio client for `url` that reconnects with backoff (kwargs: from_url's)."""
    from redis.asyncio.retry import Retry

    retry = Retry(ExponentialWithJitterBackoff(BACKOFF_CAP_S, BACKOFF_BASE_S), _retries(),
                  supported_errors=_ERRORS)
    return aioredis.from_url(url, retry=retry, retry_on_error=list(_ERRORS), **kwargs)


def connect_sync(url: str, **kwargs) -> redis.Redis:
    """The same for blocking code."""
    from redis.retry import Retry

    retry = Retry(ExponentialWithJitterBackoff(BACKOFF_CAP_S, BACKOFF_BASE_S), _retries(),
                  supported_errors=_ERRORS)
    return redis.Redis.from_url(url, retry=retry, retry_on_error=list(_ERRORS), **kwargs)
