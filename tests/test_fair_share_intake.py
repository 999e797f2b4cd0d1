"""Fair share beyond the read window, as a narrative in steps: the real engine loop, a real
redis-server and a real model (the offline engine's local executor) with a KV cache that
holds 4 requests while max_num_seqs is 8.

Tenant A floods 24 requests into Redis; after 2 steps (the KV cache is full, later requests
wait for blocks) tenant B sends 3. With the read window alone (max_waiting_requests=0) the
scheduler reads nothing while it waits for blocks, and B's requests wait in the FIFO stream
behind 16 of A's. A scheduler whose group is the model's only one reads on into its waiting
queue, where fair share puts B's next; the requests read but not started stay durable: they
are in the consumer group's pending list, and another scheduler claims and finishes them.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis

from common import redis_schema as schema
from common.model_config import ModelConfig
from common.redis_schema import QueuedRequest
from common.sampling_params import SamplingParams
from gateway.queue import RequestSubmitter
from scheduler.engine_core import EngineCore
from scheduler.loop import EngineLoop
from scheduler.queue import RequestQueue
from scheduler.scheduler import SchedulerConfig
from tessera.engine import LocalExecutor
from worker.runner import ModelRunner
from worker.worker import Worker

NUM_BLOCKS, BLOCK = 12, 16          # 4 requests of 36 tokens (3 blocks each) at once
MAX_NUM_SEQS = 8                    # the read window is larger than what the cache holds
PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
FLOOD, LATER = 24, 3


def _prompt(i: int) -> list[int]:
    return [1 + i] + list(range(40, 71))   # 32 tokens; a first block of its own: no cache hit


@pytest.fixture
def executor(tiny_model):
    config = ModelConfig.from_dir(tiny_model("llama"))
    return LocalExecutor(Worker(ModelRunner(config, "float32", NUM_BLOCKS, BLOCK, "cpu")))


def _loop(client, model: str, consumer: str, executor, max_waiting: int) -> EngineLoop:
    core = EngineCore(SchedulerConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK,
                                      max_num_seqs=MAX_NUM_SEQS, max_num_batched_tokens=64,
                                      max_model_len=512))
    return EngineLoop(core, executor, RequestQueue(client, model, consumer), group="0",
                      stats_key=schema.scheduler_stats(model, "0"),
                      max_waiting_requests=max_waiting)


async def _ready(client, model: str, group: str) -> None:
    """What scheduler.health.publish_readiness writes for a ready group."""
    await client.set(schema.scheduler_ready(model, group), "1", px=60_000)
    await client.sadd(schema.ready_groups(model), group)


class Narrative:
    """Drives one loop step by step, noting the step of each request's first token."""

    def __init__(self, loop: EngineLoop) -> None:
        self.loop, self.steps, self.first = loop, 0, {}
        stage = loop._stage

        def staged(events) -> None:   # a step's events, as the loop stages them
            for req, ev in events:
                if ev.index == 0 and ev.token_ids:
                    self.first.setdefault(req.request_id.split("-", 1)[0], self.steps)
            stage(events)
        loop._stage = staged

    async def step(self) -> None:
        await self.loop._exchanged()      # the exchange the last step started
        await self.loop._exchange(None)   # and one now: requests submitted since are read
        self.steps += 1
        if self.loop.core.has_unfinished:
            await self.loop.step()


async def _submit(sub: RequestSubmitter, model: str, tenant: str, n: int, start: int = 0):
    """Request ids "a0-MODEL"...: unique per run (records and output streams outlive it)."""
    return [await sub.submit(QueuedRequest(f"{tenant}{i}-{model}", model, _prompt(start + i),
                                           PARAMS, tenant=tenant)) for i in range(n)]


