"""What the engine loop reports, and how: per-request spans, Prometheus metrics, readiness.

The loop calls a handful of hooks (``sequence_added``, ``step_started``, ``step_finished``,
``sequence_finished``, ``request_ended``, ``canary``); this module turns them into

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
which is measured on Redis's own clock (entry id vs TIME at admission).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from common import redis_schema as schema
from common import telemetry
from common.redis_schema import QueuedRequest
from common.step import StepOutput, StepPlan
from scheduler.health import Readiness
from scheduler.metrics import SchedulerMetrics
from scheduler.queue import RequestQueue
from scheduler.request import Request


@dataclass(slots=True, eq=False)
class _Req:
    queued: QueuedRequest
    queue_s: float                      # waited in the Redis stream (Redis's clock)
    span: Span | None = None
    queue_span: Span | None = None
    open: int = 0
    output_tokens: int = 0
    preemptions: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    seqs: list[_Seq] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class _Seq:
    seq_id: str
    index: int
    owner: _Req
    request: Request                    # the scheduler's: token counts, hits, preemptions
    t_added: float
    t_scheduled: float | None = None
    t_first_token: float | None = None
    preempted: bool = False
    span: Span | None = None            # prefill, then decode
    traceparent: str | None = None      # of ``span``: the workers' parent / link


def _sampled_traceparent(span: Span) -> str | None:
    """Only a recorded (sampled) sequence makes the workers trace a step."""
    return telemetry.traceparent_of(span) if span.is_recording() else None


class NullObserver:
    """The loop without telemetry (tests, tools): every hook does nothing."""

    def sequence_added(self, entry_id: str, queued: QueuedRequest, k: int,
                       request: Request) -> None:
        """Sequence k of a request read from the stream (entry ``entry_id``) was added."""

    def step_started(self, plan: StepPlan) -> float:
        """A non-empty plan goes to the workers; returns the token ``step_finished`` takes."""
        return 0.0

    def step_finished(self, plan: StepPlan, output: StepOutput, started: float) -> None:
        """The workers answered and ``scheduler.update`` ran (before the events go out)."""

    def sequence_finished(self, seq_id: str, reason: str) -> None:
        """A sequence's final event (stop, length) is being published."""

    def request_ended(self, request_id: str, reason: str) -> None:
        """A request was aborted or failed as a whole."""

    def canary(self) -> Request | None:
        """Idle: a one-token request to run now, if readiness needs one."""
        return None


class EngineObserver(NullObserver):
    def __init__(self, metrics: SchedulerMetrics, readiness: Readiness,
                 queue: RequestQueue | None = None, tracer=None) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.queue = queue
        self.tracing = tracer is not None or telemetry.tracing_enabled()
        self.tracer = tracer or telemetry.get_tracer("tessera.scheduler")
        self._reqs: dict[str, _Req] = {}
        self._seqs: dict[str, _Seq] = {}
        self._prefilling: dict[str, _Seq] = {}   # scheduled, no token yet

    # ---- requests -----------------------------------------------------------------------
    def sequence_added(self, entry_id: str, queued: QueuedRequest, k: int,
                       request: Request) -> None:
        rid = queued.request_id
        req = self._reqs.get(rid)
        if req is None:
            admitted = self.queue.admitted_at if self.queue is not None else None
            waited = max(admitted - schema.entry_time(entry_id), 0.0) if admitted else 0.0
            req = self._reqs[rid] = _Req(queued, waited)
            if self.tracing:
                self._start_request_span(req)
        seq = _Seq(request.request_id, k, req, request, time.monotonic())
        req.seqs.append(seq)
        req.open += 1
        self._seqs[seq.seq_id] = seq

    def _start_request_span(self, req: _Req) -> None:
        q = req.queued
        start = time.time_ns() - int(req.queue_s * 1e9)
        attrs = telemetry.genai_request_attributes(q.model, q.params)
        attrs.update({"gen_ai.response.id": q.request_id, "tessera.request.priority": q.priority})
        req.span = self.tracer.start_span(
            "engine request", context=telemetry.context_from_traceparent(q.traceparent),
            kind=SpanKind.CONSUMER, attributes=attrs, start_time=start)
        req.queue_span = self.tracer.start_span(
            "queue wait", context=set_span_in_context(req.span), start_time=start,
            attributes={"tessera.queue.redis_wait_s": req.queue_s})

    def sequence_finished(self, seq_id: str, reason: str) -> None:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return
        self._prefilling.pop(seq_id, None)
        now, req, r = time.monotonic(), seq.owner, seq.request
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

    def request_ended(self, request_id: str, reason: str) -> None:
        """Aborted or failed as a whole: its open sequences end with ``reason``."""
        req = self._reqs.get(request_id)
        if req is None:
            return
        for seq in req.seqs:
            self.sequence_finished(seq.seq_id, reason)   # a no-op for those already finished
        if request_id in self._reqs:   # no sequence was open
            self._end_request(req)

    def _queue_s(self, seq: _Seq) -> float:
        # Siblings (n > 1) join after sequence 0's first token: only their local wait counts.
        waited = seq.owner.queue_s if seq.index == 0 else 0.0
        return waited + (seq.t_scheduled - seq.t_added)

    def _end_request(self, req: _Req) -> None:
        del self._reqs[req.queued.request_id]
        span = req.span
        if span is None:
            return
        if req.queue_span is not None and req.queue_span.is_recording():
            req.queue_span.end()
        attrs = telemetry.genai_usage_attributes(len(req.queued.prompt_token_ids),
                                                 req.output_tokens, req.finish_reasons)
        s0 = req.seqs[0] if req.seqs else None
        attrs["tessera.request.preemptions"] = req.preemptions
        if s0 is not None:
            attrs["tessera.request.prefix_cache_hit_tokens"] = s0.request.num_cached_tokens
            if s0.t_scheduled is not None:
                attrs["tessera.request.time_in_queue_s"] = self._queue_s(s0)
            if s0.t_first_token is not None:
                attrs["tessera.request.time_to_first_token_s"] = \
                    req.queue_s + (s0.t_first_token - s0.t_added)
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
            seq = seqs.get(new.seq_id)
            if seq is None:
                continue   # the canary
            if seq.t_scheduled is None:
                seq.t_scheduled = now
                self._prefilling[seq.seq_id] = seq
                if self.tracing:
                    self._start_prefill(seq)
            elif seq.preempted:
                seq.preempted = False
                if seq.span is not None:
                    seq.span.add_event("resumed", {"tessera.num_computed_tokens":
                                                   new.num_computed_tokens})
        for seq_id in plan.preempted_ids:
            seq = seqs.get(seq_id)
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
                seq = seqs.get(s.seq_id)
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
        metrics.generation_tokens.inc(len(sampled))
        if not self._prefilling:
            return
        for seq_id in [s for s in self._prefilling if s in sampled]:
            seq = self._prefilling.pop(seq_id)
            seq.t_first_token = now
            metrics.prompt_tokens.inc(seq.request.num_prompt_tokens)
            if seq.span is not None:
                seq.span.end()
                seq.span = self.tracer.start_span(
                    "decode", context=set_span_in_context(seq.owner.span),
                    attributes={"tessera.sequence.index": seq.index})
                seq.traceparent = _sampled_traceparent(seq.span)

    def canary(self) -> Request | None:
        return self.readiness.canary()
