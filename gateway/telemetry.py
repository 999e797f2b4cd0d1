"""The gateway's observability: a span per client call, the client-side latency metrics, and
one log line per request.

A client call (an HTTP request to /v1/completions or /v1/chat/completions, or a gRPC Generate
call) continues the client's W3C ``traceparent`` or starts a trace; its span is the parent of
everything the request causes, and its context is what the QueuedRequest carries through Redis
to the scheduler. Each Generation (one queued request) gets a ``relay`` child span and a
``Relay`` that measures, on this process's monotonic clock from the call's arrival, what the
client sees: time to first token, inter-token latency, end-to-end latency, finished reasons.

The current call travels in a context variable, so gateway.state finds it without every
function between the face and ``GatewayState.start`` passing it along.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context
from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common import metrics as m
from common import telemetry
from common.logging_setup import request_id_var
from common.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HTTP_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}
_current: ContextVar[Call | None] = ContextVar("tessera_gateway_call", default=None)


def current_call() -> Call | None:
    return _current.get()


class GatewayMetrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = r = m.new_registry()
        labels = m.LABELS
        self.ttft = Histogram(m.name("time_to_first_token_seconds"), "Histogram of time to first "
                              "token in seconds (arrival at the gateway to the first token relayed).",
                              labels, buckets=m.TTFT_BUCKETS, registry=r).labels(model_name)
        self.itl = Histogram(m.name("inter_token_latency_seconds"), "Histogram of inter-token "
                             "latency in seconds (between tokens relayed to the client).",
                             labels, buckets=m.ITL_BUCKETS, registry=r).labels(model_name)
        self.e2e = Histogram(m.name("e2e_request_latency_seconds"), "Histogram of e2e request "
                             "latency in seconds (arrival at the gateway to the last event).",
                             labels, buckets=m.REQUEST_LATENCY_BUCKETS, registry=r).labels(model_name)
        self.stream_resumes = Counter(m.name("stream_resumes"), "Relays resumed after an event "
                                      "a client had seen (GET /v1/streams, a gRPC resume "
                                      "cursor), on this replica.", labels,
                                      registry=r).labels(model_name)
        self._success = Counter(m.name("request_success"), "Count of finished requests (one per "
                                "choice), by finished reason.", [*labels, "finished_reason"],
                                registry=r)

    def finished(self, reason: str) -> None:
        self._success.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return m.render(self.registry)


class Call:
    """One client call: its span (maybe non-recording), arrival time, and what it produced."""

    def __init__(self, tel: GatewayTelemetry, operation: str, parent: Any) -> None:
        self.tel = tel
        self.t0 = time.monotonic()
        self.operation = operation
        self.span: Span = tel.tracer.start_span(f"{operation} {tel.model_name}", context=parent,
                                                kind=SpanKind.SERVER)
        self.recording = self.span.is_recording()
        self.request_ids: list[str] = []
        self.input_tokens = self.output_tokens = 0
        self.finish_reasons: list[str] = []
        self.status: int | None = None   # HTTP status, once the response starts
        self.tenant = ""

    @property
    def traceparent(self) -> str | None:
        return telemetry.traceparent_of(self.span)

    def started(self, request_id: str, params: SamplingParams, num_prompt_tokens: int,
                tenant: str = "") -> None:
        """A request of this call was enqueued (a batch of prompts enqueues several)."""
        self.tenant = tenant   # its name goes into the log line; never its key
        if not self.request_ids:
            request_id_var.set(request_id)
            if self.recording:
                self.span.set_attributes(telemetry.genai_request_attributes(
                    self.tel.model_name, params) | {"gen_ai.operation.name": self.operation})
        self.request_ids.append(request_id)
        self.input_tokens += num_prompt_tokens

    def end(self, error: BaseException | None = None) -> None:
        span, status = self.span, self.status
        if self.recording:
            span.update_name(f"{self.operation} {self.tel.model_name}")
            attrs = telemetry.genai_usage_attributes(self.input_tokens, self.output_tokens,
                                                     self.finish_reasons)
            if self.request_ids:
                attrs["gen_ai.response.id"] = self.request_ids[0]
                attrs["gen_ai.response.model"] = self.tel.model_name
            if status is not None:
                attrs["http.response.status_code"] = status
            span.set_attributes(attrs)
            if error is not None:
                span.record_exception(error)
            if error is not None or (status is not None and status >= 500):
                span.set_status(Status(StatusCode.ERROR))
        span.end()


class Relay:
    """One Generation's relay as the client sees it: TTFT, ITL, e2e, finished reasons."""

    def __init__(self, tel: GatewayTelemetry, call: Call | None, request_id: str,
                 resumed: bool) -> None:
        self.tel, self.call, self.request_id = tel, call, request_id
        self.measured = call is not None and not resumed   # a resume has no arrival time
        self.first: float | None = None
        self._last: dict[int, float] = {}
        self.events = 0
        self.ended = False
        parent = set_span_in_context(call.span) if call is not None else None
        self.span = tel.tracer.start_span("relay", context=parent) if tel.tracing else None

    def tokens(self, seq_index: int) -> None:
        """An event carrying tokens of sequence ``seq_index`` reached the relay."""
        now = time.monotonic()
        self.events += 1
        if self.measured:
            if self.first is None:
                self.first = now
                self.tel.metrics.ttft.observe(now - self.call.t0)
            last = self._last.get(seq_index)
            if last is not None:
                self.tel.metrics.itl.observe(now - last)
        self._last[seq_index] = now

    def end(self, reasons: Sequence[str], prompt_tokens: int, output_tokens: int,
            error: str | None = None, text: tuple[str, str] | None = None) -> None:
        if self.ended:
            return
        self.ended = True
        now = time.monotonic()
        call = self.call
        ttft = None if self.first is None or call is None else self.first - call.t0
        if self.measured:
            self.tel.metrics.e2e.observe(now - call.t0)
            for reason in reasons:
                self.tel.metrics.finished(reason)
        if call is not None:
            call.output_tokens += output_tokens
            call.finish_reasons.extend(reasons)
        trace_id = None
        if call is not None and call.span.get_span_context().is_valid:
            trace_id = f"{call.span.get_span_context().trace_id:032x}"
        if self.span is not None:
            self.span.set_attributes({"gen_ai.response.id": self.request_id,
                                      "tessera.relay.events": self.events})
            if ttft is not None:
                self.span.set_attribute("tessera.time_to_first_token_s", ttft)
            if error is not None:
                self.span.set_status(Status(StatusCode.ERROR, error))
            self.span.end()
        extra = f" prompt={text[0]!r} output={text[1]!r}" if text is not None else ""
        tenant = call.tenant if call is not None else ""
        extra = (f" tenant={tenant}" if tenant else "") + extra
        logger.info("request %s finished %s: %d prompt + %d output tokens, ttft %s, e2e %s%s",
                    self.request_id, ",".join(reasons) or "-", prompt_tokens, output_tokens,
                    "-" if ttft is None else f"{ttft:.3f} s",
                    "-" if call is None or not self.measured else f"{now - call.t0:.3f} s",
                    extra, extra={"request_id": self.request_id, "trace_id": trace_id})


