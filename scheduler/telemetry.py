"""What the engine loop reports, and how: per-request spans, Prometheus metrics, readiness.

The engine core calls ``request_added``, ``sequence_added``, ``sequence_finished`` and
``request_ended`` with its own request objects, and this module keeps its state on them
(``EngineRequest.telemetry``, the scheduler Request's ``telemetry``: no tracker of its own);
the loop calls ``step_started``, ``step_finished`` and ``canary``. This module turns them into

- one span per request, a child of the gateway's span (the trace context rode in the
  QueuedRequest): ``engine request`` with ``queue wait`` (enqueued in Redis -> first
  scheduled), and per sequence ``prefill`` (one event per chunk) and ``decode`` (``preempted``
  and ``resumed`` events), and a ``finish`` event; GenAI attributes plus our timings;
- the step's trace context for the workers (``StepPlan.trace_context``): the phase spans of the
  step's sequences, so each worker step span joins the trace of the first and links to all;
- the scheduler's Prometheus metrics (scheduler.metrics) and its readiness (scheduler.health).

Hot-path rule: with tracing off nothing here touches a span or builds an attribute, and the
per-step work is O(new + preempted + mid-prefill sequences), never a loop over every running
one (tokens per step are the workers' metric): ~5 us a step at 256 running. Intervals come
from this process's monotonic clock, except the time a request waited in the Redis stream,
which the loop measures on Redis's own clock (entry id vs TIME at admission) and hands over
as ``EngineRequest.queue_wait_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from common import telemetry
from common.step import StepOutput, StepPlan
from scheduler.health import Readiness
from scheduler.metrics import SchedulerMetrics
from scheduler.request import Request

if TYPE_CHECKING:
    from scheduler.engine_core import EngineRequest
    from scheduler.scheduler import Scheduler


@dataclass(slots=True, eq=False)
class _Req:
    """Telemetry state of one request: ``EngineRequest.telemetry``."""
    request: EngineRequest
    span: Span | None = None
    queue_span: Span | None = None
    open: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    seqs: list[_Seq] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Seq:
    """Telemetry state of one sequence: the scheduler Request's ``telemetry``."""
    index: int
    owner: _Req
    request: Request                    # the scheduler's: token counts, hits, preemptions
    t_added: float
    t_scheduled: float | None = None
    t_first_token: float | None = None
    preempted: bool = False
    finished: bool = False
    span: Span | None = None            # prefill, then decode
    traceparent: str | None = None      # of ``span``: the workers' parent / link


def _sampled_traceparent(span: Span) -> str | None:
    """Only a recorded (sampled) sequence makes the workers trace a step."""
    return telemetry.traceparent_of(span) if span.is_recording() else None


class NullObserver:
    """The core and loop without telemetry (the offline engine, tests): hooks do nothing."""

    def attach(self, scheduler: Scheduler) -> None:
        """The core's scheduler: plans name sequences by id, its ``requests`` finds them."""

    def request_added(self, request: EngineRequest) -> None:
        """A request entered the core (its ``queue_wait_s`` and ``traceparent`` are set)."""

    def sequence_added(self, request: EngineRequest, seq: Request) -> None:
        """Sequence ``seq.seed_offset`` of a request was added to the scheduler."""

    def step_started(self, plan: StepPlan) -> float:
        """A non-empty plan goes to the workers; returns the token ``step_finished`` takes."""
        return 0.0

    def step_finished(self, plan: StepPlan, output: StepOutput, started: float) -> None:
        """The workers answered and ``core.update`` ran (before the events go out)."""

    def sequence_finished(self, request: EngineRequest, seq: Request, reason: str) -> None:
        """A sequence finished (stop, length), in ``core.update`` (before ``step_finished``)."""

    def request_ended(self, request: EngineRequest, reason: str) -> None:
        """A request was aborted or failed as a whole."""

    def request_recovered(self, request: EngineRequest, reason: str, tokens: int) -> None:
        """A request survived a fault (``reason``: worker or scheduler) and recomputes
        ``tokens`` (prompt + tokens emitted before it)."""

    def canary(self) -> Request | None:
        """Idle: a one-token request to run now, if readiness needs one."""
        return None


