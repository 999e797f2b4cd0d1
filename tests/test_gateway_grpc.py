"""The gateway's gRPC face through tessera.client, plus grpc.health.v1 and reflection, and the
``tessera gateway`` command. The scheduler is tests/gateway_harness.ScriptedScheduler, a
SCRIPTED STAND-IN (real RequestQueue, fixed replies), as in test_gateway.py."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import subprocess
import sys

import grpc
import httpx
import pytest
import redis
from gateway_harness import MAX_BODY, REPLY, stack, wait_until  # noqa: F401 (fixture)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tessera.procs import free_port

from common import redis_schema as schema
from common.proto.tessera.v1 import generate_pb2, generate_pb2_grpc
from tessera.client import AsyncTesseraClient, TesseraClient, TesseraError


@pytest.fixture
def client(stack):
    with TesseraClient(stack[0].grpc_address, timeout=20) as c:
        yield c


def test_generate_stream_and_usage(stack, client: TesseraClient) -> None:
    _, sched, tok = stack
    result = client.generate("Say hello", max_tokens=7, temperature=0, n=2, logprobs=1)
    assert [c.index for c in result.choices] == [0, 1]
    for c in result.choices:
        ids = sched.reply_ids(c.index)[:7]
        assert (c.text, c.token_ids, c.finish_reason) == (tok.decode(ids), ids, "length")
        assert [lp[0] for lp in c.logprobs] == ids and len(c.logprobs[0][2]) == 1
    assert (result.prompt_tokens, result.completion_tokens) == (len(tok.encode("Say hello")), 14)
    assert sched.requests[result.request_id].params.n == 2

    chunks = list(client.stream(list(tok.encode("Say hello")), max_tokens=7))
    assert [ch.index for ch in chunks] == sorted({ch.index for ch in chunks})
    assert "".join(c.text for ch in chunks for c in ch.choices) == tok.decode(
        sched.reply_ids(0)[:7])
    assert chunks[-1].choices[-1].finish_reason == "length" and chunks[-1].usage[1] == 7

    chat = client.generate([{"role": "user", "content": "Hi"}], max_tokens=3)
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert sched.requests[chat.request_id].prompt_token_ids == rendered


def test_a_stream_resumes_after_the_last_event_seen(stack, client: TesseraClient) -> None:
    chunks = list(client.stream("resume me", max_tokens=10, request_id="grpc-resume-1"))
    seen = chunks[3].index
    rest = list(client.stream("resume me", max_tokens=10, request_id="grpc-resume-1",
                              last_event_index=seen))
    assert rest == chunks[4:]


def test_stop_string_over_grpc(stack, client: TesseraClient) -> None:
    _, sched, _ = stack
    result = client.generate("x", max_tokens=100, stop=["brown"])
    assert result.choices[0].text == REPLY.split("brown")[0]
    assert result.choices[0].finish_reason == "stop"
    assert wait_until(lambda: result.request_id in sched.cancelled, 5)


def test_tokenize_list_models_and_cancel(stack, client: TesseraClient) -> None:
    gateway, sched, tok = stack
    assert client.tokenize("Hello world") == tok.encode("Hello world")
    chat = [{"role": "user", "content": "Hi"}]
    assert client.tokenize(chat) == tok.apply_chat_template(chat, tokenize=True)
    (model,) = client.list_models()
    assert (model.id, model.max_model_len) == (gateway.config.served_model_name, 2048)

    sched.long_reply, sched.step_s = True, 0.02
    try:
        stream = client.stream("go", max_tokens=500, request_id="grpc-cancel-me")
        first = next(stream)
        assert first.request_id == "grpc-cancel-me"
        client.cancel("grpc-cancel-me")
        rest = list(stream)
        assert rest[-1].choices[-1].finish_reason == "abort"
        assert "grpc-cancel-me" in sched.cancelled
    finally:
        sched.long_reply, sched.step_s = False, 0.005
    client.cancel("no-such-request")   # racing the end of a generation is not an error


def test_errors_map_to_grpc_status_codes(stack, client: TesseraClient) -> None:
    gateway, _, _ = stack
    with pytest.raises(ValueError, match="temperature"):   # the client validates first
        client.generate("x", temperature=-1)
    # The server validates too: send what a client in another language could send.
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        cases = [
            (generate_pb2.GenerateRequest(text="x", params=generate_pb2.SamplingParams(
                temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
            (generate_pb2.GenerateRequest(text="x", params=generate_pb2.SamplingParams(
                max_tokens=5000)), grpc.StatusCode.INVALID_ARGUMENT, "context length"),
            (generate_pb2.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
            (generate_pb2.GenerateRequest(model="gpt-4", text="x"), grpc.StatusCode.NOT_FOUND,
             "gpt-4"),
            (generate_pb2.GenerateRequest(text="a" * MAX_BODY), grpc.StatusCode.RESOURCE_EXHAUSTED,
             ""),
        ]
        for request, code, words in cases:
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(request, timeout=10)
            assert e.value.code() == code and words in e.value.details(), e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                list(stub.GenerateStream(request, timeout=10))
            assert e.value.code() == code
    with pytest.raises(TesseraError) as e:
        TesseraClient(gateway.grpc_address, model="gpt-4").tokenize("x")
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert client.generate("still serving", max_tokens=2).choices[0].finish_reason == "length"


def test_async_client(stack) -> None:
    gateway, sched, tok = stack

    async def main() -> None:
        async with AsyncTesseraClient(gateway.grpc_address, timeout=20) as c:
            results = await asyncio.gather(*(c.generate(f"p{i}", max_tokens=4) for i in range(4)))
            assert all(r.choices[0].text == tok.decode(sched.reply_ids(0)[:4]) for r in results)
            text = "".join([ch.choices[0].text async for ch in c.stream("p", max_tokens=4)
                            if ch.choices])
            assert text == results[0].choices[0].text
            assert await c.tokenize("abc") == tok.encode("abc")
            assert [m.id for m in await c.list_models()] == [gateway.config.served_model_name]

    asyncio.run(main())


def test_health_service_and_reflection(stack, redis_url: str) -> None:
    gateway, _, _ = stack
    name = gateway.config.served_model_name
    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(gateway.grpc_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def check(service: str) -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

        # Liveness ("") always; readiness (the Generate service) only while a scheduler of the
        # model is ready, which the scripted stand-in never claims: its key is set by hand.
        assert check("") == serving
        assert check("tessera.v1.Generate") == health_pb2.HealthCheckResponse.NOT_SERVING
        with redis.Redis.from_url(redis_url) as client:
            client.sadd(schema.ready_groups(name), "g0")
            client.set(schema.scheduler_ready(name, "g0"), "1", px=10_000)
            try:
                assert check("tessera.v1.Generate") == serving
            finally:
                client.delete(schema.scheduler_ready(name, "g0"))
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        (reply,) = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = {s.name for s in reply.list_services_response.service}
        assert {"tessera.v1.Generate", "grpc.health.v1.Health"} <= names


def test_tessera_gateway_command(redis_url: str, tiny_model) -> None:
    http_port, grpc_port = free_port(), free_port()
    exe = pathlib.Path(sys.executable).with_name("tessera")
    proc = subprocess.Popen(
        [str(exe), "gateway", "--model", str(tiny_model("llama")), "--served-model-name", "cli",
         "--redis-url", redis_url, "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert line.strip() == (f"gateway ready http://127.0.0.1:{http_port} "
                                f"grpc 127.0.0.1:{grpc_port}")
        assert httpx.get(f"http://127.0.0.1:{http_port}/health").status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
