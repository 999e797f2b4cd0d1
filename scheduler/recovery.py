"""The engine loop's durability duties (DESIGN.md §4): what keeps a request alive when its
worker group or its scheduler dies.

- ``keep_claimed`` (a background task, on a timer of a third of the claim idle time: never per
  step): touches this scheduler's in-flight stream entries so no peer claims them, drops those
  a peer took over while we stalled, and claims (XAUTOCLAIM) the entries of a scheduler that
  stopped touching them: a dead one, whose standby took the lease or not.
- ``resume``: a claimed or handed-off request continues where it stopped: the events already
  in ``out:{id}`` give each sequence's emitted tokens and the next event index; the core
  recomputes prompt + emitted tokens (seeded sampling is keyed by token index, so the tokens
  that follow are the fault-free ones).
- ``wait_for_group``: the worker group stopped answering. Its requests are kept (no error to
  the client): handed off to a peer group at once when one is ready (-dp), else they wait
  here while the group is re-warmed and reset over and over until it answers (its supervisor
  restarts it); then every request is recomputed from its tokens. A request waiting past its
  deadline (its own, else arrival + --request-timeout) fails with an error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from common import redis_schema as schema
from common.redis_schema import OutputEvent, QueuedRequest
from scheduler.executor import WorkerMismatch, WorkerUnavailable

if TYPE_CHECKING:
    from scheduler.loop import EngineLoop

logger = logging.getLogger(__name__)

WORKER, SCHEDULER = "worker", "scheduler"   # the reasons of requests_recovered_total
_POLL_S = 0.25   # how often a down group's scheduler looks at Redis and deadlines


def emitted_state(events: list[OutputEvent], n: int) -> tuple[list[list[int]], int]:
    """Each of the n sequences' tokens already delivered, and the index of the next event."""
    emitted: list[list[int]] = [[] for _ in range(n)]
    for ev in events:
        if 0 <= ev.seq_index < n:
            emitted[ev.seq_index].extend(ev.token_ids)
    return emitted, (events[-1].index + 1 if events else 0)


