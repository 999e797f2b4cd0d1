"""OpenTelemetry tracing for every service: setup from the standard OTEL_* variables, and the
W3C trace context that ties a request's spans together across processes.

One trace per request (DESIGN.md §7): the gateway continues the client's ``traceparent`` (HTTP
header or gRPC metadata) or starts a trace; the context travels inside the QueuedRequest
through Redis, so the scheduler's spans join it; the scheduler sends the context of the
sequences of each step to its workers in the Execute call's gRPC metadata, so the workers'
step spans join too.

Configuration is the OpenTelemetry SDK's own environment, nothing else:
- export is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp`` or ``console``), or,
  when that variable is unset, when ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
  ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set; ``OTEL_SDK_DISABLED=true`` turns it off;
- ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` picks OTLP over ``grpc`` (default) or
  ``http/protobuf``; endpoint, headers, timeouts, the sampler (``OTEL_TRACES_SAMPLER``) and the
  batch processor (``OTEL_BSP_*``) are read by the SDK itself;
- ``OTEL_SERVICE_NAME`` overrides the service name (default ``tessera-<service>``).

NOTE: with no exporter the global tracer provider stays OpenTelemetry's no-op one and the SDK
is not even imported: spans are non-recording singletons, and the hot paths test
``tracing_enabled()`` once so that they build no attributes at all.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags

from common.redis_schema import text

from common.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

TRACEPARENT = "traceparent"
STEP_LINKS = "tessera-step-links"   # gRPC metadata: traceparents of a step's other sequences
# Links per worker step span (the first is also its parent). Each costs the worker a few us a
# step (benchmarks/serving_overhead.py --tracing-cost), and it bounds the metadata (gRPC's
# default limit is 8 KiB; a traceparent is 55 bytes).
MAX_STEP_LINKS = 32

_enabled = False
_provider: Any = None


# ---- setup -----------------------------------------------------------------------------------
def _exporter_names(env: Mapping[str, str]) -> list[str]:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = env.get("OTEL_TRACES_EXPORTER")
    if named is not None:
        return [n.strip().lower() for n in named.split(",") if n.strip().lower() not in ("", "none")]
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return ["otlp"]
    return []


def exporter_configured(env: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* environment asks for spans to be exported."""
    return bool(_exporter_names(os.environ if env is None else env))


def _exporter(name: str, env: Mapping[str, str]):
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter
        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER: unsupported exporter {name!r} (otlp, console, none)")
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL: unsupported protocol {protocol!r} "
                     "(grpc, http/protobuf)")


def setup_tracing(service: str, env: Mapping[str, str] | None = None) -> bool:
    """Install the SDK tracer provider for this process if OTEL_* configures an exporter.

    Returns whether tracing is on. Call once, at process start, before any tracer is used.
    """
    global _enabled, _provider
    env = os.environ if env is None else env
    names = _exporter_names(env)
    if not names:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or f"tessera-{service}",
                                "service.namespace": "tessera", "tessera.service": service})
    provider = TracerProvider(resource=resource)
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name, env)))
    trace.set_tracer_provider(provider)
    _provider, _enabled = provider, True
    _flush_on_sigterm(provider)
    logger.info("tracing on: exporting spans with %s", ", ".join(names))
    return True


def _flush_on_sigterm(provider) -> None:
    """A process that dies of SIGTERM (the worker, the scheduler) runs no atexit handler: flush
    the spans still batched first, then die of the signal as before. A process that handles
    SIGTERM itself (the gateway) exits normally, and the SDK flushes at exit."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return

    def flush_then_die(signum: int, frame: object) -> None:
        provider.force_flush(timeout_millis=3000)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, flush_then_die)


def shutdown_tracing() -> None:
    """Flush and stop the exporters (also done at interpreter exit by the SDK)."""
    if _provider is not None:
        _provider.shutdown()


def tracing_enabled() -> bool:
    return _enabled


def get_tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


# ---- W3C trace context -----------------------------------------------------------------------
def format_traceparent(ctx: SpanContext) -> str | None:
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def traceparent_of(span: Span) -> str | None:
    """The ``traceparent`` that makes a span the parent of the receiver's spans."""
    return format_traceparent(span.get_span_context())


def parse_traceparent(value: str | None) -> SpanContext | None:
    """A remote SpanContext from a ``traceparent`` value; None if absent or malformed."""
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff" or len(parts[1]) != 32 \
            or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags & 1))
    return ctx if ctx.is_valid else None


def context_from_traceparent(value: str | None) -> Context | None:
    """The parent context for a span continuing ``value`` (None: start a new trace)."""
    ctx = parse_traceparent(value)
    return None if ctx is None else trace.set_span_in_context(NonRecordingSpan(ctx))


def context_from_carrier(carrier: Mapping[str, str] | Iterable[tuple[str, str]]) -> Context | None:
    """The parent context from HTTP headers or gRPC metadata (keys compared lowercased)."""
    items = carrier.items() if isinstance(carrier, Mapping) else carrier
    for key, value in items:
        if key.lower() == TRACEPARENT:
            return context_from_traceparent(text(value))
    return None


def step_metadata(traceparents: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """gRPC metadata for a worker step: the first context is the step span's parent, every one
    (at most MAX_STEP_LINKS) is a link."""
    if not traceparents:
        return ()
    return ((TRACEPARENT, traceparents[0]),
            (STEP_LINKS, ",".join(traceparents[1:MAX_STEP_LINKS])))


def step_traceparents(metadata: Iterable[tuple[str, Any]]) -> list[str]:
    """The traceparents of a step from ``step_metadata``: the parent's first, at most
    MAX_STEP_LINKS."""
    first, rest = None, ""
    for key, value in metadata:
        if key == TRACEPARENT:
            first = value
        elif key == STEP_LINKS:
            rest = value
    if first is None:
        return []
    return [first, *(v for v in rest.split(",") if v)][:MAX_STEP_LINKS]


def step_contexts(metadata: Iterable[tuple[str, Any]]) -> list[SpanContext]:
    """The span contexts of a step from ``step_metadata``: parent first, then the others."""
    return [c for c in map(parse_traceparent, step_traceparents(metadata)) if c is not None]


# ---- GenAI semantic conventions --------------------------------------------------------------
def genai_request_attributes(model: str, params: SamplingParams) -> dict[str, Any]:
    """OpenTelemetry GenAI ``gen_ai.request.*`` attributes of a request."""
    attrs: dict[str, Any] = {
        "gen_ai.provider.name": "tessera", "gen_ai.request.model": model,
        "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": float(params.temperature),
        "gen_ai.request.top_p": float(params.top_p),
        "gen_ai.request.choice.count": params.n,
    }
    if params.top_k > 0:
        attrs["gen_ai.request.top_k"] = params.top_k
    if params.seed is not None:
        attrs["gen_ai.request.seed"] = params.seed
    if params.presence_penalty:
        attrs["gen_ai.request.presence_penalty"] = float(params.presence_penalty)
    if params.frequency_penalty:
        attrs["gen_ai.request.frequency_penalty"] = float(params.frequency_penalty)
    return attrs


def genai_usage_attributes(input_tokens: int, output_tokens: int,
                           finish_reasons: Sequence[str]) -> dict[str, Any]:
    return {"gen_ai.usage.input_tokens": input_tokens, "gen_ai.usage.output_tokens": output_tokens,
            "gen_ai.response.finish_reasons": list(finish_reasons)}
