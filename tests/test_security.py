"""Keys, tenants and per-tenant limits on both faces of real gateways, against a real
redis-server. The scheduler side is tests/gateway_harness.ScriptedScheduler (a SCRIPTED
STAND-IN that speaks the real RequestQueue), so these pin the gateway's own behaviour; the
prefix-cache isolation through a real scheduler is in test_security_stack.py."""

from __future__ import annotations

import json
import logging
import uuid

import grpc
import httpx
import openai
import pytest
from gateway_harness import GatewayThread, ScriptedScheduler, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tessera.procs import free_port

from common.proto.tessera.v1 import generate_pb2, generate_pb2_grpc
from common.tokenizer import Tokenizer
from gateway.auth import Tenant, Tenants, hash_key
from gateway.service import GatewayConfig
from tessera.client import TesseraClient, TesseraError

KEYS = {"alpha": "sk-alpha-0123456789", "beta": "sk-beta-9876543210",
        "limited": "sk-limited-1", "tokens": "sk-tokens-1", "single": "sk-single-1",
        "queue2": "sk-queue2-1"}
LIMITS = {"limited": {"requests_per_minute": 5},
          "tokens": {"tokens_per_minute": 150},
          "single": {"max_concurrent_requests": 1},
          "queue2": {"max_queued_requests": 2}}


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tenants") / "tenants.json"
    path.write_text(json.dumps({"tenants": [
        {"name": name, "api_key_sha256": hash_key(key), **LIMITS.get(name, {})}
        for name, key in KEYS.items()]}))
    return str(path)


@pytest.fixture(scope="module")
def replicas(redis_url: str, tiny_model, tenants_file: str):
    """Two gateway replicas of one model with one tenants file, and the stand-in scheduler."""
    model_dir = tiny_model("llama")
    name = f"sec-{uuid.uuid4().hex[:6]}"
    gateways = []
    for i in range(2):
        g = GatewayThread(GatewayConfig(model=str(model_dir), served_model_name=name,
                                        redis_url=redis_url, http_port=free_port(),
                                        grpc_port=free_port(), tenants_file=tenants_file,
                                        metrics_port=free_port() if i == 0 else None))
        g.start()
        gateways.append(g)
    sched = ScriptedScheduler(redis_url=redis_url, model=name,
                              tokenizer=Tokenizer.from_dir(model_dir))
    sched.start()
    yield gateways, sched
    sched.stop()
    for g in gateways:
        g.stop()


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def test_every_v1_route_needs_a_valid_key_and_health_stays_open(replicas) -> None:
    (gw, _), _ = replicas
    calls = [("GET", "/v1/models", None),
             ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}),
             ("POST", "/v1/chat/completions",
              {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
             ("GET", "/v1/streams/some-id", None), ("GET", "/v1/requests/some-id", None),
             ("GET", "/v1/no-such-route", None)]
    with httpx.Client(base_url=gw.base_url, timeout=20) as http:
        for method, path, body in calls:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEYS["alpha"]},
                            {"Authorization": "Basic " + KEYS["alpha"]}):
                r = http.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                err = r.json()["error"]
                assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
                assert KEYS["alpha"] not in r.text
        assert http.get("/v1/models", headers=_auth("alpha")).status_code == 200
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                      headers=_auth("beta"))
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        for path in ("/health", "/metrics"):
            assert http.get(path).status_code == 200
        assert http.get("/ready").status_code in (200, 503)   # open: never a 401
    # --metrics-port: the operations routes alone, on a port of their own.
    ops = f"http://127.0.0.1:{gw.config.metrics_port}"
    assert httpx.get(f"{ops}/health", timeout=10).json() == {"status": "ok"}
    assert "tessera:" in httpx.get(f"{ops}/metrics", timeout=10).text
    assert httpx.get(f"{ops}/v1/models", timeout=10, headers=_auth("alpha")).status_code == 404

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key="wrong").models.list()
    sdk = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=KEYS["alpha"])
    out = sdk.completions.create(model=sdk.models.list().data[0].id, prompt="hi", max_tokens=3)
    assert out.usage.completion_tokens == 3


