"""The scheduler service as a real process: Redis in, a real worker process behind gRPC, token
events out. Requests are submitted and read with the gateway's own Redis module."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid

import pytest
import redis
import redis.asyncio as aioredis

from common.redis_schema import QueuedRequest, worker_heartbeat, workers_registry
from common.sampling_params import SamplingParams
from gateway.queue import RequestSubmitter
from cli_procs import start_cli
from tessera.procs import free_port
from tessera import LLM

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def stack(tiny_model, redis_url):
    model_dir = str(tiny_model("llama"))
    name = f"svc-{uuid.uuid4().hex[:8]}"
    port = free_port()
    worker = start_cli(["worker", "--model", model_dir, "--port", str(port),
                     "--kv-cache-memory-gb", "0.01", "--redis-url", redis_url,
                     "--served-model-name", name, "--worker-id", "w0", "--metrics-port", "0"],
                    "worker ready")
    sched = start_cli(["scheduler", "--model", model_dir, "--workers", f"127.0.0.1:{port}",
                    "--redis-url", redis_url, "--served-model-name", name,
                    "--max-num-batched-tokens", "128", "--step-timeout", "5",
                    "--metrics-port", "0"], "scheduler ready")
    yield model_dir, name, redis_url, worker, sched
    for p in (sched, worker):
        p.terminate()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


async def _run(redis_url, name, prompts, params, cancel_after=None, deadline=None):
    client = aioredis.from_url(redis_url)
    sub = RequestSubmitter(client)
    ids = [await sub.submit(QueuedRequest(f"r-{uuid.uuid4().hex}", name, p, params,
                                          deadline=deadline)) for p in prompts]

    async def collect(rid):
        tokens, events, cancelled = [], [], False
        async for ev in sub.events(rid, block_ms=200):
            events.append(ev)
            tokens.extend(ev.token_ids)
            if cancel_after is not None and len(tokens) >= cancel_after and not cancelled:
                await sub.cancel(rid)
                cancelled = True
        return tokens, events

    results = await asyncio.wait_for(asyncio.gather(*(collect(r) for r in ids)), 120)
    await client.aclose()
    return results


def test_requests_through_redis_match_the_offline_engine(stack):
    model_dir, name, redis_url, _, _ = stack
    prompts = [list(range(7, 7 + n)) for n in (1, 20, 150, 64, 33, 90)]
    results = asyncio.run(_run(redis_url, name, prompts, GREEDY))
    expected = LLM(model_dir, num_kv_blocks=128).generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for (tokens, events), exp in zip(results, expected):
        assert tokens == exp.outputs[0].token_ids
        assert [e.index for e in events] == list(range(len(events)))
        assert events[-1].final and events[-1].finish_reason == "length"


def test_n_sequences_and_cancel(stack):
    _, name, redis_url, _, _ = stack
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=6, ignore_eos=True)
    [(tokens, events)] = asyncio.run(_run(redis_url, name, [list(range(40))], params))
    assert {e.seq_index for e in events} == {0, 1} and len(tokens) == 12
    assert sum(e.finish_reason == "length" for e in events) == 2 and events[-1].final
    long = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)
    [(tokens, events)] = asyncio.run(_run(redis_url, name, [list(range(30))], long, cancel_after=3))
    assert events[-1].finish_reason == "abort" and events[-1].final and len(tokens) < 1000
    # the cancelled request's KV blocks are free again (the scheduler's per-step gauges)
    stats = asyncio.run(_stats(redis_url, name))
    assert stats[b"kv_blocks_in_use"] == b"0" and stats[b"running"] == b"0"


async def _stats(redis_url, name):
    from common.redis_schema import scheduler_stats

    client = aioredis.from_url(redis_url)
    try:
        return await client.hgetall(scheduler_stats(name, "0"))
    finally:
        await client.aclose()


def test_dead_worker_fails_requests_past_their_deadline_and_scheduler_survives(stack):
    """The worker dies and nobody restarts it: a request waits for the group (no error) until
    its deadline (the per-request field; --request-timeout otherwise), then fails with a
    message that says why; the scheduler lives on."""
    _, name, redis_url, worker, sched = stack
    r = redis.Redis.from_url(redis_url)
    heartbeat = worker_heartbeat(name, "w0")
    assert r.get(heartbeat) is not None and r.hexists(workers_registry(name), "w0")
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 10          # the heartbeat key expires (TTL 5 s)
    while r.get(heartbeat) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert r.get(heartbeat) is None
    submitted = time.time()
    [(tokens, events)] = asyncio.run(_run(redis_url, name, [list(range(20))], GREEDY,
                                          deadline=submitted + 4))
    assert time.time() >= submitted + 4, "no error before the deadline"
    assert events[-1].final and events[-1].finish_reason == "error" and not tokens
    assert "did not come back before the request's deadline" in events[-1].error
    assert sched.poll() is None, "the scheduler keeps running"
