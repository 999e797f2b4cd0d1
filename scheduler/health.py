"""Readiness that does not lie (DESIGN.md §4): the scheduler is ready while its worker group
finished a real forward pass within ``ready_timeout_s``.

A real step counts, and so does the warm-up; when the scheduler is idle it runs a one-token
canary step now and then (a sequence the scheduler owns and nobody reads), so an idle group
stays ready and a stopped, dead or wedged worker turns readiness false within the timeout,
whether or not traffic arrives. NOTE: ``ready_timeout_s`` must exceed the longest step (a
worst-case prefill chunk): a step that outlasts it reads as a wedged worker.

A standby (waiting for the group's lease) drives no group: it answers ready, so that a rolling
update, which waits for each new pod to be ready, does not stall behind it; the group's state
is the active scheduler's readiness (and the gateways'), not the standby's.

The verdict reaches the gateways through Redis: a key per group with a TTL of what is left of
the readiness window, so Redis expires it on its own clock and nobody compares two machines'
clocks; it also vanishes within the timeout when the scheduler itself dies.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import redis.asyncio as aioredis

from common import redis_schema as schema
from common.sampling_params import SamplingParams
from scheduler.request import Request

logger = logging.getLogger(__name__)

CANARY_PREFIX = "__canary-"
_CANARY_PARAMS = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


class Readiness:
    """When the last forward pass finished (monotonic), and when an idle canary is due."""

    def __init__(self, ready_timeout_s: float = 10.0) -> None:
        if ready_timeout_s <= 0:
            raise ValueError(f"ready timeout must be positive, got {ready_timeout_s}")
        self.ready_timeout_s = ready_timeout_s
        # Three canaries per window: one lost to a slow step still leaves the group ready.
        self.canary_interval_s = ready_timeout_s / 3
        self.last_forward: float | None = None
        self._last_canary = float("-inf")
        self._ids = itertools.count()
        self.canary_id: str | None = None
        self.standby = False   # waiting for the group's lease (see the module's docstring)

    def mark_forward(self) -> None:
        self.last_forward = time.monotonic()

    def remaining_s(self) -> float:
        """Seconds of readiness left (0: not ready)."""
        if self.last_forward is None:
            return 0.0
        return max(self.ready_timeout_s - (time.monotonic() - self.last_forward), 0.0)

    def status(self) -> tuple[bool, str]:
        if self.standby:
            return True, "standby: waiting for the group's lease"
        if self.last_forward is None:
            return False, "the worker group has not finished a forward pass yet"
        age = time.monotonic() - self.last_forward
        if age > self.ready_timeout_s:
            return False, (f"no forward pass finished for {age:.1f} s "
                           f"(ready timeout {self.ready_timeout_s:g} s)")
        return True, ""

    def canary(self, token_id: int = 0) -> Request | None:
        """A one-token request to run now, if the group is idle long enough (else None)."""
        now = time.monotonic()
        last = self.last_forward if self.last_forward is not None else float("-inf")
        if now - max(last, self._last_canary) < self.canary_interval_s:
            return None
        self._last_canary = now
        self.canary_id = f"{CANARY_PREFIX}{next(self._ids)}"
        return Request(self.canary_id, [token_id], _CANARY_PARAMS)


async def publish_readiness(client: aioredis.Redis, model: str, group: str,
                            readiness: Readiness, period_s: float | None = None) -> None:
    """Keep the group's ready key in Redis in step with ``readiness`` until cancelled."""
    key, groups = schema.scheduler_ready(model, group), schema.ready_groups(model)
    period_s = period_s or min(readiness.ready_timeout_s / 4, 1.0)
    try:
        while True:
            left_ms = int(readiness.remaining_s() * 1000)
            try:
                if left_ms > 0:
                    pipe = client.pipeline(transaction=False)
                    pipe.set(key, "1", px=left_ms)
                    pipe.sadd(groups, group)
                    await pipe.execute()
                else:
                    await client.delete(key)
            except (aioredis.RedisError, OSError) as e:
                logger.warning("cannot publish readiness to Redis: %s", e)
            await asyncio.sleep(period_s)
    finally:
        try:
            await asyncio.shield(client.delete(key))
        except Exception:   # noqa: BLE001 - shutting down; the TTL cleans up anyway
            pass