def _first_token_steps(redis_url: str, executor, max_waiting: int) -> tuple[dict, int, dict]:
    async def main():
        executor.reset()
        client = aioredis.from_url(redis_url)
        model = f"intake-{uuid.uuid4().hex[:6]}"
        sub = RequestSubmitter(client)
        loop = _loop(client, model, "c0", executor, max_waiting)
        await loop.queue.ensure_group()
        await _ready(client, model, "0")
        assert await loop.check_peers(), "the model's only group"
        story = Narrative(loop)
        await _submit(sub, model, "a", FLOOD)
        for _ in range(2):
            await story.step()
        arrived = story.steps
        await _submit(sub, model, "b", LATER, start=FLOOD)
        await story.step()
        stream = schema.requests_stream(model)
        pending = await client.xpending(stream, schema.SCHEDULERS_GROUP)
        await loop.queue.publish([], stats=loop._stats())   # the gauges the next exchange sends
        seen = {"read": len(loop.core.requests), "pending": pending["pending"],
                "held": loop.held, "queue_depth": await sub.queue_depth(model)}
        for _ in range(3):
            await story.step()
        # Another group of the model appears: past the window, requests stay in Redis for it.
        await _ready(client, model, "1")
        assert not await loop.check_peers()
        window = max(MAX_NUM_SEQS - loop.core.num_running - loop.core.num_waiting, 0)
        seen["room_with_a_peer"] = (loop._admission_room(), 0 if loop.core.scheduler
                                    .waiting_for_blocks else window)
        while len(story.first) < FLOOD + LATER and story.steps < 1000:
            await story.step()
        await loop._exchanged()
        await loop._exchange(None)
        await client.aclose()
        return story.first, arrived, seen

    return asyncio.run(main())


def test_a_later_tenant_is_served_before_a_flood_that_exceeds_the_kv_cache(redis_url,
                                                                           executor) -> None:
    fair, arrived, seen = _first_token_steps(redis_url, executor, max_waiting=64)
    assert len(fair) == FLOOD + LATER
    # Read past the window (all of A's and B's), every one of them pending in Redis until done.
    assert seen["read"] == seen["pending"] > MAX_NUM_SEQS
    # ...and still counted as queued by the gateway's admission (stream lag + held back).
    assert seen["queue_depth"] == seen["held"] == seen["read"] - MAX_NUM_SEQS
    assert seen["room_with_a_peer"][0] == seen["room_with_a_peer"][1]
    b_last = max(fair[f"b{i}"] for i in range(LATER))
    a_before_b = sum(fair[f"a{i}"] <= b_last for i in range(FLOOD))
    # B's 3 come next, as the first blocks free up: only a few of A's started before them.
    assert b_last > arrived and a_before_b <= 8, (fair, arrived)

    fifo, arrived, seen = _first_token_steps(redis_url, executor, max_waiting=0)
    assert seen["read"] <= MAX_NUM_SEQS
    b_first = min(fifo[f"b{i}"] for i in range(LATER))
    # The window alone: B waits in the stream behind the 16 A requests not yet read.
    a_before_b_fifo = sum(fifo[f"a{i}"] < b_first for i in range(FLOOD))
    assert a_before_b_fifo >= FLOOD - MAX_NUM_SEQS
    print(f"A requests started before B's last first token: {a_before_b} with the deep read, "
          f"{a_before_b_fifo} (before B's first) with the window alone, of {FLOOD}")


def test_requests_read_but_not_started_survive_their_scheduler(redis_url, executor) -> None:
    async def main():
        executor.reset()
        client = aioredis.from_url(redis_url)
        model = f"intake-{uuid.uuid4().hex[:6]}"
        sub = RequestSubmitter(client)
        first = _loop(client, model, "dies", executor, max_waiting=64)
        await first.queue.ensure_group()
        await _ready(client, model, "0")
        assert await first.check_peers()
        ids = await _submit(sub, model, "a", FLOOD)
        story = Narrative(first)
        for _ in range(3):
            await story.step()
        await first._exchanged()
        await first._exchange(None)   # what it computed is out; it dies holding the rest
        held = len(first.core.requests)
        started = sum(1 for r in first.core.requests.values() if r.next_index > 0)
        executor.reset()   # a new scheduler resets its workers first
        second = _loop(client, model, "takes-over", executor, max_waiting=64)
        claimed = await second.recovery.claim(0)
        story = Narrative(second)
        while second.core.has_unfinished and story.steps < 1000:
            await story.step()
        await second._exchanged()
        await second._exchange(None)
        events = {r: [e async for e in sub.events(r, block_ms=200)] for r in ids}
        await client.aclose()
        return held, started, claimed, events

    held, started, claimed, events = asyncio.run(main())
    assert held > MAX_NUM_SEQS and started < held   # most of them were only read, not started
    assert claimed == held
    for rid, evs in events.items():
        assert [e.index for e in evs] == list(range(len(evs))), rid   # none lost, none twice
        assert sum(len(e.token_ids) for e in evs) == PARAMS.max_tokens and evs[-1].final, rid
