"""Bad input, systematically: schemathesis generates requests from the served /openapi.json,
hypothesis generates tessera.v1 GenerateRequest messages; every answer is 2xx or 4xx with an
error object (gRPC: never INTERNAL / UNKNOWN), and a well-formed stream running alongside is
unaffected. Real gateway (HTTP + gRPC) and redis-server; the scheduler side is the SCRIPTED
STAND-IN of tests/gateway_harness.py. Bounded: a few dozen examples per operation."""

from __future__ import annotations

import threading

import grpc
import httpx
import pytest
from gateway_harness import REPLY, stack  # noqa: F401 (fixture)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from common.proto.tessera.v1 import generate_pb2, generate_pb2_grpc

schemathesis = pytest.importorskip("schemathesis")

EXAMPLES = 40
FUZZ = settings(max_examples=EXAMPLES, deadline=None, phases=[Phase.generate],
                suppress_health_check=list(HealthCheck), derandomize=True)


class _Background:
    """A well-formed stream, again and again, while the fuzzing runs: each must give the
    scripted reply in full."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.texts: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            while not self.stop.is_set():
                r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 200})
                self.texts.append(r.json()["choices"][0]["text"] if r.status_code == 200
                                  else f"HTTP {r.status_code}")

    def __enter__(self) -> _Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def test_schemathesis_finds_no_server_error(stack) -> None:
    gateway, _, _ = stack
    schema = schemathesis.openapi.from_url(f"{gateway.base_url}/openapi.json")
    errors: list[str] = []
    seen = 0
    with _Background(gateway.base_url) as background:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path in ("/v1/streams/{request_id}", "/ready"):
                # a stream of an unknown id is a 404 at once (test_stream_resume); /ready's
                # 503 is its answer while no scheduler is ready (the stand-in has no group)
                continue

            @FUZZ
            @given(case=operation.as_strategy())
            def run(case) -> None:
                nonlocal seen
                response = case.call(base_url=gateway.base_url, timeout=30)
                seen += 1
                if response.status_code >= 500:
                    errors.append(f"{case.method} {case.path}: {response.status_code} "
                                  f"{response.text[:200]}")
                elif response.status_code >= 400:
                    assert "json" not in response.headers.get("content-type", "") or \
                        "error" in response.json() or "detail" in response.json()
            run()
    assert not errors, errors[:5]
    assert seen >= 3 * EXAMPLES
    assert background.texts and all(t == REPLY for t in background.texts), background.texts[:3]
    assert httpx.get(f"{gateway.base_url}/health", timeout=10).status_code == 200


@st.composite
def _requests(draw) -> generate_pb2.GenerateRequest:
    req = generate_pb2.GenerateRequest()
    kind = draw(st.sampled_from(["text", "token_ids", "chat", "none"]))
    if kind == "text":
        req.text = draw(st.text(max_size=64))
    elif kind == "token_ids":
        req.token_ids.ids.extend(draw(st.lists(st.integers(-2**31, 2**31 - 1), max_size=8)))
    elif kind == "chat":
        m = req.chat.messages.add()
        m.role = draw(st.sampled_from(["user", "system", "assistant", "bogus", ""]))
        m.content = draw(st.text(max_size=32))
    p = req.params
    for name, field in p.DESCRIPTOR.fields_by_name.items():
        if not draw(st.booleans()):
            continue
        if field.type in (field.TYPE_INT32, field.TYPE_SINT32, field.TYPE_UINT32):
            lo = 0 if field.type == field.TYPE_UINT32 else -2**31
            hi = 2**32 - 1 if field.type == field.TYPE_UINT32 else 2**31 - 1
            value = draw(st.integers(lo, hi))
        elif field.type in (field.TYPE_INT64, field.TYPE_SINT64):
            value = draw(st.integers(-2**63, 2**63 - 1))
        elif field.type in (field.TYPE_UINT64,):
            value = draw(st.integers(0, 2**64 - 1))
        elif field.type in (field.TYPE_FLOAT, field.TYPE_DOUBLE):
            value = draw(st.floats(allow_nan=True, allow_infinity=True, width=32
                                   if field.type == field.TYPE_FLOAT else 64))
        elif field.type == field.TYPE_BOOL:
            value = draw(st.booleans())
        elif field.type == field.TYPE_STRING:
            value = draw(st.text(max_size=16))
        else:
            continue   # messages and maps: covered by the HTTP fuzzing's logit_bias and stop
        try:
            if field.is_repeated:
                getattr(p, name).append(value)
            else:
                setattr(p, name, value)
        except (TypeError, ValueError):
            pass
    return req


def test_grpc_fuzzing_finds_no_internal_error(stack) -> None:
    gateway, _, _ = stack
    bad: list[str] = []
    with grpc.insecure_channel(gateway.grpc_address) as channel, \
            _Background(gateway.base_url) as background:
        stub = generate_pb2_grpc.GenerateStub(channel)

        @settings(max_examples=3 * EXAMPLES, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), derandomize=True)
        @given(req=_requests())
        def run(req) -> None:
            if req.params.HasField("max_tokens") and req.params.max_tokens > 8:
                req.params.max_tokens %= 8   # keep well-formed ones short
                req.params.max_tokens += 1
            try:
                stub.Generate(req, timeout=30)
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                    bad.append(f"{e.code()}: {e.details()}")
        run()
    assert not bad, bad[:5]
    assert background.texts and all(t == REPLY for t in background.texts), background.texts[:3]
