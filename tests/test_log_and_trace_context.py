"""Log lines (text and JSON, with request and trace ids) and the W3C trace context helpers."""

from __future__ import annotations

import io
import json
import logging

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan

from common import logging_setup, telemetry

TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{SPAN}-01"


@pytest.fixture
def log_to_buffer(monkeypatch):
    """configure() into a buffer; the root logger and the prompt switch are restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setattr(logging_setup, "_log_prompts", False)   # restored at teardown
    buffer = io.StringIO()

    def configure(fmt: str, log_prompts: bool = False) -> io.StringIO:
        logging_setup.configure(fmt, log_prompts, service="test", stream=buffer)
        return buffer

    yield configure
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_json_lines_carry_request_and_trace_ids(log_to_buffer):
    buffer = log_to_buffer("json")
    log = logging.getLogger("tessera.test")
    log.info("plain %d", 1)
    log.warning("with ids", extra={"request_id": "r1", "trace_id": TRACE})
    token = logging_setup.request_id_var.set("r2")
    span = NonRecordingSpan(telemetry.parse_traceparent(TRACEPARENT))
    with trace.use_span(span):
        log.error("from the context")
    logging_setup.request_id_var.reset(token)
    lines = [json.loads(line) for line in buffer.getvalue().splitlines()]
    assert lines[0]["message"] == "plain 1" and lines[0]["service"] == "test"
    assert "request_id" not in lines[0] and "trace_id" not in lines[0]
    assert (lines[1]["request_id"], lines[1]["trace_id"], lines[1]["level"]) == ("r1", TRACE, "WARNING")
    assert (lines[2]["request_id"], lines[2]["trace_id"], lines[2]["span_id"]) == ("r2", TRACE, SPAN)
    assert not logging_setup.prompts_allowed()


def test_text_lines_append_ids_and_log_prompts_is_opt_in(log_to_buffer):
    buffer = log_to_buffer("text", log_prompts=True)
    logging.getLogger("tessera.test").info("done", extra={"request_id": "r9"})
    assert buffer.getvalue().rstrip().endswith("tessera.test: done [request_id=r9]")
    assert logging_setup.prompts_allowed()
    assert "--log-prompts" in buffer.getvalue()   # said loudly at start-up


def test_traceparent_round_trip_and_garbage():
    ctx = telemetry.parse_traceparent(TRACEPARENT)
    assert ctx.is_remote and f"{ctx.trace_id:032x}" == TRACE and ctx.trace_flags.sampled
    assert telemetry.format_traceparent(ctx) == TRACEPARENT
    for bad in (None, "", "00-xyz", f"ff-{TRACE}-{SPAN}-01", f"00-{'0' * 32}-{SPAN}-01",
                f"00-{TRACE}-{'g' * 16}-01"):
        assert telemetry.parse_traceparent(bad) is None
    parent = telemetry.context_from_carrier([("Content-Type", "x"), ("TraceParent", TRACEPARENT)])
    assert trace.get_current_span(parent).get_span_context().trace_id == ctx.trace_id
    assert telemetry.context_from_carrier({"x": "y"}) is None


def test_step_metadata_names_a_parent_and_bounded_links():
    parents = [f"00-{TRACE}-{i:016x}-01" for i in range(1, 100)]
    metadata = telemetry.step_metadata(parents)
    contexts = telemetry.step_contexts(metadata)
    assert contexts[0].span_id == 1 and len(contexts) == telemetry.MAX_STEP_LINKS
    assert sum(len(v) for _, v in metadata) < 8192 - 512   # gRPC's default metadata limit
    assert telemetry.step_metadata(()) == () and telemetry.step_contexts(()) == []


@pytest.mark.parametrize("env,on", [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, False),
])
def test_only_the_otel_environment_turns_export_on(env, on):
    assert telemetry.exporter_configured(env) is on


def test_sigterm_flushes_batched_spans_then_kills(tmp_path):
    """A worker or scheduler dies of SIGTERM (no atexit): its batched spans must still leave."""
    import os
    import signal
    import subprocess
    import sys

    from otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver().start()
    script = ("from common import telemetry\n"
              "assert telemetry.setup_tracing('probe')\n"
              "telemetry.get_tracer('t').start_span('batched').end()\n"
              "print('ready', flush=True)\n"
              "import time; time.sleep(60)\n")
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_BSP_SCHEDULE_DELAY": "60000"}   # only a flush can send it in time
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert receiver.spans() == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == -signal.SIGTERM   # still dies of the signal
        spans = receiver.wait_for(lambda s: len(s) == 1, timeout=5)
        assert [(s.service, s.name) for s in spans] == [("tessera-probe", "batched")]
    finally:
        if proc.poll() is None:
            proc.kill()
        receiver.stop()