def test_every_grpc_method_needs_a_valid_key(replicas) -> None:
    (gw, _), _ = replicas
    with grpc.insecure_channel(gw.grpc_address) as channel:
        stub = generate_pb2_grpc.GenerateStub(channel)
        calls = [lambda md: stub.Generate(generate_pb2.GenerateRequest(text="hi"), metadata=md,
                                          timeout=10),
                 lambda md: list(stub.GenerateStream(generate_pb2.GenerateRequest(text="hi"),
                                                     metadata=md, timeout=10)),
                 lambda md: stub.Tokenize(generate_pb2.TokenizeRequest(text="hi"), metadata=md,
                                          timeout=10),
                 lambda md: stub.ListModels(generate_pb2.ListModelsRequest(), metadata=md,
                                            timeout=10),
                 lambda md: stub.Cancel(generate_pb2.CancelRequest(request_id="x"), metadata=md,
                                        timeout=10)]
        for call in calls:
            for md in ((), (("authorization", "Bearer wrong"),)):
                with pytest.raises(grpc.RpcError) as e:
                    call(md)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                            timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    with TesseraClient(gw.grpc_address, timeout=20, api_key=KEYS["alpha"]) as client:
        assert client.generate("hi", max_tokens=2).completion_tokens == 2
        assert client.list_models()[0].id == gw.config.served_model_name


def test_two_replicas_share_one_request_limit_exactly(replicas) -> None:
    gateways, _ = replicas
    body = {"prompt": "hi", "max_tokens": 1}
    answers = []
    for i in range(LIMITS["limited"]["requests_per_minute"] + 1):
        gw = gateways[i % 2]   # alternate: neither replica alone sees the whole count
        answers.append(httpx.post(f"{gw.base_url}/v1/completions", json=body,
                                  headers=_auth("limited"), timeout=20))
    assert [r.status_code for r in answers] == [200] * 5 + [429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in answers[:5]] == \
        ["4", "3", "2", "1", "0"]
    refused = answers[-1]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "5"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    # The other replica refuses too, and over gRPC it is RESOURCE_EXHAUSTED with retry-after.
    with TesseraClient(gateways[1].grpc_address, timeout=20, api_key=KEYS["limited"]) as c:
        with pytest.raises(TesseraError) as e:
            c.generate("hi", max_tokens=1)
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Another tenant is not affected.
    ok = httpx.post(f"{gateways[1].base_url}/v1/completions", json=body, headers=_auth("alpha"),
                    timeout=20)
    assert ok.status_code == 200


def test_tokens_are_reserved_at_admission_and_unused_ones_refunded(replicas) -> None:
    (gw, _), sched = replicas
    tok = sched.tokenizer
    prompt = "hi"
    p = len(tok.encode(prompt))
    reply = len(sched.reply_ids(0))
    max_tokens = 100
    assert 2 * p + reply + max_tokens <= 150 < 2 * (p + max_tokens), "the test's arithmetic"
    with httpx.Client(base_url=gw.base_url, timeout=20, headers=_auth("tokens")) as http:
        too_big = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 150})
        assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "max_tokens"
        first = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})
        assert first.status_code == 200
        assert first.json()["usage"]["completion_tokens"] == reply   # a "stop" before the cap
        # What the first did not generate comes back when its relay ends (in the background).
        assert wait_until(lambda: http.post("/v1/completions", json={
            "prompt": prompt, "max_tokens": max_tokens}).status_code == 200, 10)
        third = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})
        assert third.status_code == 429 and third.json()["error"]["type"] == "tokens"
        assert int(third.headers["retry-after"]) >= 1


def test_concurrent_requests_are_capped_per_tenant(replicas) -> None:
    gateways, sched = replicas
    sched.long_reply, sched.step_s = True, 0.02
    try:
        with httpx.Client(timeout=30, headers=_auth("single")) as http:
            body = {"prompt": "hi", "max_tokens": 200, "stream": True}
            with http.stream("POST", f"{gateways[0].base_url}/v1/completions", json=body) as s1:
                assert s1.status_code == 200
                # kept: a line iterator dropped at once closes the connection (a disconnect)
                lines = s1.iter_lines()
                next(lines)   # running
                second = http.post(f"{gateways[1].base_url}/v1/completions",
                                   json={"prompt": "hi", "max_tokens": 2})
                assert second.status_code == 429 and "concurrent" in second.json()["error"]["message"]
            # The first relay ended (closed early: cancelled), so its slot is free again.
            assert wait_until(lambda: http.post(f"{gateways[1].base_url}/v1/completions", json={
                "prompt": "hi", "max_tokens": 2}).status_code == 200, 10)
    finally:
        sched.long_reply, sched.step_s = False, 0.005