class EngineObserver(NullObserver):
    def __init__(self, metrics: SchedulerMetrics, readiness: Readiness, tracer=None) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.tracing = tracer is not None or telemetry.tracing_enabled()
        self.tracer = tracer or telemetry.get_tracer("tessera.scheduler")
        self._seqs: dict[str, Request] = {}      # the scheduler's sequences, by id
        self._prefilling: dict[str, _Seq] = {}   # scheduled, no token yet

    def attach(self, scheduler: Scheduler) -> None:
        self._seqs = scheduler.requests

    # ---- requests -----------------------------------------------------------------------
    def request_added(self, request: EngineRequest) -> None:
        req = request.telemetry = _Req(request)
        if self.tracing:
            self._start_request_span(req)

    def sequence_added(self, request: EngineRequest, seq: Request) -> None:
        req = request.telemetry
        if req is None:
            return
        st = seq.telemetry = _Seq(seq.seed_offset, req, seq, time.monotonic())
        req.seqs.append(st)
        req.open += 1

    def _start_request_span(self, req: _Req) -> None:
        q = req.request
        start = time.time_ns() - int(q.queue_wait_s * 1e9)
        attrs = telemetry.genai_request_attributes(q.model, q.params)
        attrs.update({"gen_ai.response.id": q.request_id, "tessera.request.priority": q.priority})
        req.span = self.tracer.start_span(
            "engine request", context=telemetry.context_from_traceparent(q.traceparent),
            kind=SpanKind.CONSUMER, attributes=attrs, start_time=start)
        req.queue_span = self.tracer.start_span(
            "queue wait", context=set_span_in_context(req.span), start_time=start,
            attributes={"tessera.queue.redis_wait_s": q.queue_wait_s})

    def sequence_finished(self, request: EngineRequest, seq: Request, reason: str) -> None:
        st = seq.telemetry
        if st is None:
            return
        # Finished by its first token (the core calls this before ``step_finished``).
        if self._prefilling.pop(seq.request_id, None) is not None:
            self._first_token(st, time.monotonic())
        self._sequence_finished(st, reason)

    def _sequence_finished(self, seq: _Seq, reason: str) -> None:
        if seq.finished:
            return
        seq.finished = True
        r = seq.request
        self._prefilling.pop(r.request_id, None)
        now, req = time.monotonic(), seq.owner
        sched, first = seq.t_scheduled, seq.t_first_token
        queue_s = None if sched is None else self._queue_s(seq)
        generated = len(r.output_token_ids)
        self.metrics.sequence_finished(
            queue_s,
            None if first is None else first - sched,    # prefill
            None if first is None else now - first,      # decode
            None if sched is None else now - sched,      # inference
            r.num_prompt_tokens, generated)
        req.output_tokens += generated
        req.preemptions += r.num_preemptions
        req.finish_reasons.append(reason)
        if seq.span is not None:
            seq.span.set_attribute("tessera.sequence.output_tokens", generated)
            seq.span.end()
        req.open -= 1
        if req.open == 0:
            self._end_request(req)

    def request_recovered(self, request: EngineRequest, reason: str, tokens: int) -> None:
        self.metrics.requests_recovered.labels(self.metrics.model_name, reason).inc()
        self.metrics.tokens_recomputed.inc(tokens)
        req = request.telemetry
        if req is not None and req.span is not None:
            req.span.add_event("recovered", {"tessera.recovery.reason": reason,
                                             "tessera.recovery.tokens_recomputed": tokens,
                                             "tessera.recovery.next_index": request.next_index})

    def request_ended(self, request: EngineRequest, reason: str) -> None:
        """Aborted or failed as a whole: its open sequences end with ``reason``."""
        req = request.telemetry
        if req is None:
            return
        open_before = req.open
        for seq in req.seqs:
            self._sequence_finished(seq, reason)   # a no-op for those already finished
        if open_before == 0:   # no sequence was open
            self._end_request(req)

    def _queue_s(self, seq: _Seq) -> float:
        # Siblings (n > 1) join after sequence 0's first token: only their local wait counts.
        waited = seq.owner.request.queue_wait_s if seq.index == 0 else 0.0
        return waited + (seq.t_scheduled - seq.t_added)

    def _end_request(self, req: _Req) -> None:
        if req.request.telemetry is None:
            return   # ended already
        req.request.telemetry = None
        span = req.span
        if span is None:
            return
        if req.queue_span is not None and req.queue_span.is_recording():
            req.queue_span.end()
        attrs = telemetry.genai_usage_attributes(len(req.request.prompt_token_ids),
                                                 req.output_tokens, req.finish_reasons)
        s0 = req.seqs[0] if req.seqs else None
        attrs["tessera.request.preemptions"] = req.preemptions
        if s0 is not None:
            attrs["tessera.request.prefix_cache_hit_tokens"] = s0.request.num_cached_tokens
            if s0.t_scheduled is not None:
                attrs["tessera.request.time_in_queue_s"] = self._queue_s(s0)
            if s0.t_first_token is not None:
                attrs["tessera.request.time_to_first_token_s"] = \
                    req.request.queue_wait_s + (s0.t_first_token - s0.t_added)
        span.set_attributes(attrs)
        span.add_event("finish", {"gen_ai.response.finish_reasons": req.finish_reasons})
        if "error" in req.finish_reasons:
            span.set_status(Status(StatusCode.ERROR, "the request failed"))
        span.end()

    # ---- steps --------------------------------------------------------------------------
    def step_started(self, plan: StepPlan) -> float:
        now = time.monotonic()
        seqs = self._seqs
        for new in plan.new:
            r = seqs.get(new.seq_id)
            seq = r.telemetry if r is not None else None
            if seq is None:
                continue   # the canary
            if seq.t_scheduled is None:
                seq.t_scheduled = now
                self._prefilling[new.seq_id] = seq
                if self.tracing:
                    self._start_prefill(seq)
            elif seq.preempted:
                seq.preempted = False
                if seq.span is not None:
                    seq.span.add_event("resumed", {"tessera.num_computed_tokens":
                                                   new.num_computed_tokens})
        for seq_id in plan.preempted_ids:
            r = seqs.get(seq_id)
            seq = r.telemetry if r is not None else None
            if seq is not None:
                seq.preempted = True
                if seq.span is not None:
                    seq.span.add_event("preempted", {"tessera.num_computed_tokens":
                                                     seq.request.num_computed_tokens})
        if self.tracing:
            self._trace_step(plan)
        return now

    def _start_prefill(self, seq: _Seq) -> None:
        req = seq.owner
        if req.queue_span is not None and req.queue_span.is_recording():
            req.queue_span.end()
        if req.span is None:
            return
        seq.span = self.tracer.start_span("prefill", context=set_span_in_context(req.span),
                                          attributes={
            "tessera.sequence.index": seq.index,
            "tessera.sequence.prompt_tokens": seq.request.num_prompt_tokens,
            "tessera.prefix_cache.hit_tokens": seq.request.num_cached_tokens})
        seq.traceparent = _sampled_traceparent(seq.span)

    def _trace_step(self, plan: StepPlan) -> None:
        """A "prefill chunk" event per prefilling sequence of the plan, and the contexts the
        workers' step span joins (the first) and links to (all, up to MAX_STEP_LINKS).

        NOTE: everything comes from the plan itself, never from state a later step changes,
        so several steps may be in flight between ``step_started`` and ``step_finished``."""
        contexts, seqs, prefilling = [], self._seqs, self._prefilling
        limit = telemetry.MAX_STEP_LINKS
        for group in (plan.running, plan.new):
            for s in group:
                r = seqs.get(s.seq_id)
                seq = r.telemetry if r is not None else None
                if seq is None:
                    continue
                if s.seq_id in prefilling and seq.span is not None:
                    seq.span.add_event("prefill chunk", {
                        "tessera.chunk.start": s.num_computed_tokens,
                        "tessera.chunk.tokens": s.num_scheduled_tokens})
                if seq.traceparent is not None and len(contexts) < limit:
                    contexts.append(seq.traceparent)
        plan.trace_context = tuple(contexts)

    def step_finished(self, plan: StepPlan, output: StepOutput, started: float) -> None:
        now = time.monotonic()
        self.readiness.mark_forward()
        sampled = output.sampled
        if self.readiness.canary_id in sampled:
            return   # the idle canary: a forward pass, not engine work
        metrics = self.metrics
        metrics.step_time.observe(now - started)
        metrics.generation_tokens.inc(len(sampled) + sum(map(len, output.extra_sampled.values())))
        if not self._prefilling:
            return
        for seq_id in [s for s in self._prefilling if s in sampled]:
            self._first_token(self._prefilling.pop(seq_id), now)

    def _first_token(self, seq: _Seq, now: float) -> None:
        seq.t_first_token = now
        self.metrics.prompt_tokens.inc(seq.request.num_prompt_tokens)
        if seq.span is not None:
            seq.span.end()
            seq.span = self.tracer.start_span(
                "decode", context=set_span_in_context(seq.owner.span),
                attributes={"tessera.sequence.index": seq.index})
            seq.traceparent = _sampled_traceparent(seq.span)

    def canary(self) -> Request | None:
        return self.readiness.canary()
