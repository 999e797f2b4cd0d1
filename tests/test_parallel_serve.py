"""Sharded and data-parallel serving through real processes: `tessera serve` with worker
groups, and a group that loses a worker."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from common.redis_schema import QueuedRequest, scheduler_stats
from gateway.queue import RequestSubmitter
from cli_procs import listed, start_cli, start_serve
from tessera.procs import free_port
from tessera import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "def main():\n    return", "Once upon a time, in a land far",
           "import numpy as np\n", "SELECT * FROM"]
MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def _serve(model_dir: str, *flags: str):
    http = free_port()
    proc, lines = start_serve(["--model", model_dir, "--http-port", str(http), "--grpc-port",
                               str(free_port()), "--kv-cache-memory-gb", "0.01", *flags])
    return proc, f"http://127.0.0.1:{http}", listed(lines, "Redis")


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, "serve stops every process cleanly"


@pytest.fixture(scope="module")
def offline(tiny_model):
    model_dir = str(tiny_model("llama"))
    outs = LLM(model_dir, num_kv_blocks=64).generate(PROMPTS, GREEDY, use_tqdm=False)
    return model_dir, [o.outputs[0].text for o in outs]


async def _complete_all(base: str, name: str, prompts: list[str]) -> list[str]:
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:
        async def one(prompt: str) -> str:
            r = await client.post("/v1/completions", json={
                "model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        return await asyncio.gather(*(one(p) for p in prompts))


@pytest.mark.parametrize("flags", [("-tp", "2"), ("-pp", "2"), ("-tp", "2", "-pp", "2")],
                         ids=["tp2", "pp2", "tp2xpp2"])
def test_sharded_serve_matches_the_single_worker_engine(offline, flags):
    model_dir, expected = offline
    proc, base, _ = _serve(model_dir, *flags)
    try:
        texts = asyncio.run(_complete_all(base, os.path.basename(model_dir), PROMPTS))
        assert texts == expected
    finally:
        _stop(proc)


def test_data_parallel_groups_share_the_request_stream(offline):
    model_dir, expected = offline
    name = os.path.basename(model_dir)
    # max-num-seqs 8 per group: 40 requests cannot all land on one group at once.
    proc, base, redis_url = _serve(model_dir, "-dp", "2", "--max-num-seqs", "8")
    try:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(40)]
        texts = asyncio.run(_complete_all(base, name, prompts))
        assert texts == [expected[i % len(PROMPTS)] for i in range(40)]
        r = redis.Redis.from_url(redis_url)
        steps = [int(r.hget(scheduler_stats(name, g), "steps") or 0) for g in ("0", "1")]
        assert all(s > 0 for s in steps), f"both groups took work: steps {steps}"
    finally:
        _stop(proc)


async def _generate(redis_url: str, name: str, params: SamplingParams, on_first=None):
    client = aioredis.from_url(redis_url)
    sub = RequestSubmitter(client)
    rid = await sub.submit(QueuedRequest(f"r-{uuid.uuid4().hex}", name, list(range(5, 25)), params))
    events = []
    async for ev in sub.events(rid, block_ms=200):
        events.append(ev)
        if on_first is not None and len(events) == 1:
            on_first()
    await client.aclose()
    return events


def test_a_dead_group_member_keeps_its_request_and_a_restarted_group_finishes_it(
        tiny_model, redis_url):
    """A group meeting through Redis loses rank 1 mid-request: the survivor exits for a
    restart and the scheduler keeps the request (no error event); once the group is restarted
    (what Kubernetes does), the scheduler warms it up again, resets it and recomputes the
    request from its tokens: it ends as in the fault-free run, its indices contiguous."""
    model_dir = str(tiny_model("llama"))
    name = f"dead-{uuid.uuid4().hex[:8]}"
    ports = [free_port(), free_port()]

    def start_group() -> list[subprocess.Popen]:
        # No --dist-init-addr: rank 0 publishes its TCP store's address in Redis (rank 1
        # starts first and waits for it).
        return [subprocess.Popen(
            [sys.executable, "-m", "tessera.cli", "worker", "--model", model_dir, "--port",
             str(port), "--kv-cache-memory-gb", "0.01", "--tensor-parallel-size", "2", "--rank",
             str(rank), "--redis-url", redis_url, "--served-model-name", name, "--group", "g0",
             "--dist-timeout", "20", "--metrics-port", "0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for rank, port in reversed(list(enumerate(ports)))][::-1]
    workers = start_group()
    sched = start_cli(["scheduler", "--model", model_dir, "--redis-url", redis_url,
                    "--served-model-name", name, "--group", "g0", "--tensor-parallel-size", "2",
                    "--metrics-port", "0", "--workers",
                    ",".join(f"127.0.0.1:{p}" for p in ports), "--step-timeout", "10"],
                   "scheduler ready")
    try:
        long = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
        reference = asyncio.run(asyncio.wait_for(_generate(redis_url, name, long), 120))
        restarted = threading.Event()

        def kill_and_restart() -> None:
            workers[1].kill()
            # The surviving rank cannot repair its process group: it exits for a restart.
            assert workers[0].wait(timeout=60) != 0
            workers[:] = start_group()   # the supervisor restarts the group
            restarted.set()

        killer = threading.Thread(target=kill_and_restart)
        events = asyncio.run(asyncio.wait_for(
            _generate(redis_url, name, long, on_first=killer.start), 240))
        killer.join(60)
        assert restarted.is_set(), "the group died and came back while the request ran"
        assert [e.index for e in events] == list(range(len(events)))
        assert events[-1].final and events[-1].finish_reason == "length", events[-1].error
        assert [t for e in events for t in e.token_ids] == \
            [t for e in reference for t in e.token_ids]
        assert sched.poll() is None
    finally:
        for p in (sched, *workers):
            p.kill()
            p.wait()
