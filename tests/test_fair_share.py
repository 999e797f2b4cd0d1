"""Fair share between tenants (scheduler.fair_share), as a CPU narrative over the engine core,
and end to end: a tenant that floods the queue does not starve one that comes later.

The narrative counts steps, not seconds: tenant A submits 60 requests, B submits 6 after A's
first step. FCFS would give B its first token only after every A prompt was computed; fair
share serves B at its weight's rate from the step after it arrives.
"""

from __future__ import annotations

import json
import statistics
import time

import pytest

from common.sampling_params import SamplingParams
from common.step import SampledToken, StepOutput
from scheduler.engine_core import EngineCore, EngineRequest
from scheduler.fair_share import FairShare
from scheduler.scheduler import SchedulerConfig

PROMPT = list(range(1, 33))          # 32 tokens
BUDGET = 128                         # 4 prompts per step


def _step(core: EngineCore) -> list[str]:
    """One step with a scripted model (token 7 after every prompt): the request ids whose
    first token came out of it."""
    plan = core.schedule()
    out = StepOutput(plan.step_id)
    seqs = core.scheduler.requests
    for s in (*plan.new, *plan.running):
        seq = seqs[s.seq_id]
        if seq.num_computed_tokens + s.num_scheduled_tokens == seq.num_tokens:
            out.sampled[s.seq_id] = SampledToken(7)
    return [req.request_id for req, ev in core.update(plan, out) if ev.index == 0 and ev.token_ids]


def _first_token_steps(tenant_b: str, weight_b: float = 1.0) -> dict[str, int]:
    core = EngineCore(SchedulerConfig(num_blocks=4096, block_size=16, max_num_seqs=256,
                                      max_num_batched_tokens=BUDGET, max_model_len=1024))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for i in range(60):
        core.add_request(EngineRequest(f"a{i}", PROMPT, params, tenant="A"))
    first: dict[str, int] = {}
    for rid in _step(core):
        first[rid] = 1
    for i in range(6):
        core.add_request(EngineRequest(f"b{i}", PROMPT, params, tenant=tenant_b, weight=weight_b))
    step = 1
    while core.has_unfinished:
        step += 1
        for rid in _step(core):
            first.setdefault(rid, step)
    return first


def test_a_later_tenant_is_served_at_once_not_after_the_flood() -> None:
    fair = _first_token_steps("B")
    b_steps = sorted(fair[f"b{i}"] for i in range(6))
    a_last = max(fair[f"a{i}"] for i in range(60))
    # Equal weights: B and A alternate from step 2, so B's 6 prompts are done by step 4,
    # long before A's 60 (which take 15+ steps of 4 prompts each).
    assert b_steps[-1] <= 5 < a_last
    # The same arrivals from one tenant are FCFS: the "B" requests wait behind all of A.
    fifo = _first_token_steps("A")
    assert min(fifo[f"b{i}"] for i in range(6)) >= max(fifo[f"a{i}"] for i in range(60))


def test_weight_sets_the_share() -> None:
    heavy = _first_token_steps("B", weight_b=4.0)
    light = _first_token_steps("B", weight_b=0.25)
    assert max(heavy[f"b{i}"] for i in range(6)) < max(light[f"b{i}"] for i in range(6))


def test_one_tenant_keeps_fcfs_order() -> None:
    fs = FairShare()
    tags = [fs.tag("", 1.0, c) for c in (10, 500, 3, 3, 1000)]
    assert tags == sorted(tags) and len(set(tags)) == len(tags)


def test_a_flooding_tenant_does_not_starve_another_through_the_stack(tmp_path, tiny_model):
    """Real processes: tenant A floods 200 requests of long prompts (prefill-bound: one prompt
    per step), tenant B sends 10 just after; B's requests all get their first token while A's
    flood is still being prefilled (FCFS would put all of B last). The TTFTs are printed, not
    asserted on (wall clock)."""
    import asyncio

    import httpx
    import redis.asyncio as aioredis
    from cli_procs import listed, start_serve

    from common import redis_schema as schema

    from gateway.auth import hash_key
    from tessera.procs import free_port

    keys = {"A": "sk-flood-a", "B": "sk-flood-b"}
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"tenants": [
        {"name": n, "api_key_sha256": hash_key(k)} for n, k in keys.items()]}))
    model = tiny_model("llama")
    http = free_port()
    proc, lines = start_serve(["--model", str(model), "--tenants", str(tenants),
                           "--http-port", str(http), "--grpc-port", str(free_port()),
                           "--max-num-batched-tokens", "32"])
    url = f"http://127.0.0.1:{http}/v1/completions"
    prompt = list(range(5, 155))   # 150 token ids: ~5 steps of 32 tokens each, one prompt at a time

    async def one(client: httpx.AsyncClient, tenant: str) -> tuple[float, float]:
        t0 = time.monotonic()
        first = None
        async with client.stream("POST", url, headers={"Authorization": f"Bearer {keys[tenant]}"},
                                 json={"prompt": prompt, "max_tokens": 2, "temperature": 0,
                                       "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.monotonic()
        return t0, first

    r = aioredis.from_url(listed(lines, "Redis"))

    async def run() -> tuple[list, list]:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            flood = [asyncio.ensure_future(one(client, "A")) for _ in range(200)]
            # B comes once (nearly) the whole flood is in Redis, behind it in the stream.
            stream = schema.requests_stream(model.name)
            deadline = time.monotonic() + 120
            # Counted as added, not as queued now: finished entries leave the stream.
            while time.monotonic() < deadline:
                info = await r.xinfo_stream(stream) if await r.exists(stream) else {}
                if info.get("entries-added", 0) >= 195:
                    break
                await asyncio.sleep(0.05)
            later = [asyncio.ensure_future(one(client, "B")) for _ in range(10)]
            return await asyncio.gather(*flood), await asyncio.gather(*later)

    try:
        a, b = asyncio.run(run())
    finally:
        proc.stop()
    # Of the flood still waiting for its first token when B was sent, B is through before
    # half (FCFS: after all of it). Counted from B's send, not from the flood's start: the
    # time B takes through the gateway into Redis is not the scheduler's to order.
    b_sent = min(t0 for t0, _ in b)
    a_left = sorted(t1 for _, t1 in a if t1 > b_sent)
    print(f"flood left when B was sent: {len(a_left)}; A first tokens before B's last: "
          f"{sum(t1 < max(t for _, t in b) for _, t1 in a)}")
    assert len(a_left) >= 50, f"the flood was nearly through before B was sent ({len(a_left)} left)"
    assert max(t1 for _, t1 in b) < a_left[len(a_left) // 2]
    print(f"median TTFT: B {statistics.median(t1 - t0 for t0, t1 in b):.2f} s, "
          f"A {statistics.median(t1 - t0 for t0, t1 in a):.2f} s")
