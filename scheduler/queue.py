"""The scheduler's side of Redis: intake through the consumer group, output, cancels.

Durability rules (DESIGN.md §4) this module carries out:
- a request leaves the stream only when it finished: its ack (XACK + XDEL) comes after its
  final event is written, in the same pipeline (``publish(..., acks=...)``, ``exchange``);
- an un-acked request of a dead scheduler is taken over by ``claim_stale`` (XAUTOCLAIM), so a
  live scheduler must ``touch`` its in-flight entries more often than the claim idle time;
- a step's events go out in one pipeline, and an event Redis already has is rejected by id,
  so a recovering scheduler never delivers a token twice.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from common import redis_schema as schema
from common.redis_schema import MalformedEntry, OutputEvent, QueuedRequest, RedisLimits
from scheduler.fence import PUBLISH_SCRIPT, Lease, check_published, publish_args

logger = logging.getLogger(__name__)

Entry = tuple[str, QueuedRequest]   # (stream entry id, request)
_CANCEL_BATCH = 1000
# KEYS[1] the stream; ARGV: group, consumer, entry ids. Claims (idle := 0, delivery count
# unchanged) the entries the consumer owns; returns the ids it does not own.
_TOUCH_OWNED = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] ~= nil and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
"""

# KEYS[1] the stream, KEYS[2..] the records of the entries ARGV[7..] (one each); ARGV: group,
# consumer, now, record TTL (ms), the terminal states joined by ',', the running state. Per
# entry: a finished record acks it ('done'), a cancelled one is left to the caller
# ('cancelled'), the others are marked running under this consumer ('ok'). Returns Redis's
# TIME, then the statuses.
_ADMIT = """
local terminal = {}
for s in string.gmatch(ARGV[5], '[^,]+') do terminal[s] = true end
local out = redis.call('TIME')
for i = 2, #KEYS do
  local state = redis.call('HGET', KEYS[i], 'state')
  local entry = ARGV[5 + i]
  if state and terminal[state] then
    redis.call('XACK', KEYS[1], ARGV[1], entry)
    redis.call('XDEL', KEYS[1], entry)
    out[#out + 1] = 'done'
  elseif redis.call('HGET', KEYS[i], 'cancelled') then
    out[#out + 1] = 'cancelled'
  else
    redis.call('HSET', KEYS[i], 'state', ARGV[6], 'owner', ARGV[2], 'started_at', ARGV[3])
    redis.call('PEXPIRE', KEYS[i], ARGV[4])
    out[#out + 1] = 'ok'
  end
end
return out
"""


@dataclass(frozen=True)
class GroupStats:
    waiting: int   # in the stream, not yet delivered to any scheduler (queue depth)
    pending: int   # delivered to a scheduler and not yet finished (in flight)



