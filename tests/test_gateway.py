"""The gateway's OpenAI-compatible HTTP face, served for real against a real redis-server.

The other side of Redis is tests/gateway_harness.ScriptedScheduler, a SCRIPTED STAND-IN for
the scheduler service (it uses the real scheduler.queue.RequestQueue but replies a fixed
text): these tests pin the gateway's own behaviour: validation, chat template, text, stop
strings, streaming, cancels and errors. Full-stack tests use the real scheduler.
"""

from __future__ import annotations

import logging

import httpx
import openai
import pytest
import redis
from gateway_harness import MAX_BODY, REPLY, stack, wait_until  # noqa: F401 (fixture)

from common import redis_schema as schema
from tessera.sse import events


@pytest.fixture
def http(stack) -> httpx.Client:
    with httpx.Client(base_url=stack[0].base_url, timeout=20) as client:
        yield client


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The data of each SSE event; the [DONE] sentinel as the string."""
    return [data for _, data in events(response.iter_lines())]


def test_health_ready_and_models(stack, http: httpx.Client, redis_url: str) -> None:
    gateway, _, _ = stack
    name = gateway.config.served_model_name
    assert http.get("/health").json() == {"status": "ok"}
    r = http.get("/ready")
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    # Ready while a scheduler of the model keeps its group's ready key (scheduler.health):
    # a key with a TTL, so a scheduler that dies stops counting on its own.
    with redis.Redis.from_url(redis_url) as client:
        client.sadd(schema.ready_groups(name), "g0")
        assert http.get("/ready").status_code == 503, "a known group without its key is not ready"
        client.set(schema.scheduler_ready(name, "g0"), "1", px=10_000)
        try:
            assert http.get("/ready").status_code == 200
        finally:
            client.delete(schema.scheduler_ready(name, "g0"))
    assert http.get("/ready").status_code == 503
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [name]
    assert models["data"][0]["max_model_len"] == 2048


def test_completion_stream_reassembles_to_the_non_streamed_text(stack, http) -> None:
    gateway, sched, tok = stack
    name = gateway.config.served_model_name
    body = {"model": name, "prompt": "Say hello", "max_tokens": 8, "temperature": 0}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    expected = tok.decode(sched.reply_ids(0)[:8])
    assert out["choices"][0]["text"] == expected
    assert out["choices"][0]["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": len(tok.encode("Say hello")),
                            "completion_tokens": 8,
                            "total_tokens": len(tok.encode("Say hello")) + 8}
    queued = sched.requests[r.headers["x-request-id"]]
    assert queued.prompt_token_ids == tok.encode("Say hello") and queued.params.greedy

    with http.stream("POST", "/v1/completions", json={
            **body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-2]["usage"]["completion_tokens"] == 8 and events[-2]["choices"] == []


def test_completion_batch_n_echo_logprobs_and_extras(stack, http) -> None:
    gateway, sched, tok = stack
    prompts = [tok.encode("first"), tok.encode("second prompt")]
    r = http.post("/v1/completions", json={
        "model": gateway.config.served_model_name, "prompt": prompts, "n": 2, "max_tokens": 4,
        "echo": True, "logprobs": 2, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
        "min_tokens": 1, "ignore_eos": True, "seed": 7, "stop_token_ids": [3]})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for c in choices:
        p, s = divmod(c["index"], 2)
        prompt_text = tok.decode(prompts[p])
        assert c["text"] == prompt_text + tok.decode(sched.reply_ids(s)[:4])
        lp = c["logprobs"]
        # echo: the prompt's tokens first (the first has no logprob), then the 4 sampled
        assert len(lp["tokens"]) == len(prompts[p]) + 4 and lp["token_logprobs"][0] is None
        assert lp["token_logprobs"][-1] == -0.25 and len(lp["top_logprobs"][-1]) >= 2
    assert r.json()["usage"]["completion_tokens"] == 16
    q = sched.requests[r.headers["x-request-id"]]
    assert (q.params.top_k, q.params.min_p, q.params.min_tokens, q.params.seed) == (5, 0.1, 1, 7)
    assert q.params.ignore_eos and q.params.stop_token_ids == (3,) and q.params.logprobs == 2


def test_chat_stream_starts_with_the_role_and_matches_the_non_streamed_reply(stack, http) -> None:
    gateway, sched, tok = stack
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                             {"type": "text", "text": "there"}]}]
    body = {"model": gateway.config.served_model_name, "messages": messages,
            "max_completion_tokens": 6, "max_tokens": 100, "logprobs": True, "top_logprobs": 2}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    expected = tok.decode(sched.reply_ids(0)[:6])
    choice = out["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert choice["finish_reason"] == "length" and out["object"] == "chat.completion"
    assert len(choice["logprobs"]["content"]) == 6
    assert len(choice["logprobs"]["content"][0]["top_logprobs"]) == 2
    rendered = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}],
        add_generation_prompt=True, tokenize=True)
    assert sched.requests[r.headers["x-request-id"]].prompt_token_ids == rendered
    assert out["usage"]["prompt_tokens"] == len(rendered)

    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0] for e in events[:-1]]
    assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(d["delta"].get("content", "") for d in deltas) == expected
    assert deltas[-1]["finish_reason"] == "length" and deltas[-1]["delta"] == {}


def test_stop_string_cuts_the_text_and_cancels_the_request(stack, http) -> None:
    gateway, sched, tok = stack
    body = {"model": gateway.config.served_model_name, "prompt": "x", "max_tokens": 200,
            "stop": ["fox", "never"]}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == REPLY.split("fox")[0] and choice["finish_reason"] == "stop"
    rid = r.headers["x-request-id"]
    assert wait_until(lambda: rid in sched.cancelled, 5), "the gateway did not cancel"
    with http.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                      "include_stop_str_in_output": True}) as r:
        events = sse_events(r)
        rid = r.headers["x-request-id"]
    text = "".join(e["choices"][0]["text"] for e in events[:-1])
    assert text == REPLY.split("fox")[0] + "fox"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert wait_until(lambda: rid in sched.cancelled, 5)


def test_client_that_disconnects_gets_its_request_cancelled_unless_it_asks_to_continue(
        stack, redis_url: str) -> None:
    gateway, sched, _ = stack
    sched.long_reply, sched.step_s = True, 0.02
    try:
        with httpx.Client(base_url=gateway.base_url, timeout=20) as client:
            with client.stream("POST", "/v1/completions", json={
                    "prompt": "go", "max_tokens": 500, "stream": True}) as r:
                rid = r.headers["x-request-id"]
                lines = r.iter_lines()
                while not next(lines).startswith("data: "):
                    pass
        assert wait_until(lambda: rid in sched.cancelled, 10), "no cancel after the disconnect"
        # Not streamed: the client gives up waiting (a read timeout closes the connection).
        before = set(sched.requests)
        with httpx.Client(base_url=gateway.base_url, timeout=0.5) as client:
            with pytest.raises(httpx.ReadTimeout):
                client.post("/v1/completions", json={"prompt": "go", "max_tokens": 500})
        (rid,) = set(sched.requests) - before
        assert wait_until(lambda: rid in sched.cancelled, 10)
        # disconnect=continue: the generation runs on (to be resumed), nothing is cancelled.
        with httpx.Client(base_url=gateway.base_url, timeout=20) as client:
            with client.stream("POST", "/v1/completions", json={
                    "prompt": "go", "max_tokens": 30, "stream": True,
                    "disconnect": "continue"}) as r:
                rid = r.headers["x-request-id"]
        with redis.Redis.from_url(redis_url) as client:
            record = schema.request_record(rid)
            assert wait_until(lambda: client.hget(record, "state") == b"finished", 10)
        assert rid not in sched.cancelled
    finally:
        sched.long_reply, sched.step_s = False, 0.005


def test_idempotency_key_attaches_to_the_first_generation(stack, http) -> None:
    body = {"prompt": "once", "max_tokens": 4}
    key = {"Idempotency-Key": "k-" + stack[0].config.served_model_name}
    first = http.post("/v1/completions", json=body, headers=key)
    again = http.post("/v1/completions", json=body, headers=key)
    assert first.headers["x-request-id"] == again.headers["x-request-id"]
    assert first.json()["choices"] == again.json()["choices"]


def test_official_openai_sdk_works_unchanged(stack) -> None:
    gateway, sched, tok = stack
    name = gateway.config.served_model_name
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [name]
    expected = tok.decode(sched.reply_ids(0)[:5])
    c = client.completions.create(model=name, prompt="Hello", max_tokens=5, temperature=0)
    assert c.choices[0].text == expected and c.usage.completion_tokens == 5
    chat = client.chat.completions.create(model=name, max_tokens=5,
                                          messages=[{"role": "user", "content": "Hello"}])
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].finish_reason == "length"
    stream = client.chat.completions.create(model=name, max_tokens=5, stream=True,
                                            messages=[{"role": "user", "content": "Hello"}])
    pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(pieces) == expected
    stream = client.completions.create(model=name, prompt="Hello", max_tokens=5, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == expected
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="Hello")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=name, prompt="Hello", temperature=-1)
    assert e.value.body["param"] == "temperature"


BAD = [
    # (path, raw body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", b'{"max_tokens": 4}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": 3}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
    ("/v1/completions", b'{"prompt": "x", "temperature": -1}', 400, "temperature"),
    ("/v1/completions", b'{"prompt": "x", "top_p": 1.5}', 400, "top_p"),
    ("/v1/completions", b'{"prompt": "x", "n": 0}', 400, "n"),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 99}', 400, "logprobs"),
    ("/v1/completions", b'{"prompt": "x", "logit_bias": {"abc": 1}}', 400, "logit_bias"),
    ("/v1/completions", b'{"prompt": [1, 999999]}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": []}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 5000}', 400, "prompt"),
    ("/v1/completions", b'{"prompt": "x", "model": "gpt-4"}', 404, "model"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "robot", "content": "x"}]}', 400,
     "messages.0.role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                             b'"max_completion_tokens": 4096}', 400, "messages"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], '
                             b'"logprobs": true, "top_logprobs": 50}', 400, "top_logprobs"),
    ("/v1/completions", b'{"prompt": "' + b"a" * MAX_BODY + b'"}', 413, None),
]


def test_bad_inputs_get_openai_errors_and_the_server_keeps_serving(stack, http) -> None:
    gateway, sched, tok = stack
    for path, raw, status, param in BAD:
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == status, (raw[:80], r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        assert err["param"] == param, (raw[:80], err)
    # A chunked body has no Content-Length: the limit counts what arrives.
    r = http.post("/v1/completions", content=iter([b'{"prompt": "', b"a" * MAX_BODY, b'"}']))
    assert r.status_code == 413
    assert http.get("/v1/nothing-here").json()["error"]["type"] == "not_found_error"
    r = http.post("/v1/completions", json={"prompt": "still fine", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == tok.decode(
        sched.reply_ids(0)[:3])


def test_request_log_line_has_ids_and_text_only_with_log_prompts(stack, http, caplog,
                                                                 monkeypatch) -> None:
    from common import logging_setup

    gateway, sched, tok = stack
    name = gateway.config.served_model_name
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

    def finished_line(prompt: str) -> logging.LogRecord:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="gateway.telemetry"):
            r = http.post("/v1/completions", headers={"traceparent": traceparent},
                          json={"model": name, "prompt": prompt, "max_tokens": 3})
            assert r.status_code == 200
            assert wait_until(lambda: any("finished" in m for m in caplog.messages))
        (record,) = [rec for rec in caplog.records if "finished" in rec.getMessage()]
        assert record.request_id == r.headers["x-request-id"]
        assert record.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"   # the client's trace
        return record

    record = finished_line("my secret prompt")
    assert "secret" not in record.getMessage() and "3 output tokens" in record.getMessage()
    monkeypatch.setattr(logging_setup, "_log_prompts", True)
    record = finished_line("my secret prompt")
    assert "prompt='my secret prompt'" in record.getMessage()
    assert repr(tok.decode(sched.reply_ids(0)[:3])) in record.getMessage()
