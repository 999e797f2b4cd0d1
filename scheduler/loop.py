"""The scheduler service's engine loop: Redis intake -> schedule -> execute -> update -> publish.

    plan = scheduler.schedule(); output = executor.execute(plan)
    events = scheduler.update(plan, output); publish(events)

Around that core: intake reads new requests from Redis only while the block manager can take
them (back-pressure stays visible as queue depth), cancels are drained once per step, a
request is acknowledged in the same pipeline as its final event, and a worker that stops
answering fails the in-flight requests with an error event while the loop keeps running.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from common.redis_schema import OutputEvent, QueuedRequest
from scheduler.executor import Executor, WorkerMismatch, WorkerUnavailable
from scheduler.queue import RequestQueue
from scheduler.request import Request
from scheduler.scheduler import RequestEvent, Scheduler
from scheduler.telemetry import NullObserver

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    """A user request: its stream entry, its n sequences, its next event index."""
    entry_id: str
    queued: QueuedRequest
    next_index: int = 0
    unfinished: set[int] = field(default_factory=set)
    siblings_added: bool = False


class _Deferred:
    """A step for an executor that only runs synchronously: it runs when waited for."""

    def __init__(self, executor: Executor, plan) -> None:
        self.executor, self.plan = executor, plan

    def result(self):
        return self.executor.execute(self.plan)


def _seq_id(request_id: str, k: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{k}"


class EngineLoop:
    def __init__(self, scheduler: Scheduler, executor: Executor, queue: RequestQueue,
                 eos_token_ids: tuple[int, ...] = (), idle_block_ms: int = 100,
                 stats_key: str | None = None, pipeline_depth: int = 1,
                 observer: NullObserver | None = None) -> None:
        self.scheduler = scheduler
        self.executor = executor
        # Steps in flight at once: a pipeline of P stages needs P to keep every stage busy.
        self.pipeline_depth = pipeline_depth
        self._pending: deque = deque()   # (plan, handle, telemetry start) in plan order
        self.queue = queue
        self.eos_token_ids = eos_token_ids
        self.idle_block_ms = idle_block_ms
        self.stats_key = stats_key
        self.inflight: dict[str, _InFlight] = {}
        self._owner: dict[str, tuple[_InFlight, int]] = {}   # sequence id -> (request, k)
        self.stopped = asyncio.Event()
        self.steps = 0
        self._pending_errors: list[tuple[_InFlight, str]] = []
        # Telemetry hooks (spans, metrics, readiness): scheduler.telemetry.EngineObserver.
        self.obs = observer or NullObserver()

    # ---- intake -------------------------------------------------------------------------
    def _admission_room(self) -> int:
        """How many new requests to read: none while earlier ones still wait for blocks."""
        s = self.scheduler
        if s.num_waiting or s.kv.num_free_blocks == 0:
            return 0
        return max(s.config.max_num_seqs - s.num_running, 0)

    async def _intake(self, block_ms: int | None) -> None:
        room = self._admission_room()
        if room == 0:
            return
        for entry_id, queued in await self.queue.read_new(room, block_ms):
            self._add(entry_id, queued)

    def _add(self, entry_id: str, queued: QueuedRequest) -> None:
        req = _InFlight(entry_id, queued, unfinished={0})
        try:
            self._add_sequence(req, 0)
        except ValueError as e:   # e.g. a prompt the gateway should not have let through
            req.unfinished.clear()
            self._pending_errors.append((req, str(e)))
            return
        self.inflight[queued.request_id] = req

    def _add_sequence(self, req: _InFlight, k: int) -> None:
        """Sequence k of a request. Sequences 1.. join once sequence 0 has computed (and
        cached) the prompt, so the n sequences share its KV blocks through the prefix cache."""
        q = req.queued
        seq_id = _seq_id(q.request_id, k, q.params.n)
        request = Request(seq_id, list(q.prompt_token_ids), q.params, priority=q.priority,
                          eos_token_ids=self.eos_token_ids, seed_offset=k,
                          cache_salt=q.cache_salt)
        self.scheduler.add_request(request)
        self._owner[seq_id] = (req, k)
        self.obs.sequence_added(req.entry_id, q, k, request)
        req.unfinished.add(k)

    # ---- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        while not self.stopped.is_set():
            idle = not self.scheduler.has_unfinished and not self._pending
            await self._intake(self.idle_block_ms if idle else None)
            await self._apply_cancels()
            for req, message in self._pending_errors:
                await self._fail([req], message)
            self._pending_errors = []
            if not self.scheduler.has_unfinished and not self._pending:
                await self._canary()
                continue
            await self.step()

    def _submit(self, plan):
        if hasattr(self.executor, "execute_async"):
            return self.executor.execute_async(plan)
        return _Deferred(self.executor, plan)

    async def _canary(self) -> None:
        """Idle: now and then a one-token step nobody reads, so that readiness keeps meaning
        "the worker group finished a real forward pass recently" (scheduler.health)."""
        request = self.obs.canary()
        if request is None:
            return
        self.scheduler.add_request(request)
        try:
            await self.step()
        finally:
            self.scheduler.abort(request.request_id)   # a no-op unless the step failed

    async def step(self) -> None:
        """Fill the pipeline up to its depth, then wait for the oldest step and apply it."""
        while len(self._pending) < self.pipeline_depth:
            plan = self.scheduler.schedule()
            if plan.num_sequences == 0:
                if not self._pending:
                    await self._nothing_to_run()
                break
            if self.pipeline_depth > 1:
                self.scheduler.mark_in_flight(plan)
            started = self.obs.step_started(plan)
            self._pending.append((plan, self._submit(plan), started))
        if not self._pending:
            return
        plan, handle, started = self._pending.popleft()
        try:
            output = await asyncio.to_thread(handle.result)
        except WorkerMismatch as e:
            logger.warning("worker out of step (%s): reset and recompute every sequence", e)
            await self._drain_pending()
            await asyncio.to_thread(self.executor.reset)
            self.scheduler.reset_workers()
            return
        except WorkerUnavailable as e:
            logger.error("worker group unavailable: %s", e)
            await self._drain_pending()
            await self._fail(list(self.inflight.values()), f"worker unavailable: {e}")
            self.scheduler.reset_workers()
            # The workers still answering restart their step ids with ours, so the next step
            # reaches them (in a group whose peer died, its collective fails and they exit for a
            # restart instead of answering "out of step" forever).
            try:
                await asyncio.to_thread(self.executor.reset)
            except (WorkerUnavailable, WorkerMismatch):
                pass
            return
        self.steps += 1
        events = self.scheduler.update(plan, output)
        self.obs.step_finished(plan, output, started)
        await self._publish(events)

    async def _drain_pending(self) -> None:
        """Forget the steps still in flight (the group failed): wait them out briefly."""
        while self._pending:
            _, handle, _ = self._pending.popleft()
            try:
                await asyncio.to_thread(handle.result)
            except (WorkerMismatch, WorkerUnavailable):
                pass

    async def _nothing_to_run(self) -> None:
        """No step could be planned and none is in flight."""
        if self.scheduler.num_running == 0 and self.scheduler.num_waiting:
            # Nothing runs and the head of the queue still does not fit: it never will.
            head = self.scheduler.waiting[0][1].request_id
            owner = self._owner.get(head)
            if owner is not None:
                await self._fail([owner[0]], "the request does not fit in the KV cache "
                                 f"({self.scheduler.config.num_blocks} blocks)")
            else:
                self.scheduler.abort(head)
            return
        await asyncio.sleep(0.01)   # everything waits for blocks that aborts will free

    async def _publish(self, events: list[RequestEvent]) -> None:
        out: list[tuple[str, OutputEvent]] = []
        acks: list[str] = []
        for ev in events:
            owner = self._owner.get(ev.request_id)
            if owner is None:
                continue
            req, k = owner
            n = req.queued.params.n
            if n > 1 and not req.siblings_added and ev.new_token_ids:
                req.siblings_added = True
                for j in range(1, n):
                    self._add_sequence(req, j)
            if ev.finish_reason is not None:
                req.unfinished.discard(k)
                del self._owner[ev.request_id]
                self.obs.sequence_finished(ev.request_id, ev.finish_reason)
            final = not req.unfinished
            out.append((req.queued.request_id, OutputEvent(
                req.next_index, ev.new_token_ids, seq_index=k, finish_reason=ev.finish_reason,
                final=final, logprobs=ev.logprobs, prompt_logprobs=ev.prompt_logprobs)))
            req.next_index += 1
            if final:
                acks.append(req.entry_id)
                del self.inflight[req.queued.request_id]
        await self.queue.publish(out, acks=acks, stats=self._stats())

    def _stats(self) -> tuple[str, dict] | None:
        if self.stats_key is None:
            return None
        s = self.scheduler
        return self.stats_key, {"running": s.num_running, "waiting": s.num_waiting,
                                "kv_blocks_in_use": s.kv.num_blocks_in_use,
                                "kv_blocks": s.config.num_blocks, "steps": self.steps}

    def _end(self, req: _InFlight, reason: str, error: str | None = None) -> OutputEvent:
        """Abort what is left of a request and make its final event."""
        rid, n = req.queued.request_id, req.queued.params.n
        for k in sorted(req.unfinished):
            self.scheduler.abort(_seq_id(rid, k, n))
            self._owner.pop(_seq_id(rid, k, n), None)
        req.unfinished.clear()
        self.inflight.pop(rid, None)
        self.obs.request_ended(rid, reason)
        event = OutputEvent(req.next_index, [], finish_reason=reason, final=True, error=error)
        req.next_index += 1
        return event

    async def _apply_cancels(self) -> None:
        cancelled = [self.inflight[rid] for rid in await self.queue.drain_cancels()
                     if rid in self.inflight]
        if cancelled:
            await self.queue.publish([(r.queued.request_id, self._end(r, "abort")) for r in cancelled],
                                     acks=[r.entry_id for r in cancelled], stats=self._stats())

    async def _fail(self, requests: list[_InFlight], message: str) -> None:
        await self.queue.publish(
            [(r.queued.request_id, self._end(r, "error", message)) for r in requests],
            acks=[r.entry_id for r in requests], stats=self._stats())