def test_a_continue_request_holds_its_concurrency_slot_until_it_finishes(replicas) -> None:
    gateways, sched = replicas
    sched.long_reply, sched.step_s = True, 0.02
    try:
        with httpx.Client(timeout=30, headers=_auth("single")) as http:
            body = {"prompt": "hi", "max_tokens": 120, "stream": True, "disconnect": "continue"}
            with http.stream("POST", f"{gateways[0].base_url}/v1/completions", json=body) as s1:
                assert s1.status_code == 200
                rid = s1.headers["x-request-id"]
                next(s1.iter_lines())   # running; then the client leaves
            # The generation goes on without its client: the tenant's one slot stays taken,
            # on both replicas, until it finishes.
            second = http.post(f"{gateways[1].base_url}/v1/completions",
                               json={"prompt": "hi", "max_tokens": 2})
            assert second.status_code == 429 and "concurrent" in second.json()["error"]["message"]
            assert rid not in sched.cancelled
            assert wait_until(lambda: http.post(f"{gateways[0].base_url}/v1/completions", json={
                "prompt": "hi", "max_tokens": 2}).status_code == 200, 30)
            # It ran to its end (all 120 tokens, no cancel), and only then was the slot free.
            done = http.get(f"{gateways[1].base_url}/v1/requests/{rid}").json()
            assert done["usage"]["completion_tokens"] == 120 and rid not in sched.cancelled
    finally:
        sched.long_reply, sched.step_s = False, 0.005


def test_running_requests_do_not_count_as_queued(replicas) -> None:
    gateways, sched = replicas
    sched.long_reply, sched.step_s = True, 0.05   # 200 tokens: 10 s
    try:
        with httpx.Client(timeout=30, headers=_auth("queue2")) as http:
            body = {"prompt": "hi", "max_tokens": 200, "stream": True}
            with http.stream("POST", f"{gateways[0].base_url}/v1/completions", json=body) as s1, \
                    http.stream("POST", f"{gateways[1].base_url}/v1/completions", json=body) as s2:
                lines = [s.iter_lines() for s in (s1, s2)]
                for s, it in zip((s1, s2), lines):
                    assert s.status_code == 200
                    next(it)   # both produce output: running, no longer queued
                # Their first events left the queued set (in the background): a third fits,
                # long before either finishes (their relays would release them only then).
                assert wait_until(lambda: http.post(f"{gateways[1].base_url}/v1/completions",
                                                    json={"prompt": "hi", "max_tokens": 2}
                                                    ).status_code == 200, 3)
                assert "[DONE]" not in next(lines[0])
    finally:
        sched.long_reply, sched.step_s = False, 0.005


