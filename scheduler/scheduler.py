"""The phase-less continuous-batching scheduler (DESIGN.md §2), free of I/O.

Every request has `num_computed_tokens` and a target (`num_tokens`: prompt + output). Each
step hands a token budget to running requests first, then to waiting ones in (priority,
fair-share tag, arrival) order (scheduler.fair_share: FCFS within one tenant); a long prompt
simply gets a chunk of the budget per step (chunked prefill); prefix-cache hits start a
request with some tokens already computed. When blocks run out the last running request in
that order is preempted: its blocks are freed and it waits again, to be recomputed from its
prompt and the tokens it already produced.

It schedules sequences (a user request of n sequences is n of them); `schedule()` returns a
StepPlan, and scheduler.engine_core applies the workers' results (`EngineCore.update`, the
only loop over a step's outputs) and groups sequences into requests. With pipeline
parallelism several steps are in flight at once: a sequence in a step not yet updated is
skipped (and never preempted) by the next `schedule()`, so each step works on sequences
whose last token is known, and the steps' results are applied in the order they were planned.
"""

from __future__ import annotations

import bisect
import heapq
import logging
from dataclasses import dataclass
from typing import Any

from common.config import BlockConfig, SchedulingConfig, SpeculativeConfig
from common.limits import check_prompt
from common.step import NewSequence, RunningSequence, StepPlan
from scheduler.fair_share import FairShare
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.request import Request, RequestStatus
from scheduler.spec_decode import NgramProposer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler core's sizes: the settings (common/config.py) resolved against the model
    and the workers. `from_settings` builds it; the settings' defaults serve unit tests."""
    num_blocks: int
    block_size: int = BlockConfig.block_size
    max_num_seqs: int = SchedulingConfig.max_num_seqs
    max_num_batched_tokens: int = SchedulingConfig.max_num_batched_tokens
    max_model_len: int = 2048                     # resolved: the model's or the flag's
    enable_prefix_caching: bool = SchedulingConfig.enable_prefix_caching
    hash_seed: int | None = None
    speculative: SpeculativeConfig | None = None   # n-gram speculative decoding, if on

    @classmethod
    def from_settings(cls, settings: Any, num_blocks: int, max_model_len: int
                      ) -> SchedulerConfig:
        """From a config with the SchedulingConfig and BlockConfig groups (the service's or
        the offline engine's), the pool the workers can hold and the resolved context."""
        spec = SpeculativeConfig.parse(getattr(settings, "speculative_config", None))
        if spec is not None and getattr(settings, "pipeline_parallel_size", 1) > 1:
            # With several steps in flight a sequence's last token is unknown when the next
            # step is planned: nothing to draft from. Plain decoding instead.
            logger.warning("speculative decoding is off: pipeline parallelism (%d stages) "
                           "does not support it", settings.pipeline_parallel_size)
            spec = None
        return cls(num_blocks=num_blocks, block_size=settings.block_size,
                   max_num_seqs=settings.max_num_seqs,
                   max_num_batched_tokens=settings.max_num_batched_tokens,
                   max_model_len=max_model_len,
                   enable_prefix_caching=settings.enable_prefix_caching, speculative=spec)


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.kv = KVCacheManager(config.num_blocks, config.block_size,
                                 enable_caching=config.enable_prefix_caching,
                                 hash_seed=config.hash_seed)
        self.requests: dict[str, Request] = {}
        self.waiting: list[tuple[tuple, Request]] = []   # heap by (priority, fair tag, arrival)
        self.running: list[Request] = []                            # sorted by (priority, arrival)
        self._arrivals = 0
        self._step_id = 0
        self._finished_since_last_step: list[str] = []
        self.num_preemptions = 0
        self.in_flight: set[str] = set()    # requests in a planned step not yet updated
        self._num_dead_waiting = 0          # aborted while waiting, still in the heap
        self.fair = FairShare()             # the waiting order between tenants
        self.waiting_for_blocks = False     # the last schedule() stopped at a lack of blocks
        self.proposer = NgramProposer(config.speculative) if config.speculative else None

    # ---- intake -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        check_prompt(request.prompt_token_ids, self.config.max_model_len)
        request.arrival = self._arrivals
        self._arrivals += 1
        request.fair_tag = self.fair.tag(request.tenant, request.weight,
                                         request.num_prompt_tokens + request.params.max_tokens)
        self.requests[request.request_id] = request
        heapq.heappush(self.waiting, (request.sort_key, request))

    def abort(self, request_id: str) -> bool:
        """Finish a sequence at once and free everything it holds. False if unknown/finished.
        A waiting one stays in the heap, finished, until it reaches the top (no O(n) rebuild)."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self._num_dead_waiting += 1
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        return True

    def _drop_dead_head(self) -> None:
        waiting = self.waiting
        while waiting and waiting[0][1].status.finished:
            heapq.heappop(waiting)
            self._num_dead_waiting -= 1

    @property
    def head_of_queue(self) -> Request | None:
        """The next waiting sequence to admit, if any."""
        self._drop_dead_head()
        return self.waiting[0][1] if self.waiting else None

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running) or len(self.waiting) > self._num_dead_waiting

    # ---- schedule -----------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        self._step_id += 1
        plan = StepPlan(step_id=self._step_id, finished_ids=self._finished_since_last_step)
        self._finished_since_last_step = []
        budget = self.config.max_num_batched_tokens
        preempted = False
        i = 0
        block_size = self.config.block_size
        running_plan = plan.running
        in_flight = self.in_flight
        proposer = self.proposer
        spec_rows: list[tuple[Request, RunningSequence]] = []   # decodes that may get drafts
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            if in_flight and req.request_id in in_flight:
                i += 1
                continue
            tokens = req.all_token_ids
            num_new = min(len(tokens) - req.num_computed_tokens, budget)
            # Fast path (most decodes): the request's blocks already hold the new tokens.
            new_blocks = [] if req.num_computed_tokens + num_new <= req.num_slots else None
            while new_blocks is None:
                new_blocks = self.kv.allocate_slots(req.request_id, num_new,
                                                    req.num_computed_tokens)
                if new_blocks is not None:
                    break
                victim = self._victim(i)
                if victim is None:
                    break   # every later request is in flight: wait for their steps
                self._preempt(victim, plan)
                preempted = True
                if victim is req:
                    break
            if new_blocks is None:
                break   # req was preempted or cannot grow now: nothing after it runs either
            if new_blocks:
                req.num_slots += len(new_blocks) * block_size
            if req.known_to_workers:
                known = req.num_worker_tokens
                new_tokens = tokens[known:] if len(tokens) > known else []
                req.num_worker_tokens = len(tokens)
                running_plan.append(RunningSequence(req.request_id, req.num_computed_tokens,
                                                    num_new, new_blocks, new_tokens))
                if proposer is not None and num_new == 1:
                    spec_rows.append((req, running_plan[-1]))
            else:
                self._send_in_full(plan, req, num_new)
            budget -= num_new
            i += 1
        # New work only when nothing had to be preempted (it would just thrash).
        self.waiting_for_blocks = preempted
        if self._num_dead_waiting:
            self._drop_dead_head()
        while (self.waiting and budget > 0 and not preempted
               and len(self.running) < self.config.max_num_seqs):
            req = self.waiting[0][1]
            hits: list[int] = []
            if req.num_computed_tokens == 0:
                hits, num_cached = self.kv.get_computed_blocks(
                    req.request_id, req.all_token_ids, req.cache_salt)
                req.num_computed_tokens = num_cached
                if req.num_preemptions == 0:
                    req.num_cached_tokens = num_cached
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            new_blocks = self.kv.allocate_slots(req.request_id, num_new,
                                                req.num_computed_tokens, hits)
            if new_blocks is None:
                req.num_computed_tokens = 0
                self.waiting_for_blocks = True
                break
            heapq.heappop(self.waiting)
            if self._num_dead_waiting:
                self._drop_dead_head()
            req.num_slots = len(new_blocks) * self.config.block_size   # hits included
            req.status = RequestStatus.RUNNING
            self.fair.started(req.fair_tag)
            bisect.insort(self.running, req, key=lambda r: r.sort_key)
            self._send_in_full(plan, req, num_new)
            budget -= num_new
        if spec_rows and budget > 0:
            self._add_drafts(spec_rows, budget, len(plan.running) + len(plan.new))
        if not plan.new and not plan.running:
            # Nothing to run: no step. Its id and its finished ids go to the next real plan
            # (workers see step ids without gaps and learn every finished sequence).
            self._step_id -= 1
            self._finished_since_last_step = plan.finished_ids + self._finished_since_last_step
        return plan

    def _add_drafts(self, rows: list[tuple[Request, RunningSequence]], budget: int,
                    emitting: int) -> None:
        """Speculative decoding: draft tokens for this step's decodes, from the budget and
        the free blocks that the decodes and prefills left (guesses never displace sure work,
        and never preempt anything); each row then computes its token plus its drafts."""
        proposer, kv, block_size = self.proposer, self.kv, self.config.block_size
        size = proposer.config.disable_by_batch_size
        if size is not None and len(self.running) >= size:
            return   # vLLM's disable_by_batch_size
        # One row's price this step, in output tokens: the tokens planned so far and the rows
        # that emit a token (about one per sequence planned).
        cost = proposer.row_cost(self.config.max_num_batched_tokens - budget, emitting)
        for req, row in rows:
            drafts = proposer.propose(req, budget, self.config.max_model_len, cost)
            if not drafts:
                continue
            num_new = 1 + len(drafts)
            if req.num_computed_tokens + num_new > req.num_slots:
                new_blocks = kv.allocate_slots(req.request_id, num_new, req.num_computed_tokens)
                if new_blocks is None:
                    continue
                req.num_slots += len(new_blocks) * block_size
                row.new_block_ids = row.new_block_ids + new_blocks
            row.num_scheduled_tokens = num_new
            row.draft_token_ids = drafts
            budget -= len(drafts)
            if budget <= 0:
                return

    def mark_in_flight(self, plan: StepPlan) -> None:
        """The plan's requests stay out of later plans until `update(plan, ...)` (pipelining)."""
        self.in_flight.update(s.seq_id for s in plan.new)
        self.in_flight.update(s.seq_id for s in plan.running)

    def _victim(self, i: int) -> Request | None:
        """The request to preempt so that running[i] can grow: the last one after it that is
        not in flight, else running[i] itself; None (wait) when only in-flight ones follow,
        since their steps end soon and give the choice back."""
        for j in range(len(self.running) - 1, i, -1):
            req = self.running[j]
            if req.request_id not in self.in_flight:
                return req
        return self.running[i] if len(self.running) == i + 1 else None

    def _send_in_full(self, plan: StepPlan, req: Request, num_new: int) -> None:
        """A request the workers do not know (new, or back after preemption): all its tokens
        and its whole block table; later steps send only deltas."""
        req.known_to_workers = True
        req.num_worker_tokens = len(req.all_token_ids)
        plan.new.append(NewSequence(
            seq_id=req.request_id, token_ids=list(req.all_token_ids),
            num_prompt_tokens=req.num_prompt_tokens, num_computed_tokens=req.num_computed_tokens,
            num_scheduled_tokens=num_new, block_ids=self.kv.get_block_ids(req.request_id),
            params=req.params, seed_offset=req.seed_offset))

    def _preempt(self, req: Request, plan: StepPlan) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_slots = 0
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        if req.known_to_workers:
            plan.finished_ids.append(req.request_id)
            req.known_to_workers = False
        plan.preempted_ids.append(req.request_id)
        # A request planned earlier in this same step cannot be the victim: the victim is
        # always the last running request and planning walks the list from the front.
        heapq.heappush(self.waiting, (req.sort_key, req))

    def reset_workers(self) -> None:
        """The workers lost their state (Reset, restart): every running request is preempted,
        so it is sent again in full and recomputed from its prompt and generated tokens."""
        plan = StepPlan(step_id=self._step_id)
        for req in list(reversed(self.running)):
            self._preempt(req, plan)
        for _, req in self.waiting:
            req.known_to_workers = False
        self._finished_since_last_step = []
        self._step_id = 0
        self.in_flight.clear()

    # ---- finish -------------------------------------------------------------------------
    def finish(self, req: Request, status: RequestStatus) -> None:
        """A running sequence is done (stop, length, or cut short by its driver)."""
        self.running.remove(req)
        self._finish(req, status)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        self.kv.free(req.request_id)
        if req.known_to_workers:
            self._finished_since_last_step.append(req.request_id)
            req.known_to_workers = False
        del self.requests[req.request_id]

    # ---- introspection ------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) - self._num_dead_waiting
