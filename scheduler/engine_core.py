"""The engine core: user requests of n sequences over the scheduler, free of I/O (DESIGN.md §2).

Both engines drive it: the offline `LLM` (tessera/engine.py: a local executor plus
detokenization) and the scheduler service (scheduler/loop.py: a Redis shell around it). Each
step is

    plan = core.schedule(); output = executor.execute(plan)
    events = core.update(plan, output)     # [(EngineRequest, OutputEvent)], per request

A request's sequences are scheduler Requests whose ``owner`` is the EngineRequest; sequence 0
computes (and caches) the prompt, the others join after its first token and so share the
prompt's KV blocks through the prefix cache. Events are numbered per request (``index``, over
all n sequences) and the last one is ``final``: the wire format of the Redis output streams
(common.redis_schema.OutputEvent), which the service publishes as they are.

With speculative decoding (scheduler.spec_decode) a decode may carry draft tokens and emit
several tokens in one step: one event with all of them, cut at a stop token or max_tokens.

Recovery (DESIGN.md §4) builds on two hooks: ``requeue_running()`` preempts everything so it is
recomputed from prompt + generated tokens (the workers lost their state), and an EngineRequest
may come with ``emitted`` (each sequence's tokens already delivered) and ``next_index`` (the
index of its next event): a standby that claims a request resumes it where the dead scheduler
stopped, recomputing prompt + emitted tokens and continuing the indices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.redis_schema import OutputEvent
from common.sampling_params import SamplingParams
from common.step import SampledToken, StepOutput, StepPlan
from scheduler.request import Request, RequestStatus
from scheduler.scheduler import Scheduler, SchedulerConfig
from scheduler.telemetry import NullObserver


def sequence_id(request_id: str, k: int, n: int) -> str:
    """The scheduler's (and workers') id of sequence k of a request of n: the one place the
    format is written."""
    return request_id if n == 1 else f"{request_id}#{k}"


@dataclass(eq=False, slots=True)
class EngineRequest:
    """A user request: what the driver gives `add_request`, and the core's state for it."""
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    cache_salt: str | None = None
    tenant: str = ""                    # fair share between tenants (scheduler.fair_share)
    weight: float = 1.0
    model: str = ""                     # for telemetry attributes
    traceparent: str | None = None      # W3C context of the caller's span (telemetry)
    queue_wait_s: float = 0.0           # waited before it reached the core (telemetry)
    tag: Any = None                     # the driver's (the service: its stream entry id)
    deadline: float | None = None       # the driver's: wall clock past which a fault fails it
    # Resume (DESIGN.md §4): tokens each sequence already emitted, and the next event index.
    emitted: list[list[int]] | None = None
    next_index: int = 0
    # ---- the core's -----------------------------------------------------------------------
    seqs: list[Request] = field(default_factory=list)   # index k = sequence k
    num_unfinished: int = 0
    siblings_added: bool = False
    telemetry: Any = None               # the telemetry hooks' per-request state

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0 and bool(self.seqs)

    @property
    def num_output_tokens(self) -> int:
        return sum(len(s.output_token_ids) for s in self.seqs)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens the first sequence found in the prefix cache."""
        return self.seqs[0].num_cached_tokens if self.seqs else 0


class EngineCore:
    """Requests in, per-request events out; the executor and all I/O stay with the driver."""

    def __init__(self, config: SchedulerConfig, eos_token_ids: tuple[int, ...] = (),
                 observer: NullObserver | None = None) -> None:
        self.scheduler = Scheduler(config)
        self.config = config
        self.eos_token_ids = tuple(eos_token_ids)
        self.requests: dict[str, EngineRequest] = {}
        self.obs = observer or NullObserver()
        self.obs.attach(self.scheduler)

    # ---- requests -----------------------------------------------------------------------
    def add_request(self, req: EngineRequest) -> None:
        """Admit a request (ValueError if it cannot run: empty, too long, duplicate id)."""
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        if not req.prompt_token_ids:
            raise ValueError("prompt is empty")
        limit = self.config.max_model_len
        if len(req.prompt_token_ids) >= limit:
            raise ValueError(f"prompt of {len(req.prompt_token_ids)} tokens does not fit "
                             f"max_model_len {limit} (at least one token must remain for the "
                             "output)")
        n = req.params.n
        self.requests[req.request_id] = req
        req.seqs = [None] * n   # type: ignore[list-item]
        self.obs.request_added(req)
        # Resuming with tokens already out: every sequence recomputes its own (no sharing).
        for k in range(n if req.emitted else 1):
            self._add_sequence(req, k)
        req.siblings_added = bool(req.emitted) or n == 1
        if req.num_unfinished == 0:   # resumed with every sequence finished already
            del self.requests[req.request_id]
            raise ValueError(f"request {req.request_id!r} has finished already")

    def _add_sequence(self, req: EngineRequest, k: int) -> None:
        n = req.params.n
        seq = Request(sequence_id(req.request_id, k, n), list(req.prompt_token_ids), req.params,
                      priority=req.priority, eos_token_ids=self.eos_token_ids, seed_offset=k,
                      cache_salt=req.cache_salt, tenant=req.tenant, weight=req.weight)
        seq.owner = req
        req.seqs[k] = seq
        if req.emitted and req.emitted[k]:
            for t in req.emitted[k]:
                seq.append_token(t)
            status = seq.check_stop(self.config.max_model_len)
            if status is not None:   # it had finished already: nothing to schedule
                seq.status = status
                return
        self.scheduler.add_request(seq)
        req.num_unfinished += 1
        self.obs.sequence_added(req, seq)

    def abort(self, request_id: str, reason: str = "abort",
              error: str | None = None) -> OutputEvent | None:
        """End a request now (O(its sequences)): its final event, or None if unknown."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if seq is not None and not seq.status.finished:
                self.scheduler.abort(seq.request_id)
        req.num_unfinished = 0
        self.obs.request_ended(req, reason)
        event = OutputEvent(req.next_index, [], finish_reason=reason, final=True, error=error)
        req.next_index += 1
        return event

    def abort_all(self, reason: str, error: str | None = None
                  ) -> list[tuple[EngineRequest, OutputEvent]]:
        """End every request (e.g. the workers are gone): their final events."""
        reqs = list(self.requests.values())
        return [(r, self.abort(r.request_id, reason, error)) for r in reqs]

    def finish_sequence(self, request_id: str, k: int, reason: str = "stop"
                        ) -> OutputEvent | None:
        """The driver ends sequence k itself (a stop string matched in the text): its event
        (no tokens, ``final`` if it was the request's last), or None if already finished."""
        req = self.requests.get(request_id)
        seq = req.seqs[k] if req is not None else None
        if seq is None or seq.status.finished:
            return None
        if seq.status is RequestStatus.RUNNING:
            self.scheduler.finish(seq, RequestStatus(reason))
        else:
            self.scheduler.abort(seq.request_id)
            seq.status = RequestStatus(reason)
        return self._sequence_done(req, seq, [], reason, None, None)

    def requeue_running(self, kv_lost: bool = False) -> None:
        """The workers lost their state: every running sequence is preempted, to be sent again
        in full and recomputed from its prompt and generated tokens (events continue).
        ``kv_lost``: their KV cache too (a restarted or re-warmed worker), so the prefix
        cache's blocks hold nothing any more and are forgotten (every block is free now)."""
        self.scheduler.reset_workers()
        if kv_lost and not self.scheduler.kv.reset_prefix_cache():
            raise RuntimeError("prefix cache still in use after requeueing every sequence")

    # ---- steps --------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        return self.scheduler.schedule()

    def mark_in_flight(self, plan: StepPlan) -> None:
        self.scheduler.mark_in_flight(plan)

    def step_time(self, plan: StepPlan, seconds: float) -> None:
        """The driver's measure of a step it ran: speculation's cost model learns from steps
        that only decode (speed only, never outputs; nothing without speculation)."""
        proposer = self.scheduler.proposer
        if proposer is None or plan.new:
            return
        tokens = 0
        for s in plan.running:
            n = s.num_scheduled_tokens
            if n != 1 + len(s.draft_token_ids):
                return   # a prompt chunk: its tokens cost differently (no LM head)
            tokens += n
        proposer.cost.observe(tokens, seconds)

    def update(self, plan: StepPlan, output: StepOutput) -> list[tuple[EngineRequest, OutputEvent]]:
        """Apply a step's results; the events it produced, per request, in plan order."""
        # NOTE: the hottest Python of a step (every running sequence, every step): keep the
        # per-sequence work to a few attribute reads; anything rare goes behind one test.
        events: list[tuple[EngineRequest, OutputEvent]] = []
        sampled = output.sampled
        prompt_logprobs = output.prompt_logprobs
        seqs = self.scheduler.requests
        cache = self.scheduler.kv.cache_blocks
        running = RequestStatus.RUNNING
        max_len = self.config.max_model_len
        in_flight = self.scheduler.in_flight
        speculating = self.scheduler.proposer is not None
        deferred = output.deferred   # rare: sampling that waits for a grammar's compile
        siblings = None
        for s in (*plan.new, *plan.running):
            seq_id = s.seq_id
            if in_flight:
                in_flight.discard(seq_id)
            seq = seqs.get(seq_id)
            if seq is None or seq.status is not running:
                continue   # aborted while the step ran
            req = seq.owner
            prompt_lp = prompt_logprobs.get(seq_id) if prompt_logprobs else None
            if deferred and seq_id in deferred:
                # Not sampled (its grammar still compiles, worker/structured.py): its last
                # known token counts as not computed, so a later step runs it and samples.
                seq.num_computed_tokens = seq.num_tokens - 1
                cache(seq_id, seq.all_token_ids, seq.num_computed_tokens)
                if prompt_lp and req is not None:
                    events.append((req, OutputEvent(req.next_index, [], seq.seed_offset,
                                                    None, False, None, prompt_lp)))
                    req.next_index += 1
                continue
            drafts = getattr(s, "draft_token_ids", None) if speculating else None
            if drafts:
                ids, lp, status = self._apply_drafts(seq, s, sampled.get(seq_id),
                                                     output.extra_sampled.get(seq_id))
            else:
                computed = seq.num_computed_tokens = (seq.num_computed_tokens
                                                      + s.num_scheduled_tokens)
                cache(seq_id, seq.all_token_ids, computed)
                tok = sampled.get(seq_id)
                if tok is None:
                    if prompt_lp and req is not None:
                        events.append((req, OutputEvent(req.next_index, [], seq.seed_offset,
                                                        None, False, None, prompt_lp)))
                        req.next_index += 1
                    continue
                token_id = tok.token_id
                generated = seq.output_token_ids
                generated.append(token_id)
                tokens = seq.all_token_ids
                tokens.append(token_id)
                status = None
                if (token_id in seq._stop_ids or len(generated) >= seq.params.max_tokens
                        or len(tokens) >= max_len):
                    status = seq.check_stop(max_len)
                lp = None if tok.logprob is None else [(token_id, tok.logprob, tok.top_logprobs)]
                ids = [token_id]
            if status is None:
                if req is not None:   # else a bare sequence (the service's canary): no events
                    if not req.siblings_added:
                        siblings = siblings or []
                        siblings.append(req)
                    events.append((req, OutputEvent(req.next_index, ids,
                                                    seq.seed_offset, None, False, lp, prompt_lp)))
                    req.next_index += 1
                continue
            self.scheduler.finish(seq, status)   # rare: a few per step at most
            if req is not None:
                if not req.siblings_added:
                    siblings = siblings or []
                    siblings.append(req)
                events.append((req, self._sequence_done(req, seq, ids, status.value,
                                                        lp, prompt_lp)))
        if siblings:
            for req in siblings:
                self._add_siblings(req)
        return events

    def _apply_drafts(self, seq: Request, s, tok: SampledToken | None,
                      extra: list[SampledToken] | None
                      ) -> tuple[list[int], list | None, RequestStatus | None]:
        """A decode with draft tokens: the workers emitted [tok] + extra, one token per
        accepted draft more than a plain decode. The rejected drafts' KV slots are rolled
        back (num_computed_tokens counts only the verified tokens; their blocks stay with the
        sequence, which fills them within K tokens, and the stale entries are overwritten
        before anything reads them), and only verified tokens are hashed into the prefix
        cache. A stop inside the accepted run drops the tokens after it."""
        drafts = s.draft_token_ids
        emitted = [] if tok is None else [tok, *(extra or ())]
        accepted = max(len(emitted) - 1, 0)
        self.scheduler.proposer.observe(seq, len(drafts), accepted)
        seq.num_computed_tokens += s.num_scheduled_tokens - (len(drafts) - accepted)
        max_len = self.config.max_model_len
        ids: list[int] = []
        lps: list | None = None
        status = None
        for t in emitted:
            seq.append_token(t.token_id)
            ids.append(t.token_id)
            if t.logprob is not None:
                lps = lps if lps is not None else []
                lps.append((t.token_id, t.logprob, t.top_logprobs))
            status = seq.check_stop(max_len)
            if status is not None:
                break
        self.scheduler.kv.cache_blocks(seq.request_id, seq.all_token_ids,
                                       min(seq.num_computed_tokens, seq.num_tokens))
        return ids, lps, status

    def _add_siblings(self, req: EngineRequest) -> None:
        """Sequence 0 computed (and cached) the prompt: sequences 1.. join and share it."""
        if req.siblings_added or req.request_id not in self.requests:
            return
        req.siblings_added = True
        for k in range(1, req.params.n):
            self._add_sequence(req, k)

    def _sequence_done(self, req: EngineRequest, seq: Request, token_ids: list[int],
                       reason: str, lp, prompt_lp) -> OutputEvent:
        req.num_unfinished -= 1
        # Siblings not yet added count as unfinished: a request ends with all n sequences.
        final = req.num_unfinished == 0 and (req.siblings_added or req.params.n == 1)
        self.obs.sequence_finished(req, seq, reason)
        event = OutputEvent(req.next_index, token_ids, seq.seed_offset, reason, final, lp,
                            prompt_lp)
        req.next_index += 1
        if final:
            del self.requests[req.request_id]
        return event

    # ---- introspection ------------------------------------------------------------------
    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def kv(self):
        return self.scheduler.kv

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def unfittable_head(self) -> EngineRequest | Request | None:
        """Nothing runs and the head of the queue still does not fit: it never will. Its
        request (or the bare sequence), for the driver to fail; None otherwise."""
        if self.scheduler.num_running:
            return None
        head = self.scheduler.head_of_queue
        if head is None:
            return None
        return head.owner if head.owner is not None else head
