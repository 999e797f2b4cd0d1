"""Fencing (DESIGN.md §4): a scheduler that lost its group's lease never writes again.

A scheduler paused past its lease (a GC stall, SIGSTOP, a partition) wakes up believing it
still drives its group while its standby already took over. Two things stop it:

- **Redis.** Every publish (events, acks, gauges) is one Lua script that first compares the
  lease's value with ours and writes nothing when they differ (``Fenced``). The value is
  "<owner> <epoch>"; the epoch is Redis's clock in microseconds when the lease was first
  taken, so it grows from holder to holder, even across a Redis restart that lost the key.
- **Workers.** Warmup, Reset and every step carry the epoch; a worker refuses one older than
  the newest it has seen (``ABORTED``, common.step.FENCED_DETAIL). The successor resets the
  group with its newer epoch before its first step, so the paused one's next step is refused.

A fenced scheduler stops (its supervisor restarts it: it comes back as a standby); what it had
in flight is its successor's, which claimed the entries and resumes them from ``out:{id}``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import redis_schema as schema
from common.redis_schema import OutputEvent, RedisLimits

logger = logging.getLogger(__name__)


class Fenced(RuntimeError):
    """This scheduler lost its lease: it must not publish, ack or drive workers again."""


# KEYS[1] the lease; ARGV: owner, ttl ms, epoch to keep ('' = a new one from Redis's clock).
_ACQUIRE = """
local epoch = ARGV[3]
if epoch == '' then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
end
local value = ARGV[1] .. ' ' .. epoch
if redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2]) then return value end
return false
"""

# KEYS[1] the lease ('' = unfenced), KEYS[2] the request stream. ARGV: the lease value we
# hold, group, output maxlen, record ttl ms, finished ttl ms, finished_at, #events, then per
# event: out key, entry id, first (0/1), final state ('' = not final), its record's key,
# finish reason, #fields, fields...; then #acks, acks...; then the gauges' key ('' = none), #fields, fields.
# Returns how many events Redis already had (skipped: never delivered twice).
PUBLISH_SCRIPT = """
if KEYS[1] ~= '' and redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('FENCED')
end
local maxlen, record_ttl, finished_ttl, now = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local i, skipped = 8, 0
for _ = 1, tonumber(ARGV[7]) do
  local out, id, first, state = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local n = tonumber(ARGV[i + 6])
  local r = redis.pcall('XADD', out, 'MAXLEN', '~', maxlen, id, unpack(ARGV, i + 7, i + 6 + n))
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'equal or smaller', 1, true) then return r end
    skipped = skipped + 1
  end
  if first == '1' then redis.call('PEXPIRE', out, record_ttl) end
  if state ~= '' then
    local rec = ARGV[i + 4]
    redis.call('HSET', rec, 'state', state, 'finished_at', now, 'finish_reason', ARGV[i + 5])
    redis.call('PEXPIRE', rec, finished_ttl)
    redis.call('PEXPIRE', out, finished_ttl)
  end
  i = i + 7 + n
end
local n = tonumber(ARGV[i])
if n > 0 then
  redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, i + 1, i + n))
  redis.call('XDEL', KEYS[2], unpack(ARGV, i + 1, i + n))
end
i = i + 1 + n
if ARGV[i] ~= '' and tonumber(ARGV[i + 1]) > 0 then
  redis.call('HSET', ARGV[i], unpack(ARGV, i + 2, i + 1 + tonumber(ARGV[i + 1])))
end
return skipped
"""


def publish_args(lease_value: str, group: str, limits: RedisLimits, now: float,
                 events: Sequence[tuple[str, OutputEvent]], acks: Sequence[str],
                 stats: tuple[str, dict] | None) -> list:
    """``PUBLISH_SCRIPT``'s ARGV for one step's events, acks and gauges."""
    args: list = [lease_value, group, limits.output_maxlen, limits.record_ttl_ms,
                  limits.finished_ttl_ms, now, len(events)]
    for request_id, ev in events:
        state = ""
        if ev.final:
            state = schema.STATE_FAILED if ev.error is not None else schema.STATE_FINISHED
        fields = [x for kv in ev.to_fields().items() for x in kv]
        args += [schema.output_stream(request_id), ev.stream_id, int(ev.index == 0), state,
                 schema.request_record(request_id) if state else "", ev.finish_reason or "",
                 len(fields), *fields]
    args += [len(acks), *acks]
    if stats is None:
        args += ["", 0]
    else:
        fields = [x for kv in stats[1].items() for x in kv]
        args += [stats[0], len(fields), *fields]
    return args


def check_published(result) -> None:
    """Raise ``Fenced`` or the script's error; a count of skipped duplicates is fine."""
    if isinstance(result, ResponseError):
        if str(result).startswith("FENCED"):
            raise Fenced("the group's lease is held by another scheduler: nothing published")
        raise result
    if isinstance(result, Exception):
        raise result
    if result:
        logger.debug("%d events already published, skipped", result)


def holder_pid(value: bytes | str | None) -> int | None:
    """The pid of the scheduler process holding a lease of this value ("<host>-<pid> <epoch>";
    the owner is the consumer name the service gives itself), None when nobody holds it."""
    if not value:
        return None
    return int(schema.text(value).split()[0].rsplit("-", 1)[1])


class Lease:
    """The group's lease (SET NX PX, renewed while we hold it) and the epoch it carries."""

    def __init__(self, client: aioredis.Redis, key: str, owner: str, ttl_ms: int) -> None:
        self.client, self.key, self.owner, self.ttl_ms = client, key, owner, ttl_ms
        self.value: str | None = None   # "<owner> <epoch>" once taken

    @property
    def epoch(self) -> int:
        return int(self.value.rsplit(" ", 1)[1]) if self.value else 0

    async def try_acquire(self) -> bool:
        """Take the lease if free. A re-take (it expired while Redis was away) keeps our
        epoch: if another scheduler held it in between, the workers refuse us."""
        keep = self.value.rsplit(" ", 1)[1] if self.value else ""
        value = await self.client.eval(_ACQUIRE, 1, self.key, self.owner, self.ttl_ms, keep)
        if value is None:
            return False
        self.value = schema.text(value)
        return True

    async def acquire(self) -> None:
        """Wait for the lease: polled every fifth of its TTL, so a standby takes over within
        1.2 TTL of the holder's last renewal."""
        while not await self.try_acquire():
            await asyncio.sleep(self.ttl_ms / 5000)

    async def renew_forever(self, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                holder = await self.client.get(self.key)
                if holder is None:
                    # Expired while Redis was away (restarted): ours again unless taken.
                    if await self.try_acquire():
                        logger.warning("re-took the lease %s after it expired", self.key)
                        continue
                    holder = await self.client.get(self.key)
                if holder is None or schema.text(holder) != self.value:
                    logger.error("lost the lease %s (now held by %r): stopping", self.key,
                                 holder)
                    lost.set()
                    return
                await self.client.pexpire(self.key, self.ttl_ms)
            except (aioredis.RedisError, OSError) as e:   # past the client's retries
                logger.warning("lease %s: Redis does not answer (%s)", self.key, e)

    async def release(self) -> None:
        holder = await self.client.get(self.key)
        if holder is not None and schema.text(holder) == self.value:
            await self.client.delete(self.key)