class Recovery:
    """Bound to one EngineLoop; see the module's docstring."""

    def __init__(self, loop: EngineLoop, claim_idle_ms: int = 3000,
                 request_timeout_s: float = 600.0, group: str | None = None) -> None:
        self.loop = loop
        self.claim_idle_ms = claim_idle_ms
        self.request_timeout_s = request_timeout_s
        self.group = group   # our worker group's name: peers are the other ready groups
        self.down = False    # the worker group does not answer
        self.peer_up = False   # while down: another group is ready (it reads new requests)

    # ---- deadlines ----------------------------------------------------------------------
    def deadline_of(self, queued: QueuedRequest, entry_time: float) -> float:
        if queued.deadline is not None:
            return queued.deadline
        return (queued.arrival_time or entry_time) + self.request_timeout_s

    async def fail_overdue(self, now: float | None = None) -> None:
        """Requests past their deadline fail now, with a message that says why."""
        now = time.time() if now is None else now
        loop = self.loop
        overdue = [r for r in loop.core.requests.values()
                   if r.deadline is not None and r.deadline <= now]
        if overdue:
            await loop._publish_now([e for e in (loop._end(
                r.request_id, "error", "the worker group did not come back before the "
                "request's deadline (--request-timeout, or its own deadline)")
                for r in overdue) if e is not None])

    # ---- claims ---------------------------------------------------------------------------
    async def keep_claimed(self) -> None:
        """Until cancelled: touch ours, drop the lost, claim the stale (module docstring)."""
        period = self.claim_idle_ms / 3000
        while True:
            try:
                await self.touch_and_claim()
            except (RedisError, OSError) as e:
                logger.warning("cannot touch or claim in-flight requests: %s", e)
            await asyncio.sleep(period)

    async def touch_and_claim(self) -> None:
        loop = self.loop
        tags = {r.tag: r for r in list(loop.core.requests.values()) if r.tag is not None}
        if tags:
            for lost in await loop.queue.touch(list(tags)):
                req = tags[lost]
                if loop.core.requests.get(req.request_id) is req:
                    # A peer owns it now (we stalled past the claim idle time): it continues
                    # from out:{id}; we must not write for it again.
                    logger.warning("request %s was taken over by another scheduler",
                                   req.request_id, extra={"request_id": req.request_id})
                    loop.core.abort(req.request_id, "abort")
        if not self.down:
            await self.claim(self.claim_idle_ms)

    async def claim(self, min_idle_ms: int) -> int:
        """Take over stale entries (a dead scheduler's) and resume them; how many."""
        total = 0
        while True:
            claimed = await self.loop.queue.claim_stale(min_idle_ms)
            if claimed:
                total += await self.resume(claimed, SCHEDULER)
            if self.loop.queue.claim_scan_done:
                return total

    async def resume(self, entries: list[tuple[str, QueuedRequest]], reason: str) -> int:
        """Continue requests another scheduler (or group) started, from what Redis holds."""
        loop = self.loop
        pipe = loop.queue.redis.pipeline(transaction=False)
        for _, q in entries:
            pipe.xrange(schema.output_stream(q.request_id))
        stored = await pipe.execute()
        resumed = 0
        for (entry_id, queued), raw in zip(entries, stored):
            if queued.request_id in loop.core.requests:
                continue   # ours already (claimed back after a stall)
            events = [OutputEvent.from_fields(f) for _, f in raw]
            if events and events[-1].final:
                loop._acks.append(entry_id)   # finished; its scheduler died before the ack
                continue
            emitted, next_index = emitted_state(events, queued.params.n)
            req = loop.new_request(entry_id, queued, emitted if events else None, next_index)
            if req is None:
                continue
            tokens = len(queued.prompt_token_ids) + sum(len(e) for e in emitted)
            loop.obs.request_recovered(req, reason, tokens)
            logger.info("resumed request %s (%s recovery) at event %d, %d tokens to recompute",
                        queued.request_id, reason, next_index, tokens,
                        extra={"request_id": queued.request_id})
            resumed += 1
        return resumed

    # ---- a dead worker group ------------------------------------------------------------
    async def wait_for_group(self, error: Exception) -> None:
        """The group failed (its in-flight steps are drained, its sequences requeued): keep
        the requests, hand them to a peer group if one is ready, fail the overdue, and retry
        the group until it answers; then count the recovered requests."""
        loop = self.loop
        logger.error("worker group unavailable (%s): keeping its requests until it is back",
                     error)
        self.down = True
        attempt = asyncio.create_task(asyncio.to_thread(self._try_group))
        try:
            while not loop.stopped.is_set():
                self.peer_up = await self._peer_ready()
                if self.peer_up and loop.core.requests:
                    await self._handoff()
                await self.fail_overdue()
                await loop._exchange(None)   # publish, cancels (and intake, if no peer)
                done, _ = await asyncio.wait({attempt}, timeout=_POLL_S)
                if not done:
                    continue
                if attempt.result():
                    break
                attempt = asyncio.create_task(asyncio.to_thread(self._try_group))
        finally:
            self.down = self.peer_up = False
            if not attempt.done():
                attempt.cancel()
        if loop.stopped.is_set():
            return
        logger.warning("worker group answers again: recomputing %d requests",
                       len(loop.core.requests))
        loop.core.requeue_running(kv_lost=True)   # re-warmed: its KV cache holds nothing
        for req in loop.core.requests.values():
            tokens = sum(s.num_tokens for s in req.seqs if s is not None
                         and not s.status.finished)
            loop.obs.request_recovered(req, WORKER, tokens)

    def _try_group(self) -> bool:
        """One attempt to bring the group back (blocking: runs in a thread)."""
        executor = self.loop.executor
        try:
            recover = getattr(executor, "recover", None)
            if recover is not None:
                return recover()
            executor.reset()
            return True
        except (WorkerUnavailable, WorkerMismatch) as e:
            logger.info("worker group still unavailable: %s", e)
            time.sleep(_POLL_S)
            return False

    async def _peer_ready(self) -> bool:
        """Another worker group of this model is ready (its scheduler says so in Redis)."""
        if self.group is None:
            return False
        redis, model = self.loop.queue.redis, self.loop.queue.model
        groups = [schema.text(g) for g in await redis.smembers(schema.ready_groups(model))]
        others = [g for g in groups if g != self.group]
        if not others:
            return False
        return bool(await redis.exists(*(schema.scheduler_ready(model, g) for g in others)))

    async def _handoff(self) -> None:
        """Give every request back to the stream, marked for recovery, for a ready peer."""
        loop = self.loop
        await loop._publish_now([])   # what was computed goes out first: the peer reads it
        reqs = list(loop.core.requests.values())
        moved = await loop.queue.handoff([r.tag for r in reqs if r.tag is not None], WORKER)
        for r in reqs:
            loop.core.abort(r.request_id, "abort")   # ours no longer: no event
        logger.warning("worker group down: handed %d requests to the other groups", moved)
