"""Every number the API takes is range-checked where it enters (DESIGN.md §4, poison requests):
each integer field at 2**31, 2**63, -1, NaN and 1e308 and each float at NaN, infinities and
1e308, on both faces, gets a 400 naming the field (HTTP, OpenAI's error shape) or
INVALID_ARGUMENT (gRPC), never a 5xx, while concurrent well-formed streams are unaffected.

The gateway is real; the other side of Redis is the scripted stand-in of tests/gateway_harness.
That the real scheduler survives a bad number that reaches it anyway is in tests/test_faults.py.
"""

from __future__ import annotations

import json
import math
import threading

import grpc
import httpx
import pytest
from gateway_harness import stack  # noqa: F401 (fixture)

from common.proto.tessera.v1 import generate_pb2, generate_pb2_grpc

BAD_INTS = [2**31, 2**63, -1, math.nan, 1e308]
# (field, value) pairs a field accepts: everything else in BAD_INTS must be refused.
ACCEPTED = {("seed", 2**31), ("seed", -1), ("top_k", -1), ("logit_bias", -1),
            ("temperature", 2**31), ("temperature", 2**63), ("temperature", 1e308),
            ("repetition_penalty", 2**31), ("repetition_penalty", 2**63),
            ("repetition_penalty", 1e308), ("presence_penalty", -1), ("frequency_penalty", -1)}
COMPLETION_FIELDS = ["n", "seed", "top_k", "min_tokens", "max_tokens", "logprobs",
                     "stop_token_ids", "logit_bias", "logit_bias_key", "prompt",
                     "temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty"]
CHAT_FIELDS = ["max_completion_tokens", "max_tokens", "top_logprobs", "n", "seed", "top_k"]


def completion_body(field: str, value) -> dict:
    body = {"prompt": "x", "max_tokens": 2}
    if field == "stop_token_ids":
        body[field] = [value]
    elif field == "logit_bias":
        body[field] = {"5": value}
    elif field == "logit_bias_key":
        body["logit_bias"] = {json.dumps(value): 1.0}
    elif field == "prompt":
        body[field] = [1, value]
    else:
        body[field] = value
    return body


def chat_body(field: str, value) -> dict:
    body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    if field == "max_completion_tokens":
        del body["max_tokens"]
    return body


class Traffic:
    """Well-formed streams in a loop while the bad requests go in; every one must finish
    with the stand-in's reply."""

    def __init__(self, base_url: str, expected: str) -> None:
        self.base_url, self.expected = base_url, expected
        self.stop, self.done, self.failures = threading.Event(), 0, []
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as c:
            while not self.stop.is_set():
                text = ""
                with c.stream("POST", "/v1/completions", json={
                        "prompt": "fine", "max_tokens": 8, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                if r.status_code != 200 or text != self.expected:
                    self.failures.append((r.status_code, text))
                self.done += 1

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(60)


def test_http_refuses_every_out_of_range_number_with_a_400_naming_the_field(stack) -> None:
    gateway, sched, tok = stack
    expected = tok.decode(sched.reply_ids(0)[:8])
    cases = [("/v1/completions", f, v, completion_body(f, v))
             for f in COMPLETION_FIELDS for v in BAD_INTS]
    cases += [("/v1/chat/completions", f, v, chat_body(f, v)) for f in CHAT_FIELDS
              for v in BAD_INTS]
    cases += [("/v1/completions", f, v, completion_body(f, v))
              for f in ("temperature", "top_p", "repetition_penalty", "logit_bias")
              for v in (math.inf, -math.inf)]
    with Traffic(gateway.base_url, expected) as traffic, \
            httpx.Client(base_url=gateway.base_url, timeout=30) as c:
        for path, field, value, body in cases:
            # json.dumps writes NaN / Infinity literals, which Python's and many JSON
            # parsers accept: the gateway must refuse them by value, not crash on them.
            r = c.post(path, content=json.dumps(body),
                       headers={"content-type": "application/json"})
            accepted = (field, value) in ACCEPTED or (field == "logit_bias" and value == -math.inf)
            if accepted:
                assert r.status_code == 200, (field, value, r.text)
                continue
            assert r.status_code == 400, (field, value, r.status_code, r.text)
            err = r.json()["error"]
            name = "logit_bias" if field == "logit_bias_key" else field
            assert err["type"] == "invalid_request_error" and err["message"], err
            assert err["param"] == name or name in (err["param"] or "") \
                or (field == "prompt" and err["param"] == "prompt"), (field, value, err)
        assert traffic.done >= 1
    assert traffic.failures == [], traffic.failures


def test_grpc_refuses_every_out_of_range_number_with_invalid_argument(stack) -> None:
    gateway, sched, tok = stack
    expected = tok.decode(sched.reply_ids(0)[:8])
    P = generate_pb2.SamplingParams
    # What the wire can carry: int32 fields at their limits and -1, the int64 seed at its
    # limits, doubles at NaN / inf / 1e308. (2**31 in an int32 field cannot be encoded at all:
    # protobuf refuses it in the client.)
    int32_max, int32_min = 2**31 - 1, -(2**31)
    bad = [("n", P(n=int32_max)), ("n", P(n=-1)), ("top_k", P(top_k=int32_min)),
           ("max_tokens", P(max_tokens=int32_max)), ("max_tokens", P(max_tokens=-1)),
           ("min_tokens", P(min_tokens=int32_max)), ("min_tokens", P(min_tokens=-1)),
           ("logprobs", P(logprobs=int32_max)), ("logprobs", P(logprobs=-1)),
           ("prompt_logprobs", P(prompt_logprobs=-1)),
           ("stop_token_ids", P(stop_token_ids=[-1])),
           ("logit_bias", P(logit_bias={-1: 1.0})), ("logit_bias", P(logit_bias={5: 1e308})),
           ("logit_bias", P(logit_bias={5: math.nan})),
           ("temperature", P(temperature=math.nan)), ("temperature", P(temperature=math.inf)),
           ("top_p", P(top_p=1e308)), ("top_p", P(top_p=math.nan)),
           ("min_p", P(min_p=-1)), ("repetition_penalty", P(repetition_penalty=math.inf)),
           ("presence_penalty", P(presence_penalty=1e308)),
           ("frequency_penalty", P(frequency_penalty=math.nan))]
    good = [P(seed=2**63 - 1, max_tokens=2), P(seed=-(2**63), max_tokens=2),
            P(top_k=int32_max, max_tokens=2), P(stop_token_ids=[int32_max], max_tokens=2)]
    with pytest.raises(ValueError):
        P(top_k=2**31)
    with Traffic(gateway.base_url, expected) as traffic, \
            grpc.insecure_channel(gateway.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        for field, params in bad:
            for call in (stub.Generate, lambda r, timeout: list(stub.GenerateStream(r, timeout=timeout))):
                with pytest.raises(grpc.RpcError) as e:
                    call(generate_pb2.GenerateRequest(text="x", params=params), timeout=30)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.value)
                assert field in e.value.details(), (field, e.value.details())
        for cursor in (-2, 2**31, 2**63 - 1):
            with pytest.raises(grpc.RpcError) as e:
                list(stub.GenerateStream(generate_pb2.GenerateRequest(
                    request_id="r", last_event_index=cursor), timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "last_event_index" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(generate_pb2.GenerateRequest(token_ids=generate_pb2.TokenIds(
                ids=[1, int32_max])), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for params in good:
            out = stub.Generate(generate_pb2.GenerateRequest(text="x", params=params),
                                timeout=30)
            assert out.choices[0].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert traffic.done >= 1 and traffic.failures == [], traffic.failures
