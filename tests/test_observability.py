"""Observability of the real stack: worker, scheduler and gateway processes on a real
redis-server, exporting spans over OTLP/gRPC to a real receiver (tests/otlp_receiver.py).

One trace per request across the three processes, with the GenAI attributes; every service's
/metrics read with prometheus_client's parser after a known set of requests; readiness that
follows a stopped, killed and restarted worker while liveness stays up (and a standby scheduler
is ready to take over); JSON logs that carry request and trace ids and never the prompt.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import signal
import time
import uuid

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from otlp_receiver import OtlpReceiver
from prometheus_client.parser import text_string_to_metric_families
from tessera.procs import TESSERA, Proc, free_port

CHUNK = 32           # the scheduler's --max-num-batched-tokens: prefill chunks of 32 tokens
READY_TIMEOUT = 3.0  # the scheduler's --ready-timeout
BOUND = 3 * READY_TIMEOUT + 1   # readiness must follow the worker within this


def service(name: str, argv: list[str], ready: str, log: pathlib.Path,
            env: dict[str, str]) -> Proc:
    """`tessera ARGV...`, its output appended to `log` (a restart appends too)."""
    return Proc(name, [*TESSERA, *argv], ready, env, log)


@pytest.fixture(scope="module")
def obs(tiny_model, redis_url, tmp_path_factory):
    receiver = OtlpReceiver().start()
    logs = tmp_path_factory.mktemp("logs")
    model_dir = str(tiny_model("llama"))
    name = f"obs-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    env.pop("OTEL_SDK_DISABLED", None)
    ports = {k: free_port() for k in ("worker", "worker_metrics", "scheduler_metrics", "http", "grpc")}
    common = ["--model", model_dir, "--served-model-name", name, "--redis-url", redis_url,
              "--log-format", "json"]
    worker = service("worker", ["worker", *common, "--port", str(ports["worker"]),
                                "--kv-cache-memory-gb", "0.01",
                                "--metrics-port", str(ports["worker_metrics"])],
                     "worker ready", logs / "worker.log", env)
    scheduler = service("scheduler", [
        "scheduler", *common, "--workers", f"127.0.0.1:{ports['worker']}",
        "--max-num-batched-tokens", str(CHUNK), "--step-timeout", "5",
        "--ready-timeout", str(READY_TIMEOUT), "--metrics-host", "127.0.0.1",
        "--metrics-port", str(ports["scheduler_metrics"])], "scheduler ready",
        logs / "scheduler.log", env)
    gateway = service("gateway", ["gateway", *common, "--http-port", str(ports["http"]),
                                  "--grpc-port", str(ports["grpc"])], "gateway ready",
                      logs / "gateway.log", env)
    try:
        for proc in (worker, scheduler, gateway):
            proc.start().wait_ready(120)
        yield {"name": name, "receiver": receiver, "worker": worker, "scheduler": scheduler,
               "gateway": gateway, "base": f"http://127.0.0.1:{ports['http']}",
               "grpc": f"127.0.0.1:{ports['grpc']}",
               "metrics": {"gateway": f"http://127.0.0.1:{ports['http']}/metrics",
                           "scheduler": f"http://127.0.0.1:{ports['scheduler_metrics']}/metrics",
                           "worker": f"http://127.0.0.1:{ports['worker_metrics']}/metrics"}}
    finally:
        for s in (gateway, scheduler, worker):
            s.stop()
        receiver.stop()


def _sse(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_one_trace_across_gateway_scheduler_and_worker(obs):
    name, receiver = obs["name"], obs["receiver"]
    trace_id, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    secret = f"confidential-{uuid.uuid4().hex}"
    body = {"model": name, "max_tokens": 6, "temperature": 0.5, "top_p": 0.9, "seed": 1,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Tell me about {secret}, " * 4}]}
    with httpx.stream("POST", obs["base"] + "/v1/chat/completions", json=body, timeout=60,
                      headers={"traceparent": f"00-{trace_id}-{client_span}-01"}) as r:
        assert r.status_code == 200
        chunks = _sse(r)
    usage = chunks[-1]["usage"]
    prompt, output = usage["prompt_tokens"], usage["completion_tokens"]
    assert output == 6 and prompt > 2 * CHUNK
    request_id = chunks[0]["id"]   # the chunk id is the request id (DESIGN.md §4: resumable)
    n_chunks = math.ceil(prompt / CHUNK)
    steps = n_chunks + output - 1   # the last prefill chunk samples the first token

    def complete(spans) -> bool:
        names = [s.name for s in spans]
        return (f"chat {name}" in names and "engine request" in names and "relay" in names
                and names.count("worker step") >= steps)

    spans = receiver.wait_for(complete, trace_id=trace_id)
    assert complete(spans), sorted(s.name for s in spans)
    by_name: dict[str, list] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    assert {s.service for s in spans} == {"tessera-gateway", "tessera-scheduler", "tessera-worker"}

    (call,) = by_name[f"chat {name}"]
    assert call.service == "tessera-gateway" and call.parent_id == client_span
    (relay,) = by_name["relay"]
    (engine,) = by_name["engine request"]
    assert relay.parent_id == call.span_id and engine.parent_id == call.span_id
    assert engine.service == "tessera-scheduler"
    for span in (call, engine):
        a = span.attrs
        assert a["gen_ai.request.model"] == name and a["gen_ai.request.max_tokens"] == 6
        assert a["gen_ai.request.temperature"] == 0.5 and a["gen_ai.request.top_p"] == 0.9
        assert a["gen_ai.usage.input_tokens"] == prompt
        assert a["gen_ai.usage.output_tokens"] == output
        assert a["gen_ai.response.finish_reasons"] == ("length",)
        assert a["gen_ai.response.id"] == request_id
    assert call.attrs["gen_ai.operation.name"] == "chat"
    assert call.attrs["http.response.status_code"] == 200
    e = engine.attrs
    assert e["tessera.request.time_in_queue_s"] >= 0
    assert e["tessera.request.time_to_first_token_s"] > 0
    assert e["tessera.request.prefix_cache_hit_tokens"] == 0 and e["tessera.request.preemptions"] == 0
    assert [ev for ev, _ in engine.events] == ["finish"]

    (queue,) = by_name["queue wait"]
    (prefill,) = by_name["prefill"]
    (decode,) = by_name["decode"]
    assert {queue.parent_id, prefill.parent_id, decode.parent_id} == {engine.span_id}
    chunk_events = [attrs for ev, attrs in prefill.events if ev == "prefill chunk"]
    assert len(chunk_events) == n_chunks
    assert sum(c["tessera.chunk.tokens"] for c in chunk_events) == prompt
    assert [c["tessera.chunk.start"] for c in chunk_events] == [i * CHUNK for i in range(n_chunks)]

    worker_steps = by_name["worker step"]
    assert {s.service for s in worker_steps} == {"tessera-worker"}
    assert len(worker_steps) == steps
    assert sum(s.parent_id == prefill.span_id for s in worker_steps) == n_chunks
    assert sum(s.parent_id == decode.span_id for s in worker_steps) == output - 1
    for s in worker_steps:   # linked to the request it served
        assert (trace_id, s.parent_id) in s.links

    # The gateway's log line for the request: JSON, with its ids; the prompt text is nowhere.
    lines = [json.loads(line) for line in obs["gateway"].log.read_text().splitlines()
             if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == request_id]
    assert mine and all(line["trace_id"] == trace_id for line in mine)
    assert any("finished length" in line["message"] for line in mine)
    for service in ("gateway", "scheduler", "worker"):
        assert secret not in obs[service].log.read_text()


def test_grpc_metadata_continues_the_trace(obs):
    from common.proto.tessera.v1 import generate_pb2, generate_pb2_grpc

    name, receiver = obs["name"], obs["receiver"]
    trace_id, client_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    request = generate_pb2.GenerateRequest(
        model=name, token_ids=generate_pb2.TokenIds(ids=list(range(20, 40))),
        params=generate_pb2.SamplingParams(max_tokens=3, ignore_eos=True))
    with grpc.insecure_channel(obs["grpc"]) as channel:
        reply = generate_pb2_grpc.GenerateStub(channel).Generate(
            request, timeout=60, metadata=[("traceparent", f"00-{trace_id}-{client_span}-01")])
    assert reply.usage.completion_tokens == 3

    def complete(spans) -> bool:
        return {"engine request", f"text_completion {name}"} <= {s.name for s in spans}

    spans = {s.name: s for s in receiver.wait_for(complete, trace_id=trace_id)}
    call = spans[f"text_completion {name}"]
    assert call.parent_id == client_span and call.service == "tessera-gateway"
    assert spans["engine request"].parent_id == call.span_id
    assert call.attrs["gen_ai.usage.output_tokens"] == 3
    assert call.attrs["gen_ai.usage.input_tokens"] == 20


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(url, timeout=10).text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))):
            s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _all_metrics(obs) -> dict[str, dict]:
    return {service: _scrape(url) for service, url in obs["metrics"].items()}


def _delta(before, after, service: str, sample: str, **labels) -> float:
    key = (sample, tuple(sorted(labels.items())))
    return after[service].get(key, 0.0) - before[service].get(key, 0.0)


def test_metrics_count_a_known_set_of_requests(obs):
    name, base = obs["name"], obs["base"]
    before = _all_metrics(obs)
    prompts = [list(range(10 + i, 50 + i * 8)) for i in range(3)]   # 40, 47, 54 tokens
    bodies = [{"prompt": p, "max_tokens": 4, "ignore_eos": True} for p in prompts]
    # The first prompt again (prefix-cache hits), stopped by whatever it samples first.
    bodies.append({"prompt": prompts[0], "max_tokens": 4, "stop_token_ids": list(range(512))})
    usages, reasons = [], []
    with httpx.Client(base_url=base, timeout=60) as client:
        for b in bodies:   # one at a time: every step is known
            r = client.post("/v1/completions", json={"model": name, "temperature": 0, **b})
            assert r.status_code == 200
            usages.append(r.json()["usage"])
            reasons.append(r.json()["choices"][0]["finish_reason"])
    assert reasons == ["length", "length", "length", "stop"]
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    output_tokens = sum(u["completion_tokens"] for u in usages)
    assert prompt_tokens == 40 + 47 + 54 + 40 and output_tokens == 3 * 4 + 1
    after = _all_metrics(obs)

    def d(service: str, sample: str, **labels) -> float:
        return _delta(before, after, service, sample, **labels)

    # gateway: what the clients saw
    assert d("gateway", "tessera:request_success_total", finished_reason="length") == 3
    assert d("gateway", "tessera:request_success_total", finished_reason="stop") == 1
    assert d("gateway", "tessera:time_to_first_token_seconds_count") == 4
    assert d("gateway", "tessera:e2e_request_latency_seconds_count") == 4
    assert d("gateway", "tessera:inter_token_latency_seconds_count") == output_tokens - 4
    # scheduler: the engine's counters, and one observation per request in each histogram
    assert d("scheduler", "tessera:prompt_tokens_total") == prompt_tokens
    assert d("scheduler", "tessera:generation_tokens_total") == output_tokens
    for h in ("request_queue_time_seconds", "request_prefill_time_seconds",
              "request_decode_time_seconds", "request_inference_time_seconds",
              "request_prompt_tokens", "request_generation_tokens"):
        assert d("scheduler", f"tessera:{h}_count") == 4, h
    assert d("scheduler", "tessera:request_prompt_tokens_sum") == prompt_tokens
    assert d("scheduler", "tessera:request_generation_tokens_sum") == output_tokens
    assert d("scheduler", "tessera:prefix_cache_hits_total") >= 32   # two full blocks of 16
    assert d("scheduler", "tessera:prefix_cache_queries_total") >= prompt_tokens
    assert d("scheduler", "tessera:num_preemptions_total") == 0
    s = after["scheduler"]
    assert s[("tessera:num_requests_running", ())] == 0
    assert s[("tessera:num_requests_waiting", ())] == 0
    assert s[("tessera:kv_cache_usage_perc", ())] == 0
    assert s[("tessera:request_queue_depth", ())] == 0
    assert s[("tessera:ready", ())] == 1
    # worker: at least the steps these requests needed (idle canaries add a few more); the
    # repeated prompt computes only what its two cached blocks do not hold
    hits = [0, 0, 0, 32]
    steps = sum(math.ceil((u["prompt_tokens"] - h) / CHUNK) + u["completion_tokens"] - 1
                for u, h in zip(usages, hits))
    assert d("worker", "tessera:worker_step_duration_seconds_count") >= steps
    assert d("worker", "tessera:worker_step_tokens_sum") >= \
        prompt_tokens - sum(hits) + output_tokens - len(usages)
    assert after["worker"][("tessera:worker_kv_cache_blocks", ())] > 0

    # Every series the Grafana dashboard queries is one some service exports.
    dashboard = json.loads((pathlib.Path(__file__).parents[1] / "k8s" / "observability"
                            / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exported = {sample for service in after.values() for sample, _ in service}
    queried = {name for e in exprs for name in re.findall(r"tessera:[a-z0-9_]+", e)}
    assert queried and queried <= exported, queried - exported


def test_a_standby_scheduler_is_live_and_ready_to_take_over(obs, tmp_path):
    """A second scheduler of the same group waits on the lease: live, and ready (a rolling
    update waits for new pods to be ready), but its gauge says it drives no group."""
    active = obs["scheduler"]
    port = free_port()
    argv = list(active.argv)
    argv[argv.index("--metrics-port") + 1] = str(port)
    standby = Proc("standby", argv, "waiting for the lease", active.env, tmp_path / "standby.log")
    standby.start().wait_ready(120)
    try:
        base = f"http://127.0.0.1:{port}"
        assert _wait(lambda: _get(base + "/health") == 200, BOUND)
        r = httpx.get(base + "/ready", timeout=5)
        assert r.status_code == 200 and r.json()["detail"].startswith("standby")
        assert _scrape(base + "/metrics")[("tessera:ready", ())] == 0
        assert _get(obs["metrics"]["scheduler"].removesuffix("/metrics") + "/ready") == 200
    finally:
        standby.stop()


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0   # no answer


def _wait(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_readiness_follows_the_worker_and_liveness_stays(obs):
    worker, base, name = obs["worker"], obs["base"], obs["name"]
    sched = obs["metrics"]["scheduler"].removesuffix("/metrics")
    worker_http = obs["metrics"]["worker"].removesuffix("/metrics")
    channel = grpc.insecure_channel(obs["grpc"])
    health = health_pb2_grpc.HealthStub(channel)

    def grpc_status(service: str) -> int:
        return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

    def ready() -> bool:
        return _get(sched + "/ready") == 200 and _get(base + "/ready") == 200

    def not_ready() -> bool:
        return _get(sched + "/ready") == 503 and _get(base + "/ready") == 503

    def alive() -> bool:
        return (_get(sched + "/health") == 200 and _get(base + "/health") == 200
                and grpc_status("") == health_pb2.HealthCheckResponse.SERVING)

    assert _wait(ready, BOUND) and _get(worker_http + "/ready") == 200
    assert grpc_status("tessera.v1.Generate") == health_pb2.HealthCheckResponse.SERVING

    # A stopped (wedged) worker: the idle canary cannot finish, readiness turns false.
    worker.send_signal(signal.SIGSTOP)
    try:
        assert _wait(not_ready, BOUND), "readiness still true with the worker stopped"
        assert grpc_status("tessera.v1.Generate") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert alive()
    finally:
        worker.send_signal(signal.SIGCONT)
    assert _wait(ready, BOUND + 5), "readiness did not come back after SIGCONT"

    # A killed worker, then a new process on the same port: re-warmed, ready again.
    worker.kill()
    worker.wait()
    assert _wait(not_ready, BOUND), "readiness still true with the worker dead"
    assert alive()
    worker.start().wait_ready(120)
    assert _wait(ready, BOUND + 5), "readiness did not come back with the restarted worker"
    assert _wait(lambda: _get(worker_http + "/ready") == 200, BOUND)
    channel.close()
    r = httpx.post(base + "/v1/completions", json={"model": name, "prompt": [1, 2, 3],
                                                   "max_tokens": 3, "ignore_eos": True},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
