"""A gateway replica's per-request decisions about tenants (DESIGN.md §4, multi-tenancy):
the prefix-cache salt, the priority floor and fair-share weight, the limits (gateway.limits,
shared through Redis by every replica), the queue-depth admission, and who owns a request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from redis.exceptions import RedisError

from gateway.auth import OPEN_TENANT, Tenants
from gateway.errors import GatewayError, invalid
from gateway.limits import Admission, Limiter
from common import redis_schema as schema
from gateway.queue import EventsLost, RequestNotFound, RequestSubmitter

logger = logging.getLogger(__name__)


class TenantPolicy:
    def __init__(self, tenants: Tenants, limiter: Limiter, submitter: RequestSubmitter,
                 model_name: str, shared_prefix_cache: bool = False,
                 max_queued_requests: int | None = None) -> None:
        self.tenants = tenants
        self.limiter = limiter
        self.submitter = submitter
        self.model_name = model_name
        self.shared_prefix_cache = shared_prefix_cache    # tenants may hit each other's cache
        self.max_queued_requests = max_queued_requests    # queue depth past which: 429

    def cache_salt(self, tenant: str) -> str | None:
        """The prefix-cache salt of a tenant's requests: derived here, never taken from the
        request, so one tenant cannot probe another's cached prompts by timing."""
        if self.shared_prefix_cache or tenant == OPEN_TENANT:
            return None
        return hashlib.sha256(f"tessera-cache-salt:{tenant}".encode()).hexdigest()[:32]

    def shape(self, tenant: str, priority: int) -> tuple[int, float]:
        """(priority, fair-share weight) of a request: the tenant's priority is a floor, so
        no client jumps other tenants by asking for a better one."""
        t = self.tenants.get(tenant)
        if t is None:
            return priority, 1.0
        return max(priority, t.priority), t.weight

    async def admit(self, tenant: str, request_id: str, cost: int) -> Admission | None:
        """Take from the tenant's buckets (None: the tenant has no limits) or raise a 429."""
        t = self.tenants.get(tenant)
        if t is None or not self.limiter.limited(t):
            return None
        try:
            a = await self.limiter.admit(t, request_id, cost)
        except (RedisError, OSError) as e:
            raise GatewayError(503, f"rate limiter unavailable: {e}") from None
        if a.never_fits:
            raise invalid(f"this request needs {cost} tokens (prompt + n * max_tokens), above "
                          f"the tenant's {t.tokens_per_minute} tokens per minute", "max_tokens",
                          "rate_limit_exceeded")
        if not a.admitted:
            what = {"requests": f"requests per minute ({t.requests_per_minute})",
                    "tokens": f"tokens per minute ({t.tokens_per_minute})",
                    "concurrency": f"concurrent requests ({t.max_concurrent_requests})",
                    "queued": f"queued requests ({t.max_queued_requests}: requests admitted "
                              "that have not started generating)"}
            raise GatewayError(429, f"Rate limit reached for {what[a.reason]} of tenant "
                               f"{t.name}. Please retry after {a.retry_after_s} s.",
                               code="rate_limit_exceeded", headers=a.headers,
                               type_="tokens" if a.reason == "tokens" else "requests")
        return a

    async def started(self, tenant: str, request_id: str) -> None:
        """The request produced its first output: it stops counting as the tenant's queued."""
        t = self.tenants.get(tenant)
        if t is not None and t.max_queued_requests is not None:
            await self.limiter.started(t, request_id)

    async def release(self, tenant: str, request_id: str, refund: int) -> None:
        t = self.tenants.get(tenant)
        if t is not None and self.limiter.limited(t):
            await self.limiter.release(t, request_id, refund)

    async def release_when_finished(self, tenant: str, request_id: str, reserved: int,
                                     num_prompt_tokens: int, poll_s: float = 0.25) -> None:
        """Hold a ``continue`` request's slots, once its client left, until it finishes:
        poll its record (no connection held, unlike a blocking read) and its output stream,
        dropping it from the queued count at its first event; then release the concurrency
        slot and refund the tokens it did not use."""
        rec, out = schema.request_record(request_id), schema.output_stream(request_id)
        started = False
        try:
            # Bounded: a record lives at most its TTL, and the limiter's entries expire anyway.
            while True:
                state, length = await asyncio.gather(self.submitter.redis.hget(rec, "state"),
                                                     self.submitter.redis.xlen(out))
                if not started and length:
                    started = True
                    await self.started(tenant, request_id)
                if state is None or schema.text(state) in schema.TERMINAL_STATES:
                    break
                await asyncio.sleep(poll_s)
            used = num_prompt_tokens
            if state is not None:   # terminal: the stream holds every event it will have
                async for ev in self.submitter.events(request_id):
                    used += len(ev.token_ids)
            else:   # the record expired: refund nothing rather than too much
                used = reserved
            await self.release(tenant, request_id, reserved - used)
        except (RedisError, OSError, RequestNotFound, EventsLost) as e:
            # The limiter's entries expire after their lease: nothing is held forever.
            logger.warning("releasing the limits of %s: %s", request_id, e)
            try:
                await self.release(tenant, request_id, 0)
            except (RedisError, OSError):
                pass

    async def check_owner(self, request_id: str, tenant: str) -> None:
        """404 unless ``request_id`` is ``tenant``'s: a client reads, resumes and cancels only
        its own tenant's requests (with authentication off there is one tenant)."""
        if not self.tenants.enabled:
            return
        try:
            owner = await self.submitter.tenant_of(request_id)
        except (RedisError, OSError) as e:
            raise GatewayError(503, f"Redis does not answer: {e}") from None
        if owner != tenant:
            raise GatewayError(404, f"request {request_id} is unknown or expired", "request_id")

    async def check_queue_depth(self) -> None:
        if self.max_queued_requests is None:
            return
        depth = await self.submitter.queue_depth(self.model_name)
        if depth >= self.max_queued_requests:
            raise GatewayError(429, f"{depth} requests are waiting for {self.model_name} "
                               f"(limit {self.max_queued_requests}); retry later",
                               code="queue_full", headers={"retry-after": "1"})