class RequestQueue:
    """One scheduler's view of its model's request stream, output streams and cancels."""

    def __init__(self, client: aioredis.Redis, model: str, consumer: str,
                 limits: RedisLimits = RedisLimits(), max_deliveries: int = 3,
                 lease: Lease | None = None) -> None:
        self.redis = client
        self.lease = lease   # publishes are fenced on it (None: unfenced, as in tests)
        self.model = model
        self.consumer = consumer                  # unique per scheduler process
        self.limits = limits
        self.stream = schema.requests_stream(model)
        self.group = schema.SCHEDULERS_GROUP
        self._cancels = schema.cancels_stream(model)
        self._cancel_cursor: str | None = None
        self._claim_cursor = "0-0"
        self.admitted_at: float | None = None   # Redis's clock at the last admission (queue waits)
        # A claimed request delivered more often than this without finishing is dead-lettered:
        # each delivery's scheduler died on it, and it must not kill scheduler after scheduler.
        self.max_deliveries = max_deliveries
        self.num_deadlettered = 0               # this process's count (a metric)

    # ---- intake -----------------------------------------------------------------------------
    async def ensure_group(self) -> None:
        """Create the stream and consumer group if missing (idempotent), and start the cancel
        cursor at the current end of the cancels stream."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise
        await self._init_cancel_cursor()

    async def read_new(self, max_count: int, block_ms: int | None = None) -> list[Entry]:
        """Up to ``max_count`` requests never delivered to any scheduler.

        Ask only for what the block manager can admit: the rest stays in Redis, visible as
        queue depth (back-pressure). ``block_ms`` None or <= 0 does not block (Redis's BLOCK 0
        would block forever). Malformed or already cancelled requests are finished here and
        not returned.
        """
        if max_count <= 0:
            return []
        block = block_ms if block_ms and block_ms > 0 else None
        reply = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                            count=max_count, block=block)
        raw = [(entry_id, fields) for _, entries in (reply or []) for entry_id, fields in entries]
        return await self._admit(raw)

    async def claim_stale(self, min_idle_ms: int, count: int = 100) -> list[Entry]:
        """Take over requests another scheduler read and has not touched for ``min_idle_ms``.

        The caller recovers each one: ``read_emitted`` gives the events already published; it
        recomputes prompt + emitted tokens and continues the indices (or just acks it if the
        last emitted event is final). Successive calls walk the pending list with a cursor.
        """
        reply = await self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                            min_idle_time=min_idle_ms,
                                            start_id=self._claim_cursor, count=count)
        self._claim_cursor = schema.text(reply[0])
        # Entries deleted while pending come back as None (Redis drops them from the PEL).
        raw = [(eid, fields) for eid, fields in reply[1] if fields]
        return await self._admit(await self._deadletter_redelivered(raw))

    @property
    def claim_scan_done(self) -> bool:
        """The last ``claim_stale`` reached the end of the pending list (its cursor wrapped)."""
        return self._claim_cursor in ("0-0", "0")

    async def _deadletter_redelivered(self, raw: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
        """Dead-letter the claimed entries delivered more than ``max_deliveries`` times (the
        stream's own delivery count: XAUTOCLAIM just added one); returns the others.

        A dead-lettered request gets an error event after its last one (its client learns why)
        and is acked; the entry, with the reason, goes to the model's dead-letter stream."""
        if not raw:
            return raw
        pipe = self.redis.pipeline(transaction=False)
        for eid, _ in raw:
            pipe.xpending_range(self.stream, self.group, min=eid, max=eid, count=1)
        pending = await pipe.execute()
        kept, dead = [], []
        for (eid, fields), info in zip(raw, pending):
            times = int(info[0]["times_delivered"]) if info else 1
            (dead if times > self.max_deliveries else kept).append((schema.text(eid), fields, times))
        if not dead:
            return [(eid, fields) for eid, fields, _ in kept]
        pipe = self.redis.pipeline(transaction=False)
        doomed = []
        for eid, fields, times in dead:
            f = {schema.text(k): schema.text(v) for k, v in fields.items()}
            reason = (f"delivered {times} times without finishing (--max-deliveries "
                      f"{self.max_deliveries}): every scheduler that took it stopped")
            logger.error("request %s dead-lettered: %s", f.get("request_id"), reason,
                         extra={"request_id": f.get("request_id")})
            pipe.xadd(schema.deadletter_stream(self.model),
                      {"request_id": f.get("request_id", ""), "entry_id": eid,
                       "deliveries": times, "reason": reason, "data": f.get("data", "")},
                      maxlen=self.limits.deadletter_maxlen, approximate=True)
            doomed.append((eid, f.get("request_id", ""), None, f"dead-lettered: {reason}"))
        await pipe.execute()
        await self._terminate(doomed)
        self.num_deadlettered += len(dead)
        return [(eid, fields) for eid, fields, _ in kept]

    async def touch(self, entry_ids: Sequence[str]) -> list[str]:
        """Reset the idle time of this scheduler's in-flight entries, so that a peer's
        ``claim_stale`` does not take over requests that are merely long-running. Only entries
        this consumer still owns are touched (one script: a check and its claim cannot be
        split): returns the others, which a peer took over (we stalled past the claim idle
        time) or which are gone; the caller must stop working on them."""
        if not entry_ids:
            return []
        lost = await self.redis.eval(_TOUCH_OWNED, 1, self.stream, self.group, self.consumer,
                                     *entry_ids)
        return [schema.text(e) for e in lost]

    async def handoff(self, entry_ids: Sequence[str], reason: str) -> int:
        """Give requests back to the stream for any scheduler to take (our worker group is
        down and a peer's is up): each entry is re-added, marked ``recovered`` so that its new
        owner resumes it from ``out:{id}``, and the old one acked, in one transaction per
        entry. Returns how many were handed off (an entry already gone is skipped)."""
        pipe = self.redis.pipeline(transaction=False)
        for eid in entry_ids:
            pipe.xrange(self.stream, min=eid, max=eid, count=1)
        found = await pipe.execute()
        pipe = self.redis.pipeline(transaction=True)
        moved = 0
        for eid, entry in zip(entry_ids, found):
            if not entry:
                continue
            try:
                queued = QueuedRequest.from_fields(entry[0][1])
            except MalformedEntry:
                continue   # it could not have been running
            pipe.xadd(self.stream, dataclasses.replace(queued, recovered=reason).to_fields())
            pipe.xack(self.stream, self.group, eid)
            pipe.xdel(self.stream, eid)
            moved += 1
        if moved:
            await pipe.execute()
        return moved

    async def _admit(self, raw: list[tuple[Any, Any]]) -> list[Entry]:
        """Decode entries and mark them running under this consumer; finish at once the
        malformed ones and those cancelled while they waited; ack those already finished."""
        good: list[Entry] = []
        doomed: list[tuple[str, str, str | None, str | None]] = []  # id, req id, reason, error
        for entry_id, fields in raw:
            entry_id = schema.text(entry_id)
            try:
                good.append((entry_id, QueuedRequest.from_fields(fields)))
            except MalformedEntry as e:
                logger.warning("malformed request entry %s: %s", entry_id, e)
                doomed.append((entry_id, e.request_id or "", None, str(e)))
        if good:
            # One script: a record is read before its request is claimed (a claimed request
            # may have finished already: its scheduler died between the final event and the
            # ack), and marked running in the same step, with no round trip in between.
            reply = await self.redis.eval(
                _ADMIT, 1 + len(good), self.stream,
                *(schema.request_record(q.request_id) for _, q in good),
                self.group, self.consumer, time.time(), self.limits.record_ttl_ms,
                ",".join(sorted(schema.TERMINAL_STATES)), schema.STATE_RUNNING,
                *(entry_id for entry_id, _ in good))
            secs, usecs, *statuses = reply
            # Redis's clock now: with the entry ids (Redis's clock at XADD) it gives the time a
            # request waited in the stream without comparing two machines' clocks.
            self.admitted_at = int(secs) + int(usecs) / 1e6
            kept = []
            for (entry_id, q), status in zip(good, statuses):
                status = schema.text(status)
                if status == "cancelled":
                    doomed.append((entry_id, q.request_id, "abort", None))
                elif status == "ok":
                    kept.append((entry_id, q))
            good = kept
        if doomed:
            await self._terminate(doomed)
        return good

    async def _terminate(self, doomed: list[tuple[str, str, str | None, str | None]]) -> None:
        """Publish a final event (abort or error) after the request's last one, then ack."""
        named = [d for d in doomed if d[1]]   # without a request id nobody can be told
        pipe = self.redis.pipeline(transaction=False)
        for _, request_id, _, _ in named:
            pipe.xrevrange(schema.output_stream(request_id), count=1)
        lasts = await pipe.execute() if named else []
        events = []
        for (_, request_id, reason, error), last in zip(named, lasts):
            index = OutputEvent.from_fields(last[0][1]).index + 1 if last else 0
            events.append((request_id, OutputEvent(index, [], finish_reason=reason, final=True,
                                                   error=error)))
        await self.publish(events, acks=[entry_id for entry_id, *_ in doomed])

    # ---- output -----------------------------------------------------------------------------
    async def publish(self, events: Sequence[tuple[str, OutputEvent]],
                      acks: Sequence[str] = (), stats: tuple[str, dict] | None = None) -> None:
        """Write one step's events (and ack the entries of finished requests) in ONE script.

        A final event expires the out stream and the record after ``finished_ttl_s`` (the
        resume window) and records the outcome. ``acks`` (XACK + XDEL: the stream keeps only
        waiting and in-flight requests) run after every XADD of the batch: Redis executes a
        pipeline in order, so a request is never acked before its final event is stored. An
        event whose index Redis already holds is skipped (no double delivery).
        """
        if not events and not acks and stats is None:
            return
        pipe = self.redis.pipeline(transaction=False)
        self._add_publish(pipe, events, acks, stats)
        check_published((await pipe.execute(raise_on_error=False))[0])

    async def exchange(self, events: Sequence[tuple[str, OutputEvent]], acks: Sequence[str],
                       stats: tuple[str, dict] | None, read_count: int,
                       block_ms: int | None = None) -> tuple[list[Entry], list[str]]:
        """A steady step's one round trip: ``publish(events, acks, stats)``, then the cancels
        since the last call and up to ``read_count`` new requests (blocking up to ``block_ms``
        when given: idle). Returns (admitted requests, cancelled request ids). Admitting new
        requests costs two more round trips, only when some arrived."""
        if self._cancel_cursor is None:
            await self._init_cancel_cursor()
        pipe = self.redis.pipeline(transaction=False)
        n = self._add_publish(pipe, events, acks, stats)
        pipe.xread({self._cancels: self._cancel_cursor}, count=_CANCEL_BATCH)
        if read_count > 0:
            block = block_ms if block_ms and block_ms > 0 else None
            pipe.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=read_count,
                            block=block)
        results = await pipe.execute(raise_on_error=False)
        if n:
            check_published(results[0])
        for r in results[n:]:
            if isinstance(r, Exception):
                raise r
        cancels = self._cancel_ids(results[n])
        if self._last_batch_full(results[n], _CANCEL_BATCH):
            cancels += [c for c in await self.drain_cancels() if c not in cancels]
        raw = ([(entry_id, fields) for _, entries in (results[n + 1] or [])
                for entry_id, fields in entries] if read_count > 0 else [])
        return (await self._admit(raw) if raw else []), cancels

    def _add_publish(self, pipe, events: Sequence[tuple[str, OutputEvent]], acks: Sequence[str],
                     stats: tuple[str, dict] | None) -> int:
        """Queue ``publish``'s one script on ``pipe`` (scheduler.fence: it writes nothing once
        another scheduler holds our lease); returns how many replies it makes."""
        if not events and not acks and stats is None:
            return 0
        lease = self.lease
        pipe.eval(PUBLISH_SCRIPT, 2, lease.key if lease else "", self.stream,
                  *publish_args(lease.value if lease else "", self.group, self.limits,
                                time.time(), events, acks, stats))
        return 1

    async def read_emitted(self, request_id: str) -> list[OutputEvent]:
        """The events already published for a request, in index order (recovery)."""
        entries = await self.redis.xrange(schema.output_stream(request_id))
        return [OutputEvent.from_fields(fields) for _, fields in entries]

    # ---- cancels ----------------------------------------------------------------------------
    # NOTE: a plain XREAD with a cursor per scheduler, not a consumer group. Every scheduler
    # must see every cancel (each acts on the ids it owns, ignores the rest); one shared group
    # would hand each cancel to one scheduler only, and a group per scheduler leaves groups of
    # dead schedulers behind. A cursor is never behind what a running step adds, so nothing
    # added between drains is lost. A cancel that lands before a scheduler owns the request
    # (still queued, or owned by one that dies) is caught by the record's ``cancelled`` flag,
    # which _admit checks when the request is read or claimed.
    async def _init_cancel_cursor(self) -> None:
        last = await self.redis.xrevrange(self._cancels, count=1)
        self._cancel_cursor = schema.text(last[0][0]) if last else "0-0"

    async def drain_cancels(self, batch: int = 1000) -> list[str]:
        """Request ids cancelled since the last drain (never blocks; `exchange` does this as
        part of a step's round trip)."""
        if self._cancel_cursor is None:
            await self._init_cancel_cursor()
        ids: list[str] = []
        while True:
            reply = await self.redis.xread({self._cancels: self._cancel_cursor}, count=batch)
            ids += [i for i in self._cancel_ids(reply) if i not in ids]
            if not self._last_batch_full(reply, batch):
                return ids

    def _cancel_ids(self, reply) -> list[str]:
        """The request ids of an XREAD reply on the cancels stream; advances the cursor."""
        ids: dict[str, None] = {}
        for entry_id, fields in (reply[0][1] if reply else []):
            self._cancel_cursor = schema.text(entry_id)
            rid = fields.get(b"request_id", fields.get("request_id"))
            if rid:
                ids[schema.text(rid)] = None
        return list(ids)

    @staticmethod
    def _last_batch_full(reply, batch: int) -> bool:
        return bool(reply) and len(reply[0][1]) >= batch

    # ---- metrics ----------------------------------------------------------------------------
    async def consumer_lag(self) -> GroupStats:
        """Waiting (undelivered) and pending (in-flight) counts of the scheduler group."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.xinfo_groups(self.stream)
        pipe.xlen(self.stream)
        groups, length = await pipe.execute()
        for g in groups:
            if schema.text(g["name"]) == self.group:
                pending = int(g["pending"])
                lag = g.get("lag")
                # Redis answers nil lag when deletions make it unknowable; since finished
                # entries are deleted, length - pending counts the waiting ones exactly.
                waiting = int(lag) if lag is not None else max(length - pending, 0)
                return GroupStats(waiting=waiting, pending=pending)
        return GroupStats(waiting=length, pending=0)

    async def queue_depth(self) -> int:
        """Requests waiting in Redis for a scheduler to admit them."""
        return (await self.consumer_lag()).waiting
