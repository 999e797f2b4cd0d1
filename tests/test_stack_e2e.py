"""End to end through `tessera serve`: real redis-server, worker, scheduler and gateway
processes, driven over HTTP (the official `openai` package) and gRPC (our client library)."""

from __future__ import annotations

import asyncio
import ctypes.util
import os
import re
import signal
import time

import httpx
import pytest
import redis

from common.redis_schema import scheduler_stats
from cli_procs import start_serve
from tessera.procs import free_port
from tessera import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "def main():\n    return", "Once upon a time, in a land far"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(tiny_model):
    model_dir = str(tiny_model("llama"))
    http, grpc_port = free_port(), free_port()
    proc, lines = start_serve(["--model", model_dir, "--http-port", str(http), "--grpc-port",
                               str(grpc_port), "--kv-cache-memory-gb", "0.05",
                               "--max-num-batched-tokens", "256"], timeout=180)
    redis_url = next(l.split()[-1] for l in lines if l.strip().startswith("Redis"))
    metrics = re.findall(r"(http://\S+/metrics) \((\w+)\)",
                         next(l for l in lines if l.strip().startswith("Metrics")))
    yield model_dir, os.path.basename(model_dir), f"http://127.0.0.1:{http}", \
        f"127.0.0.1:{grpc_port}", redis_url, {service: url for url, service in metrics}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, "serve stops every process cleanly on SIGTERM"


@pytest.fixture(scope="module")
def offline(served):
    model_dir = served[0]
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.outputs[0].text for o in LLM(model_dir, num_kv_blocks=64).generate(PROMPTS, params,
                                                                                use_tqdm=False)]


def test_openai_completions_chat_and_streaming(served, offline):
    from openai import OpenAI

    _, name, base, _, _, _ = served
    client = OpenAI(base_url=base + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == [name]
    for prompt, expected in zip(PROMPTS, offline):
        out = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected and out.usage.completion_tokens == MAX_TOKENS
        stream = client.completions.create(model=name, prompt=prompt, max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected
    chat = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 5
    chunks = list(client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
        stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        chat.choices[0].message.content
    with pytest.raises(Exception) as err:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert getattr(err.value, "status_code", None) == 404


def test_grpc_client_matches_http(served, offline):
    from tessera.client import TesseraClient

    _, _, _, grpc_address, _, _ = served
    client = TesseraClient(grpc_address)
    result = client.generate(PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    assert result.choices[0].text == offline[0]


def test_64_concurrent_streams_and_disconnect_frees_blocks(served):
    _, name, base, _, redis_url, _ = served

    async def stream(client, i):
        body = {"model": name, "prompt": [5 + i % 50] * (8 + i), "max_tokens": 8,
                "temperature": 0, "ignore_eos": True, "stream": True}
        done = False
        async with client.stream("POST", base + "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                done = done or line == "data: [DONE]"
        return done

    async def run_all():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=80)) as c:
            return await asyncio.gather(*(stream(c, i) for i in range(64)))

    assert all(asyncio.run(run_all()))

    async def abandon():   # read a few chunks of a long stream, then hang up
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"model": name, "prompt": "a long one", "max_tokens": 1000, "ignore_eos": True,
                    "stream": True}
            async with c.stream("POST", base + "/v1/completions", json=body) as r:
                n = 0
                async for _ in r.aiter_lines():
                    n += 1
                    if n > 6:
                        break

    asyncio.run(abandon())
    r = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = r.hgetall(scheduler_stats(name, "0"))
        if stats.get(b"running") == b"0" and stats.get(b"kv_blocks_in_use") == b"0":
            break
        time.sleep(0.2)
    assert stats[b"running"] == b"0" and stats[b"kv_blocks_in_use"] == b"0"


@pytest.mark.parametrize("body,status", [
    (b"{not json", 400),
    (b'{"model": "M", "prompt": "x", "max_tokens": -1}', 400),
    (b'{"model": "M", "prompt": "x", "top_p": 7}', 400),
    (b'{"model": "M", "prompt": 5}', 400),
    (b'{"model": "M", "prompt": "x", "max_tokens": 100000}', 400),
    (b'{"model": "nope", "prompt": "x"}', 404),
    (b'{"model": "M", "prompt": "' + b"x" * (5 << 20) + b'"}', 413),
])
def test_bad_input_gets_an_openai_error_and_the_stack_keeps_serving(served, body, status):
    _, name, base, _, _, _ = served
    r = httpx.post(base + "/v1/completions", content=body.replace(b'"M"', f'"{name}"'.encode()),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status
    assert set(r.json()["error"]) >= {"message", "type", "param", "code"}
    ok = httpx.post(base + "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2},
                    timeout=30)
    assert ok.status_code == 200


def test_every_service_of_serve_answers_metrics_and_probes(served):
    from prometheus_client.parser import text_string_to_metric_families

    _, name, _, _, _, metrics = served
    assert set(metrics) == {"gateway", "scheduler", "worker"}
    for service, url in metrics.items():
        text = httpx.get(url, timeout=10).text
        families = {f.name for f in text_string_to_metric_families(text)}
        expected = {"gateway": "tessera:time_to_first_token_seconds",
                    "scheduler": "tessera:num_requests_running",
                    "worker": "tessera:worker_step_duration_seconds"}[service]
        assert expected in families, service
        base = url.removesuffix("/metrics")
        assert httpx.get(base + "/health", timeout=10).status_code == 200
        assert httpx.get(base + "/ready", timeout=10).status_code == 200, service


def _processes_of(model_dir: str) -> dict[str, list[int]]:
    """pids of this stack's processes, by role (the word after tessera.cli)."""
    roles: dict[str, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().decode().split("\0")
        except OSError:
            continue
        if "tessera.cli" in argv and model_dir in argv:
            roles.setdefault(argv[argv.index("tessera.cli") + 1], []).append(int(entry))
    return roles


@pytest.mark.skipif(ctypes.util.find_library("tcmalloc_minimal") is None or
                    "LD_PRELOAD" in os.environ, reason="libtcmalloc-minimal4 not installed, "
                    "or LD_PRELOAD set by the user (which wins)")
def test_serve_runs_its_cpu_workers_on_tcmalloc(served):
    roles = _processes_of(served[0])
    assert set(roles) >= {"worker", "scheduler", "gateway"}, roles

    def mapped(pid: int) -> bool:
        return "libtcmalloc_minimal" in open(f"/proc/{pid}/maps").read()

    assert all(mapped(pid) for pid in roles["worker"])
    assert not any(mapped(pid) for pid in roles["gateway"] + roles["scheduler"])


def test_the_benchmarks_lean_client_reads_the_stack_as_httpx_does(served):
    """benchmarks/sse_client.py (serving_overhead's load generator) against the real gateway:
    the same completion tokens as the usage httpx reads, and the gateway's error bodies."""
    from benchmarks.serving_overhead import body, stream_one
    from benchmarks.sse_client import stream_completion

    _, name, base, *_ = served
    url = base + "/v1/completions"

    async def both():
        request = body(name, [5, 6, 7, 8], MAX_TOKENS)
        async with httpx.AsyncClient(timeout=60) as client:
            return [await stream_one(client, url, request),
                    await stream_completion(base, request, 60)]

    (ttft_httpx, n_httpx), (ttft_raw, n_raw) = asyncio.run(both())
    assert n_httpx == n_raw == MAX_TOKENS
    assert 0 < ttft_raw < 60 and 0 < ttft_httpx < 60
    with pytest.raises(RuntimeError, match=r"HTTP 400: .*max_tokens"):
        asyncio.run(stream_completion(base, body(name, [5, 6], -1), 60))
