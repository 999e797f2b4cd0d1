"""The scheduler service's engine loop: a Redis shell around the engine core.

    exchange()      one pipeline: last step's events + acks + gauges out, new requests and
                    cancels in
    plan = core.schedule(); handle = executor.execute_async(plan)
    events = core.update(plan, handle.result())

All request and sequence bookkeeping is the core's (scheduler.engine_core); this module only
moves things between Redis and it. Intake reads new requests while the block manager can take
them, up to max_num_seqs running and waiting (back-pressure stays visible as queue depth);
a scheduler whose group is the model's only one reads on into its waiting queue, up to
``max_waiting_requests``, even while short of KV blocks, so that fair share orders every
request queued (see `_admission_room`); a request is acknowledged in the same
pipeline as its final event; with pipeline parallelism up to ``pipeline_depth`` steps are in
flight (`_fill_pipeline`). What keeps requests alive through faults (a worker group that
stops answering, a dead scheduler's requests to take over) is scheduler.recovery's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from redis.exceptions import RedisError

from common import redis_schema as schema
from common.redis_schema import OutputEvent, QueuedRequest
from common.step import StepOutput, StepPlan
from scheduler.admission import check_admissible, check_plan_for_test_poison
from scheduler.engine_core import EngineCore, EngineRequest
from scheduler.executor import Executor, StepHandle, WorkerMismatch, WorkerUnavailable
from scheduler.fence import Fenced
from scheduler.queue import RequestQueue
from scheduler.recovery import WORKER, Recovery

logger = logging.getLogger(__name__)

Events = list[tuple[EngineRequest, OutputEvent]]


class EngineLoop:
    def __init__(self, core: EngineCore, executor: Executor, queue: RequestQueue,
                 idle_block_ms: int = 100, stats_key: str | None = None,
                 pipeline_depth: int = 1, claim_idle_ms: int = 3000,
                 request_timeout_s: float = 600.0, group: str | None = None,
                 max_waiting_requests: int = 0) -> None:
        self.core = core
        self.executor = executor
        self.queue = queue
        self.idle_block_ms = idle_block_ms
        self.stats_key = stats_key
        # Steps in flight at once: a pipeline of P stages needs P to keep every stage busy.
        self.pipeline_depth = pipeline_depth
        # In plan order: (plan, handle, telemetry token, perf_counter when it was sent).
        self._pending: deque[tuple[StepPlan, StepHandle, float, float]] = deque()
        self._last_done = 0.0   # perf_counter when the last step's output came
        self._out: list[tuple[str, OutputEvent]] = []   # to publish with the next exchange
        self._acks: list[str] = []
        self._stepped = False   # gauges changed since the last exchange
        self.stopped = asyncio.Event()
        self.steps = 0
        self.obs = core.obs   # telemetry hooks (scheduler.telemetry.EngineObserver)
        self._last_plan: StepPlan | None = None   # the plan most recently sent (_step_raised)
        self.recovery = Recovery(self, claim_idle_ms, request_timeout_s, group)
        # Read past the max_num_seqs window into the waiting queue, up to this many waiting
        # (0: never), while ``alone``: no other worker group of the model ever registered
        # (`_watch_peers`; a loop of no group has none), so none could take them from Redis.
        self.max_waiting_requests = max_waiting_requests
        self.alone = group is None
        self.group = group
        # The exchange that publishes the last step's events, started as soon as they were
        # staged; its reply (new requests, cancels) is taken while the next step runs.
        self._exchanging: asyncio.Task | None = None

    # ---- the loop -----------------------------------------------------------------------
    async def run(self) -> None:
        claims = (asyncio.create_task(self.recovery.keep_claimed())
                  if self.recovery.claim_idle_ms > 0 else None)
        fenced = False
        peers = (asyncio.create_task(self._watch_peers())
                 if self.max_waiting_requests and self.group is not None else None)
        try:
            while not self.stopped.is_set():
                if not self.core.has_unfinished and not self._pending:
                    await self._exchanged()   # its reply may bring requests
                    if not self.core.has_unfinished:
                        await self._exchange(self.idle_block_ms)   # idle: wait for requests
                    if not self.core.has_unfinished:
                        await self._canary()
                        continue
                try:
                    await self.step()
                except (WorkerMismatch, WorkerUnavailable, Fenced, RedisError, OSError):
                    raise   # not a request's fault: worker and Redis failures have their paths
                except Exception as e:   # noqa: BLE001 - a request's processing raised
                    await self._step_raised(e)
        except Fenced as e:
            # Paused past our lease: the successor owns our requests and drives the group.
            logger.error("%s: stopping without writing another event", e)
            fenced = True
            self.stopped.set()
        finally:   # stopped (lease lost, shutdown): what the last step produced still goes out
            if claims is not None:
                claims.cancel()
            if peers is not None:
                peers.cancel()
            try:
                await self._exchanged()
            except Fenced as e:
                logger.error("%s: stopping without writing another event", e)
                fenced = True
            except (RedisError, OSError) as e:
                logger.error("could not publish a step's events: %s", e)
            if (self._out or self._acks) and not fenced:
                try:
                    await self.queue.publish(self._out, acks=self._acks, stats=self._stats())
                except (Fenced, RedisError, OSError) as e:
                    logger.error("could not publish the last step's events: %s", e)

    async def step(self) -> None:
        """Plan up to the pipeline's depth, wait for the oldest step, apply it; its events go
        out at once, in an exchange whose reply is taken while the next step runs.

        NOTE: the workers never wait on Redis. Publishing a step's events, reading new
        requests and cancels used to sit between two steps, with the workers idle (on 2
        cores at 128 running requests, the worker was idle 1.9 s of a 46 s batch of 82
        steps, while Redis woke every stream reader). Now the exchange's commands are written
        before the next step is planned, and its reply is awaited once that step is sent:
        the events still go out first (a token's latency is unchanged), and requests read
        in the reply join the step after (which they could not have joined anyway)."""
        if not self._fill_pipeline():   # nothing runs: Redis still brings cancels, requests
            await self._exchanged()
            await self._exchange(None)
            await self._nothing_to_run()
        await self._exchanged()
        if not self._pending:
            return
        plan, handle, started, sent = self._pending.popleft()
        output = await self._wait(handle)
        if output is None:
            return   # the group failed; _wait dealt with it
        # Speculation's cost model: the step's own time (pipelined, from the previous one's end).
        done = time.perf_counter()
        self.core.step_time(plan, done - max(sent, self._last_done))
        self._last_done = done
        self.steps += 1
        self._stepped = True
        events = self.core.update(plan, output)
        self.obs.step_finished(plan, output, started)
        self._stage(events)
        self._exchanging = asyncio.ensure_future(self._exchange(None))
        await asyncio.sleep(0)   # it writes its commands now, before the next step is planned

    async def _exchanged(self) -> None:
        """Take the reply of the exchange step() started (raising what it raised)."""
        task, self._exchanging = self._exchanging, None
        if task is not None:
            await task

    # ---- Redis --------------------------------------------------------------------------
    def _admission_room(self) -> int:
        """How many new requests to read. Within the window of max_num_seqs running and
        waiting together, so that fair share (scheduler.fair_share) sees later tenants while
        a flood of one tenant waits for the token budget; none of it while earlier ones wait
        for KV blocks (they stay in Redis, where another group can take them). A scheduler
        ``alone`` (no other group) reads on, even short of blocks, until
        ``max_waiting_requests`` wait: left in the FIFO stream, a later tenant's requests
        would wait behind a whole flood that exceeds the KV cache; read, they are ordered
        by fair share. They stay durable: read and not acked, they sit in this consumer's
        pending list, touched with the rest and claimed by a standby if this one dies
        (scheduler.recovery)."""
        c = self.core
        if self.recovery.down:   # read on (deadlines hold) unless a peer group serves them
            return 0 if self.recovery.peer_up else max(c.config.max_num_seqs - len(c.requests), 0)
        deep = (max(self.max_waiting_requests - c.num_waiting, 0)
                if self.alone and self.max_waiting_requests else 0)
        if c.scheduler.waiting_for_blocks or c.kv.num_free_blocks == 0:
            return deep
        return max(c.config.max_num_seqs - c.num_running - c.num_waiting, deep)

    @property
    def held(self) -> int:
        """Requests read past the max_num_seqs window (a lone group's deep read): those the
        stream's lag no longer counts, added to the queue depth the gateway and the
        autoscaling gauge see."""
        return max(len(self.core.requests) - self.core.config.max_num_seqs, 0)

    async def check_peers(self) -> bool:
        """Set ``alone``: no other group of the model ever published readiness."""
        key = schema.ready_groups(self.queue.model)
        groups = {schema.text(g) for g in await self.queue.redis.smembers(key)}
        self.alone = not (groups - {self.group})
        return self.alone

    async def _watch_peers(self, period_s: float = 2.0) -> None:
        while True:
            try:
                await self.check_peers()
            except (RedisError, OSError) as e:   # keep the last answer
                logger.warning("cannot read the model's worker groups: %s", e)
            await asyncio.sleep(period_s)

    async def _exchange(self, block_ms: int | None) -> None:
        """One round trip: publish what the last step produced, read new requests (as many as
        fit) and cancels; admit the new ones, publish the cancelled ones' final events."""
        out, acks = self._out, self._acks
        self._out, self._acks = [], []
        stats = self._stats() if (self._stepped or out) else None
        self._stepped = False
        entries, cancels = await self.queue.exchange(out, acks, stats,
                                                     self._admission_room(), block_ms)
        recovered = [(e, q) for e, q in entries if q.recovered]
        for entry_id, queued in entries:
            if not queued.recovered:
                self.new_request(entry_id, queued)
        if recovered:   # handed off by a scheduler whose worker group died
            await self.recovery.resume(recovered, WORKER)
        cancelled = [e for e in (self._end(rid, "abort") for rid in cancels) if e is not None]
        if cancelled:   # at once, not after the next step: a cancel is rare, a step may be long
            await self._publish_now(cancelled)

    def new_request(self, entry_id: str, queued: QueuedRequest,
                    emitted: list[list[int]] | None = None,
                    next_index: int = 0) -> EngineRequest | None:
        """Admit a request read from the stream (resumed: with the tokens each sequence
        emitted and its next event index); None if it was refused (its error is staged)."""
        admitted = self.queue.admitted_at
        entered = schema.entry_time(entry_id)
        waited = max(admitted - entered, 0.0) if admitted and not emitted else 0.0
        req = EngineRequest(queued.request_id, list(queued.prompt_token_ids), queued.params,
                            priority=queued.priority, model=queued.model,
                            cache_salt=queued.cache_salt, tenant=queued.tenant,
                            weight=queued.weight,
                            traceparent=queued.traceparent, queue_wait_s=waited, tag=entry_id,
                            emitted=emitted, next_index=next_index,
                            deadline=self.recovery.deadline_of(queued, entered))
        try:
            check_admissible(queued)
            self.core.add_request(req)
            return req
        except Exception as e:   # noqa: BLE001 - whatever it is, the request fails alone
            # e.g. a prompt or a number the gateway should not have let through
            logger.warning("request %s refused at intake: %s", queued.request_id, e,
                           extra={"request_id": queued.request_id})
            if req.request_id in self.core.requests:
                self.core.abort(req.request_id)
            self._stage([(req, OutputEvent(next_index, [], finish_reason="error", final=True,
                                           error=f"the scheduler cannot process this "
                                           f"request: {e}"))])
            return None

    def _stage(self, events: Events) -> None:
        for req, ev in events:
            self._out.append((req.request_id, ev))
            if ev.final:
                self._acks.append(req.tag)

    async def _publish_now(self, events: Events) -> None:
        self._stage(events)
        out, acks = self._out, self._acks
        self._out, self._acks = [], []
        await self.queue.publish(out, acks=acks, stats=self._stats())

    def _end(self, request_id: str, reason: str,
             error: str | None = None) -> tuple[EngineRequest, OutputEvent] | None:
        req = self.core.requests.get(request_id)
        if req is None:
            return None   # another scheduler's, or finished
        return req, self.core.abort(request_id, reason, error)

    def _stats(self) -> tuple[str, dict] | None:
        if self.stats_key is None:
            return None
        c = self.core
        return self.stats_key, {"running": c.num_running, "waiting": c.num_waiting,
                                "held": self.held,
                                "kv_blocks_in_use": c.kv.num_blocks_in_use,
                                "kv_blocks": c.config.num_blocks, "steps": self.steps}

    # ---- steps: pipelining, idle, failures ----------------------------------------------
    def _fill_pipeline(self) -> bool:
        """Plan and send steps until `pipeline_depth` are in flight. False when nothing could
        be planned and nothing is in flight."""
        while len(self._pending) < self.pipeline_depth:
            plan = self.core.schedule()
            if plan.num_sequences == 0:
                return bool(self._pending)
            if self.pipeline_depth > 1:
                self.core.mark_in_flight(plan)
            started = self.obs.step_started(plan)
            self._last_plan = plan   # for _step_raised: the step a failure most likely is in
            check_plan_for_test_poison(plan)
            self._pending.append((plan, self.executor.execute_async(plan), started,
                                  time.perf_counter()))
        return True

    async def _wait(self, handle: StepHandle) -> StepOutput | None:
        """The step's output; None when the group failed (then every in-flight step is
        dropped and the sequences are recomputed or failed)."""
        try:
            return await asyncio.to_thread(handle.result)
        except WorkerMismatch as e:
            logger.warning("worker out of step (%s): reset and recompute every sequence", e)
            await self._drain_pending()
            await asyncio.to_thread(self.executor.reset)
            # A restarted worker answers "Warmup first": re-warmed, its KV cache is new.
            self.core.requeue_running(kv_lost=True)
        except WorkerUnavailable as e:
            # Keep the requests (no error to their clients): recomputed from their tokens once
            # the group answers again, or handed to a peer group at once (scheduler.recovery).
            await self._drain_pending()
            self.core.requeue_running()
            await self.recovery.wait_for_group(e)
        return None

    async def _step_raised(self, error: Exception) -> None:
        """A step raised outside the workers' protocol: some request's processing failed.
        Which one cannot be known for sure: the suspects are the requests the last planned
        step introduced that have produced nothing yet (else every request it introduced);
        they fail with an error event, the others are recomputed from their tokens after a
        reset, exactly as after a worker reset. The process lives, and the request that raised
        is acked with its error, so it cannot come back."""
        logger.exception("a step raised: failing the requests it introduced")
        await self._drain_pending()
        plan, self._last_plan = self._last_plan, None
        seqs = self.core.scheduler.requests
        introduced = {}
        for s in (plan.new if plan is not None else ()):
            seq = seqs.get(s.seq_id)
            if seq is not None and seq.owner is not None:
                introduced[seq.owner.request_id] = seq.owner
        suspects = ([r for r in introduced.values() if r.next_index == 0]
                    or list(introduced.values()))
        message = f"the scheduler failed processing this request: {error}"
        await self._publish_now([e for e in (self._end(r.request_id, "error", message)
                                             for r in suspects) if e is not None])
        self.core.requeue_running()
        try:
            await asyncio.to_thread(self.executor.reset)
        except (WorkerUnavailable, WorkerMismatch):
            pass

    async def _drain_pending(self) -> None:
        """Forget the steps still in flight (the group failed): wait them out briefly."""
        while self._pending:
            _, handle, _, _ = self._pending.popleft()
            try:
                await asyncio.to_thread(handle.result)
            except (WorkerMismatch, WorkerUnavailable):
                pass

    async def _nothing_to_run(self) -> None:
        """No step could be planned and none is in flight."""
        head = self.core.unfittable_head()
        if isinstance(head, EngineRequest):
            await self._publish_now([self._end(
                head.request_id, "error", "the request does not fit in the KV cache "
                f"({self.core.config.num_blocks} blocks)")])
        elif head is not None:
            self.core.scheduler.abort(head.request_id)
        else:
            await asyncio.sleep(0.01)   # everything waits for blocks that aborts will free

    async def _canary(self) -> None:
        """Idle: now and then a one-token step nobody reads, so that readiness keeps meaning
        "the worker group finished a real forward pass recently" (scheduler.health)."""
        request = self.obs.canary()
        if request is None:
            return
        self.core.scheduler.add_request(request)
        try:
            await self.step()
        finally:
            self.core.scheduler.abort(request.request_id)   # a no-op unless the step failed