class GatewayTelemetry:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.metrics = GatewayMetrics(model_name)
        self.tracing = telemetry.tracing_enabled()
        self.tracer = telemetry.get_tracer("tessera.gateway")

    @contextmanager
    def call(self, operation: str, carrier: Any) -> Iterator[Call]:
        """The current call while the block runs: its span is the current span (for logs)."""
        call = Call(self, operation, telemetry.context_from_carrier(carrier))
        token = _current.set(call)
        otel_token = otel_context.attach(set_span_in_context(call.span))
        rid_token = request_id_var.set(None)
        error: BaseException | None = None
        try:
            yield call
        except BaseException as e:
            error = e
            raise
        finally:
            request_id_var.reset(rid_token)
            otel_context.detach(otel_token)
            _current.reset(token)
            call.end(error)

    def relay(self, request_id: str, resumed: bool) -> Relay:
        return Relay(self, current_call(), request_id, resumed)


class CallTracing:
    """ASGI middleware: each POST to an inference path runs as a gateway Call, to the last
    byte of its (possibly streamed) response."""

    def __init__(self, app: ASGIApp, telemetry_: GatewayTelemetry) -> None:
        self.app, self.tel = app, telemetry_

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        operation = HTTP_OPERATIONS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if operation is None:
            return await self.app(scope, receive, send)
        carrier = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        with self.tel.call(operation, carrier) as call:
            async def send_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    call.status = message["status"]
                await send(message)
            await self.app(scope, receive, send_status)