def test_queued_requests_are_capped_per_tenant_across_replicas(redis_url, tiny_model,
                                                                tenants_file) -> None:
    model_dir = tiny_model("llama")
    name = f"tq-{uuid.uuid4().hex[:6]}"   # no scheduler reads this model's stream yet
    gateways = [GatewayThread(GatewayConfig(model=str(model_dir), served_model_name=name,
                                            redis_url=redis_url, http_port=free_port(),
                                            grpc_port=free_port(), tenants_file=tenants_file))
                for _ in range(2)]
    for g in gateways:
        g.start()
    sched = None
    try:
        # Two requests wait, one through each replica ("continue": they stay queued when the
        # client gives up after 1 s).
        for g in gateways:
            with TesseraClient(g.grpc_address, timeout=1, api_key=KEYS["queue2"]) as c:
                with pytest.raises(TesseraError) as e:
                    list(c.stream("wait", max_tokens=2, disconnect="continue"))
                assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        for g in gateways:   # the third is refused by either replica
            r = httpx.post(f"{g.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                           headers=_auth("queue2"), timeout=20)
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            assert "queued requests (2" in r.json()["error"]["message"]
        with TesseraClient(gateways[1].grpc_address, timeout=20, api_key=KEYS["queue2"]) as c:
            with pytest.raises(TesseraError) as e:
                c.generate("hi", max_tokens=1)
            assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Another tenant is admitted (it only waits: nothing reads the queue yet).
        with TesseraClient(gateways[0].grpc_address, timeout=1, api_key=KEYS["alpha"]) as c:
            with pytest.raises(TesseraError) as e:
                list(c.stream("wait", max_tokens=2))
            assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        # A scheduler starts them: they leave the queued count, and the tenant is admitted.
        sched = ScriptedScheduler(redis_url=redis_url, model=name,
                                  tokenizer=Tokenizer.from_dir(model_dir))
        sched.start()
        assert wait_until(lambda: httpx.post(
            f"{gateways[0].base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
            headers=_auth("queue2"), timeout=20).status_code == 200, 30)
    finally:
        if sched is not None:
            sched.stop()
        for g in gateways:
            g.stop()


def test_a_tenant_reads_and_resumes_only_its_own_requests(replicas) -> None:
    (gw, _), sched = replicas
    with TesseraClient(gw.grpc_address, timeout=20, api_key=KEYS["alpha"]) as alpha, \
            TesseraClient(gw.grpc_address, timeout=20, api_key=KEYS["beta"]) as beta:
        chunks = list(alpha.stream("mine", max_tokens=6, request_id="sec-own-1"))
        assert len(chunks) >= 2
        with pytest.raises(TesseraError) as e:
            list(beta.stream(None, request_id="sec-own-1", last_event_index=0))
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert list(alpha.stream(None, request_id="sec-own-1", last_event_index=0))
    # The cache salt is the server's, per tenant: equal within one, different across two.
    salts = {sched.requests[rid].tenant: sched.requests[rid].cache_salt
             for rid in sched.requests if sched.requests[rid].tenant in ("alpha", "beta")}
    assert salts["alpha"] and salts["beta"] and salts["alpha"] != salts["beta"]
    assert len({q.cache_salt for q in sched.requests.values() if q.tenant == "alpha"}) == 1


def test_the_request_log_line_names_the_tenant_never_the_key(replicas, caplog) -> None:
    (gw, _), _ = replicas
    with caplog.at_level(logging.INFO, logger="gateway.telemetry"):
        r = httpx.post(f"{gw.base_url}/v1/completions", json={"prompt": "a secret prompt",
                                                             "max_tokens": 2},
                       headers=_auth("beta"), timeout=20)
        assert r.status_code == 200
        assert wait_until(lambda: any("finished" in m for m in caplog.messages), 5)
    lines = [m for m in caplog.messages if "finished" in m]
    assert any("tenant=beta" in m for m in lines)
    assert not any(KEYS["beta"] in m or "secret prompt" in m for m in caplog.messages)


def test_tenants_file_validation_and_reload(tmp_path) -> None:
    path = tmp_path / "t.json"
    good = {"tenants": [{"name": "a", "api_key_sha256": hash_key("k1")}]}
    path.write_text(json.dumps(good))
    tenants = Tenants.from_settings(tenants_file=str(path))
    assert tenants.authenticate("Bearer k1").name == "a"
    assert tenants.authenticate("Bearer k2") is None and tenants.authenticate(None) is None
    path.write_text(json.dumps({"tenants": [{"name": "b", "api_key_sha256": hash_key("k2")}]}))
    tenants.reload()
    assert tenants.authenticate("Bearer k1") is None and tenants.authenticate("Bearer k2").name == "b"
    path.write_text("{not json")
    tenants.reload()   # a broken file keeps the tenants it had
    assert tenants.authenticate("Bearer k2").name == "b"
    bad = [{"name": "", "api_key_sha256": hash_key("x")},
           {"name": "a", "api_key_sha256": "xyz"},
           {"name": "a", "api_key_sha256": hash_key("x"), "requests_per_minute": -1},
           {"name": "a", "api_key_sha256": hash_key("x"), "weight": 0},
           {"name": "a", "api_key_sha256": hash_key("x"), "colour": "red"}]
    for entry in bad:
        path.write_text(json.dumps({"tenants": [entry]}))
        with pytest.raises(ValueError):
            Tenants.from_settings(tenants_file=str(path))
    with pytest.raises(ValueError):
        Tenants([Tenant("a", hash_key("1")), Tenant("a", hash_key("2"))])
    single = Tenants.from_settings(api_key="only")
    assert single.enabled and single.authenticate("Bearer only").name == "default"
    assert not Tenants.from_settings().enabled


def test_queue_depth_admission_answers_429_instead_of_an_unbounded_queue(redis_url, tiny_model):
    model_dir = tiny_model("llama")
    name = f"nosched-{uuid.uuid4().hex[:6]}"   # no scheduler reads this model's stream
    gw = GatewayThread(GatewayConfig(model=str(model_dir), served_model_name=name,
                                     redis_url=redis_url, http_port=free_port(),
                                     grpc_port=free_port(), max_queued_requests=2))
    gw.start()
    try:
        # Two requests wait in Redis: each call gives up after 1 s, and "continue" keeps it queued.
        with TesseraClient(gw.grpc_address, timeout=1) as client:
            for _ in range(2):
                with pytest.raises(TesseraError) as e:
                    list(client.stream("wait", max_tokens=2, disconnect="continue"))
                assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        r = httpx.post(f"{gw.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                       timeout=20)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "queue_full"
    finally:
        gw.stop()
