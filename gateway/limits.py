"""Per-tenant limits kept in Redis, so every gateway replica enforces the same ones exactly.

Each tenant has two token buckets, requests and tokens per minute (capacity = the per-minute
limit, refilled continuously), a set of its unfinished requests for
``max_concurrent_requests`` and a set of its queued ones (admitted, no output event yet) for
``max_queued_requests``. One Lua script checks all four and takes from all, or from none, in
one atomic step on Redis's clock: two replicas admitting at the same moment can never both
take the last unit. A request reserves ``prompt + n * max_tokens`` tokens at admission; what
it did not generate goes back to the bucket when it finishes.

A request leaves the queued set at its first output event (the relay sees it; a relay that
ended early, disconnect policy ``continue``, is followed by ``Generation.close``'s watcher)
and both sets when it finishes, which is when its relay ends or, for a client that left a
``continue`` request behind, when the request's record turns terminal.

NOTE: an entry expires after ``lease_s`` (a gateway that died never releases its requests);
a request running longer than that stops counting towards its tenant's limits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import redis.asyncio as aioredis

from common import redis_schema as schema
from gateway.auth import Tenant

# KEYS: request bucket, token bucket, in-flight zset, queued zset.
# ARGV: rpm, tpm, cost, max concurrent, max queued (0 = unlimited each), request id, lease ms.
# Returns {ok, retry_after_ms, requests left, tokens left, in flight, queued}; ok: 1 admitted,
# 0 over a limit (retry later), -1 never fits (cost above the per-minute token limit).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl == nil then return cap end
  return math.min(cap, lvl + (now - ts) * cap / 60000)
end
local rpm, tpm, cost, maxc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local maxq, rid, lease = tonumber(ARGV[5]), ARGV[6], tonumber(ARGV[7])
local rl, tl, wait, running, queued = -1, -1, 0, 0, 0
if rpm > 0 then
  rl = level(KEYS[1], rpm)
  if rl < 1 then wait = math.max(wait, (1 - rl) * 60000 / rpm) end
end
if tpm > 0 then
  if cost > tpm then return {-1, 0, math.floor(rl), 0, 0, 0} end
  tl = level(KEYS[2], tpm)
  if tl < cost then wait = math.max(wait, (cost - tl) * 60000 / tpm) end
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  running = redis.call('ZCARD', KEYS[3])
  if running >= maxc then wait = math.max(wait, 1000) end
end
if maxq > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  queued = redis.call('ZCARD', KEYS[4])
  if queued >= maxq then wait = math.max(wait, 1000) end
end
if wait > 0 then return {0, math.ceil(wait), math.floor(rl), math.floor(tl), running, queued} end
if rpm > 0 then
  rl = rl - 1
  redis.call('HSET', KEYS[1], 'level', rl, 'ts', now)
  redis.call('PEXPIRE', KEYS[1], 120000)
end
if tpm > 0 then
  tl = tl - cost
  redis.call('HSET', KEYS[2], 'level', tl, 'ts', now)
  redis.call('PEXPIRE', KEYS[2], 120000)
end
if maxc > 0 then
  redis.call('ZADD', KEYS[3], now + lease, rid)
  redis.call('PEXPIRE', KEYS[3], lease)
  running = running + 1
end
if maxq > 0 then
  redis.call('ZADD', KEYS[4], now + lease, rid)
  redis.call('PEXPIRE', KEYS[4], lease)
  queued = queued + 1
end
return {1, 0, math.floor(rl), math.floor(tl), running, queued}
"""

# KEYS: token bucket, in-flight zset, queued zset. ARGV: tpm (0 = none), refund, request id.
_RELEASE = """
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[3])
local tpm, refund = tonumber(ARGV[1]), tonumber(ARGV[2])
if tpm > 0 and refund > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local v = redis.call('HMGET', KEYS[1], 'level', 'ts')
  local lvl, ts = tonumber(v[1]), tonumber(v[2])
  if lvl ~= nil then
    lvl = math.min(tpm, lvl + (now - ts) * tpm / 60000 + refund)
    redis.call('HSET', KEYS[1], 'level', lvl, 'ts', now)
  end
end
return 1
"""


@dataclass(frozen=True)
class Admission:
    """What the limiter decided; ``headers`` are OpenAI's ``x-ratelimit-*`` (and
    ``retry-after`` when refused)."""
    admitted: bool
    retry_after_s: int
    headers: dict[str, str]
    reason: str = ""          # "requests", "tokens", "concurrency" or "queued" when refused
    never_fits: bool = False  # the request alone is above the tenant's per-minute tokens


class Limiter:
    """The gateway's client of the per-tenant buckets (one per replica, shared state in Redis)."""

    def __init__(self, client: aioredis.Redis, lease_s: float = 600.0) -> None:
        self._redis = client
        self._admit = client.register_script(_ADMIT)
        self._release = client.register_script(_RELEASE)
        self.lease_ms = int(lease_s * 1000)

    @staticmethod
    def limited(tenant: Tenant | None) -> bool:
        return tenant is not None and any(
            v is not None for v in (tenant.requests_per_minute, tenant.tokens_per_minute,
                                    tenant.max_concurrent_requests, tenant.max_queued_requests))

    async def admit(self, tenant: Tenant, request_id: str, cost: int) -> Admission:
        rpm = tenant.requests_per_minute or 0
        tpm = tenant.tokens_per_minute or 0
        maxc = tenant.max_concurrent_requests or 0
        maxq = tenant.max_queued_requests or 0
        ok, retry_ms, req_left, tok_left, running, queued = await self._admit(
            keys=[schema.tenant_bucket(tenant.name, "requests"),
                  schema.tenant_bucket(tenant.name, "tokens"),
                  schema.tenant_inflight(tenant.name), schema.tenant_queued(tenant.name)],
            args=[rpm, tpm, cost, maxc, maxq, request_id, self.lease_ms])
        headers: dict[str, str] = {}
        if rpm:
            headers |= {"x-ratelimit-limit-requests": str(rpm),
                        "x-ratelimit-remaining-requests": str(max(int(req_left), 0)),
                        "x-ratelimit-reset-requests": _duration(60.0 / rpm)}
        if tpm:
            headers |= {"x-ratelimit-limit-tokens": str(tpm),
                        "x-ratelimit-remaining-tokens": str(max(int(tok_left), 0)),
                        "x-ratelimit-reset-tokens": _duration(cost * 60.0 / tpm)}
        if ok == 1:
            return Admission(True, 0, headers)
        if ok == -1:
            return Admission(False, 0, headers, "tokens", never_fits=True)
        retry_s = max(1, math.ceil(int(retry_ms) / 1000))
        headers["retry-after"] = str(retry_s)
        if rpm and req_left < 1:
            reason = "requests"
        elif tpm and tok_left < cost:
            reason = "tokens"
        elif maxc and running >= maxc:
            reason = "concurrency"
        else:
            reason = "queued"
        return Admission(False, retry_s, headers, reason)

    async def started(self, tenant: Tenant, request_id: str) -> None:
        """The request's first output event is out: it no longer counts as queued."""
        await self._redis.zrem(schema.tenant_queued(tenant.name), request_id)

    async def release(self, tenant: Tenant, request_id: str, refund: int) -> None:
        await self._release(keys=[schema.tenant_bucket(tenant.name, "tokens"),
                                  schema.tenant_inflight(tenant.name),
                                  schema.tenant_queued(tenant.name)],
                            args=[tenant.tokens_per_minute or 0, max(refund, 0), request_id])


def _duration(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "250ms"."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 1)}ms"
    minutes, secs = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
