"""The gateway's side of Redis: submit a request, relay its output events, cancel it.

The gateway holds no request state of its own: everything a client needs to resume (the
request id and the index of the last event it saw) lives in Redis, so any gateway replica can
serve a reconnecting client (DESIGN.md §4).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping

import redis.asyncio as aioredis

from common import redis_schema as schema
from common.redis_schema import OutputEvent, QueuedRequest, RedisLimits
from gateway.stream_reader import StreamReader


class RequestNotFound(KeyError):
    """The request id is unknown, or its record expired (the resume window has passed)."""


class EventsLost(RuntimeError):
    """Events between the client's last index and the next stored one are gone (trimmed)."""


# One round trip, atomic: a retried submission either sees the first one's id or enqueues,
# never both, and a record exists before anyone can learn the id (events() relies on it).
_SUBMIT = """
if ARGV[1] == '1' then
  if not redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PX', ARGV[3]) then
    return redis.call('GET', KEYS[1])
  end
end
local nrec = tonumber(ARGV[4])
redis.call('HSET', KEYS[2], unpack(ARGV, 5, 4 + nrec))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('XADD', KEYS[3], '*', unpack(ARGV, 5 + nrec))
return ARGV[2]
"""


_ATTACH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return redis.call('HINCRBY', KEYS[1], 'attached', 1)
"""


class RequestSubmitter:
    """Enqueue requests, stream their events, cancel them: the gateway's Redis client.

    Each ``events`` iterator holds one pooled connection while it blocks in XREAD, so size the
    client's ``max_connections`` for the number of concurrent streams.
    """

    def __init__(self, client: aioredis.Redis, limits: RedisLimits = RedisLimits()) -> None:
        self.redis = client
        self.limits = limits
        # the blocking reads of every relay's stream, as one XREAD (gateway.stream_reader)
        self.reader = StreamReader(client)
        self._submit = client.register_script(_SUBMIT)
        self._attach = client.register_script(_ATTACH)

    async def submit(self, queued: QueuedRequest, extra: Mapping[str, str] | None = None) -> str:
        """Enqueue ``queued``; returns its request id. ``extra`` fields go into the request's
        record too (gateway.resume.RelayMeta: what another replica needs to resume it).

        With an idempotency key, a second submission by the same tenant with the same key
        (while the first's record lives) returns the first request's id and enqueues nothing.
        """
        has_idem = queued.idempotency_key is not None
        idem = schema.idempotency_key(queued.tenant, queued.idempotency_key or "")
        record = {"state": schema.STATE_QUEUED, "model": queued.model, "tenant": queued.tenant,
                  "n": queued.params.n, "disconnect": queued.disconnect,
                  "queued_at": time.time(), **(extra or {})}
        rec_args = [str(x) for kv in record.items() for x in kv]
        entry_args = [x for kv in queued.to_fields().items() for x in kv]
        rid = await self._submit(
            keys=[idem, schema.request_record(queued.request_id),
                  schema.requests_stream(queued.model)],
            args=["1" if has_idem else "0", queued.request_id, self.limits.record_ttl_ms,
                  len(rec_args), *rec_args, *entry_args])
        return schema.text(rid)

    async def events(self, request_id: str, last_index: int = -1,
                     block_ms: int = 1000) -> AsyncIterator[OutputEvent]:
        """The request's events after ``last_index``, in order, each exactly once.

        NOTE: ``block_ms`` must stay well under the client's socket timeout (redis-py 8
        defaults to 5 s): a blocking XREAD answered just after it raises TimeoutError.

        Ends after the final event (all sequences finished) or an error event. Raises
        RequestNotFound when the request is unknown or expired, EventsLost when the next
        stored event is not ``last_index + 1``.
        """
        out = schema.output_stream(request_id)
        rec = schema.request_record(request_id)
        seen = last_index
        block: int | None = None   # the first read does not block: it answers "is it there?"
        over = False
        task = asyncio.current_task()
        sub = None   # blocking reads go through the gateway's one XREAD (self.reader)
        try:
            while True:
                # NOTE: asyncio.wait_for before Python 3.12 can swallow a cancellation (CPython
                # gh-86296) and redis-py sends through it; the task then stays "cancelling"
                # and, without this check, would go on reading a stream its client has left.
                if task is not None and getattr(task, "cancelling", lambda: 0)():
                    raise asyncio.CancelledError
                if block is None:
                    reply = await self.redis.xread({out: f"0-{seen + 1}"}, count=256)
                    entries = reply[0][1] if reply else []
                else:
                    if sub is None:
                        sub = self.reader.subscribe(out, f"0-{seen + 1}")
                    else:
                        sub.skip_to(f"0-{seen + 1}")
                    entries = await sub.read(block)
                for _, fields in entries:
                    ev = OutputEvent.from_fields(fields)
                    if ev.index <= seen:
                        continue   # a duplicate (the direct and the shared reads overlap)
                    if ev.index != seen + 1:
                        raise EventsLost(f"request {request_id}: expected event {seen + 1}, "
                                         f"got {ev.index}")
                    seen = ev.index
                    yield ev
                    if ev.final or ev.error is not None:
                        return
                if entries:
                    block = None if over else block_ms
                    continue
                if over:
                    return   # over, and nothing after ``seen`` is left (expired or trimmed)
                state = await self.redis.hget(rec, "state")
                if state is None:
                    raise RequestNotFound(request_id)
                # The final XADD precedes the state change in the scheduler's pipeline: once
                # the state is terminal, one more non-blocking read sees all there will be.
                over = schema.text(state) in schema.TERMINAL_STATES
                block = None if over else block_ms
        finally:
            if sub is not None:
                sub.close()

    async def record(self, request_id: str) -> dict[str, str]:
        """The request's record (state, model, relay fields...); RequestNotFound if gone."""
        rec = await self.redis.hgetall(schema.request_record(request_id))
        if not rec:
            raise RequestNotFound(request_id)
        return {schema.text(k): schema.text(v) for k, v in rec.items()}

    async def attach(self, request_id: str) -> int:
        """A client (re)attached to the request's relay; returns the attach count, which a
        ``continue`` disconnect's timer compares to see whether anyone came back."""
        # Only on a live record: a bare HINCRBY would recreate an expired one without a TTL.
        n = await self._attach(keys=[schema.request_record(request_id)])
        if int(n) < 0:
            raise RequestNotFound(request_id)
        return int(n)

    async def cancel(self, request_id: str) -> bool:
        """Ask the schedulers to stop a request; False when it is unknown or already over.

        Two writes: the record's ``cancelled`` flag (seen by a scheduler that reads the request
        later, from the queue or by claiming it) and an entry on the model's cancels stream
        (seen by the scheduler running it, at its next step).
        """
        rec = schema.request_record(request_id)
        model, state = await self.redis.hmget(rec, ["model", "state"])
        if model is None or state is None or schema.text(state) in schema.TERMINAL_STATES:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(rec, "cancelled", "1")
        pipe.xadd(schema.cancels_stream(schema.text(model)), {"request_id": request_id},
                  maxlen=self.limits.cancels_maxlen, approximate=True)
        await pipe.execute()
        return True

    async def tenant_of(self, request_id: str) -> str | None:
        """The tenant that submitted ``request_id``; None when unknown or expired."""
        tenant = await self.redis.hget(schema.request_record(request_id), "tenant")
        return None if tenant is None else schema.text(tenant)

    async def queue_depth(self, model: str) -> int:
        """Requests of ``model`` waiting for a scheduler to start them: the consumer group's
        lag, plus those a lone group's scheduler read past its window (``held`` in each
        ready group's stats; the same count the schedulers export as
        tessera:request_queue_depth)."""
        stream = schema.requests_stream(model)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xinfo_groups(stream)
        pipe.xlen(stream)
        pipe.smembers(schema.ready_groups(model))
        try:
            groups, length, members = await pipe.execute()
        except aioredis.ResponseError:   # no stream yet: nothing waits
            return 0
        lag = length
        for g in groups:
            if schema.text(g["name"]) == schema.SCHEDULERS_GROUP:
                value = g.get("lag")
                lag = int(value) if value is not None else max(length - int(g["pending"]), 0)
        return lag + await self._held(model, [schema.text(m) for m in members])

    async def _held(self, model: str, groups: list[str]) -> int:
        if not groups:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for g in groups:
            pipe.exists(schema.scheduler_ready(model, g))
            pipe.hget(schema.scheduler_stats(model, g), "held")
        replies = await pipe.execute()
        # A group that is not ready now (its scheduler gone) holds nothing that counts.
        return sum(int(held or 0) for ready, held in zip(replies[::2], replies[1::2]) if ready)
