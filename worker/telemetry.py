"""The worker's observability: per-step timings (Prometheus), a span per step, readiness.

A step span (``worker step``) joins the trace of the first sequence the scheduler named in the
Execute call's metadata (a child of that sequence's prefill or decode span) and links to every
named one, up to common.telemetry.MAX_STEP_LINKS: one span per step, however many requests it
serves, and each request's trace reaches the worker process. A step that serves no sampled
request (the scheduler names none: tracing off there, sampled out, the idle canary) has no span.

Readiness of a worker: warmed up (its KV cache exists) and not inside a step for longer than
``ready_timeout_s``. An idle worker cannot prove by itself that a forward pass still works;
the scheduler's idle canary does (scheduler.health), and the scheduler's readiness is the one
that says whether the group serves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health, health_pb2
from opentelemetry.trace import Link, NonRecordingSpan, SpanKind, set_span_in_context, use_span
from prometheus_client import Counter, Gauge, Histogram

from common import metrics as m
from common import telemetry
from common.step import StepPlan


class WorkerTelemetry:
    def __init__(self, model_name: str, ready_timeout_s: float = 10.0) -> None:
        self.ready_timeout_s = ready_timeout_s
        self.warm = False
        self.num_blocks = 0
        self._in_step_since: float | None = None
        self.tracing = telemetry.tracing_enabled()
        self._link_cache: dict[str, Link] = {}
        self.tracer = telemetry.get_tracer("tessera.worker")
        self.registry = r = m.new_registry()
        labels = m.LABELS
        self.step_time = Histogram(
            m.name("worker_step_duration_seconds"), "Time of one Execute on this worker: apply "
            "the step's diff, forward pass, sampling.", labels, buckets=m.STEP_BUCKETS,
            registry=r).labels(model_name)
        self.step_tokens = Histogram(
            m.name("worker_step_tokens"), "Tokens computed per step on this worker.", labels,
            buckets=m.ITERATION_TOKENS_BUCKETS, registry=r).labels(model_name)
        self.step_sequences = Histogram(
            m.name("worker_step_sequences"), "Sequences per step on this worker.", labels,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), registry=r).labels(model_name)
        self.step_errors = Counter(
            m.name("worker_step_errors"), "Execute calls refused (out of step, bad input).",
            labels, registry=r).labels(model_name)
        Gauge(m.name("worker_kv_cache_blocks"), "KV blocks this worker holds (from Warmup).",
              labels, registry=r).labels(model_name).set_function(lambda: self.num_blocks)

    def render(self) -> bytes:
        return m.render(self.registry)

    def warmed_up(self, num_blocks: int) -> None:
        self.warm, self.num_blocks = True, num_blocks

    def status(self) -> tuple[bool, str]:
        if not self.warm:
            return False, "not warmed up (no KV cache yet)"
        since = self._in_step_since
        if since is not None and time.monotonic() - since > self.ready_timeout_s:
            return False, (f"a step has run for {time.monotonic() - since:.1f} s "
                           f"(ready timeout {self.ready_timeout_s:g} s)")
        return True, ""

    @contextmanager
    def step(self, plan: StepPlan, context: grpc.aio.ServicerContext) -> Iterator[None]:
        """Time (and, when tracing, trace) one Execute."""
        start = self._in_step_since = time.monotonic()
        span = self._start_span(plan, context) if self.tracing else None   # None: untraced
        ok = False
        try:
            if span is None:
                yield
            else:
                with use_span(span, end_on_exit=True):
                    yield
            ok = True
        finally:
            self._in_step_since = None
            if ok:
                self.step_time.observe(time.monotonic() - start)
                self.step_tokens.observe(sum(s.num_scheduled_tokens for s in plan.new)
                                         + sum(s.num_scheduled_tokens for s in plan.running))
                self.step_sequences.observe(plan.num_sequences)
            else:
                self.step_errors.inc()

    def _links(self, metadata) -> list[Link]:
        """The step's links; parsed once per traceparent (a decoding sequence sends the same one
        every step), the cache dropped when it outgrows what a few steps can name."""
        cache, links = self._link_cache, []
        for value in telemetry.step_traceparents(metadata):
            link = cache.get(value)
            if link is None:
                ctx = telemetry.parse_traceparent(value)
                if ctx is None:
                    continue
                if len(cache) >= 16 * telemetry.MAX_STEP_LINKS:
                    cache.clear()
                link = cache[value] = Link(ctx)
            links.append(link)
        return links

    def _start_span(self, plan: StepPlan, context: grpc.aio.ServicerContext):
        links = self._links(context.invocation_metadata() or ())
        if not links:
            return None
        return self.tracer.start_span(
            "worker step", context=set_span_in_context(NonRecordingSpan(links[0].context)),
            kind=SpanKind.SERVER, links=links, attributes={
                "tessera.step.id": plan.step_id, "tessera.step.sequences": plan.num_sequences,
                "tessera.step.new_sequences": len(plan.new),
                "tessera.step.finished": len(plan.finished_ids)})


class WorkerHealth(health.aio.HealthServicer):
    """grpc.health.v1 for the worker: "" is liveness (the server answers), the Worker service
    is readiness (WorkerTelemetry.status), computed when asked."""

    def __init__(self, telemetry_: WorkerTelemetry, service: str) -> None:
        super().__init__()
        self.telemetry, self.service = telemetry_, service

    async def Check(self, request, context):   # noqa: N802 - gRPC's naming
        if request.service == self.service:
            ready, _ = self.telemetry.status()
            return health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.SERVING if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING)
        return await super().Check(request, context)
