"""The gateway's one XREAD for every relay (gateway.stream_reader) against a real redis-server:
each relay gets its request's events exactly once and in order, in far fewer round trips than
one read per event; two relays of one request, a slow relay and a relay that starts while the
reader blocks on other streams get all theirs."""

from __future__ import annotations

import asyncio

from redis_server import counting_client

import redis.asyncio as aioredis

from common.redis_schema import OutputEvent, RedisLimits
from gateway.queue import RequestSubmitter
from gateway.stream_reader import MAX_BUFFERED
from scheduler.queue import RequestQueue
from test_redis_queue import make_request, new_model

LIMITS = RedisLimits(finished_ttl_s=30.0)


async def _setup(url: str):
    model = new_model()
    sched_client = aioredis.from_url(url)
    queue = RequestQueue(sched_client, model, "s1", LIMITS)
    await queue.ensure_group()
    gw_client, counter = counting_client(url)
    return sched_client, queue, gw_client, counter, RequestSubmitter(gw_client, LIMITS), model


async def _submit(sub: RequestSubmitter, queue: RequestQueue, model: str, n: int) -> list[str]:
    rids = [await sub.submit(make_request(model)) for _ in range(n)]
    assert len(await queue.read_new(n)) == n   # running: the relays block for events
    return rids


def _indices(events: list[OutputEvent]) -> list[int]:
    return [e.index for e in events]


def test_many_relays_share_one_read_and_get_every_event_once(redis_url: str) -> None:
    async def main() -> None:
        sched, queue, gw, counter, sub, model = await _setup(redis_url)
        n, steps = 24, 12
        rids = await _submit(sub, queue, model, n)
        relays = [asyncio.ensure_future(_collect(sub, rid)) for rid in rids]
        await asyncio.sleep(0.2)   # every relay waits in the shared read
        before = counter.writes
        for step in range(steps):   # one publish per step for all requests, as a scheduler
            final = step == steps - 1
            await queue.publish([(rid, OutputEvent(step, [step], finish_reason="length"
                                                   if final else None, final=final))
                                 for rid in rids])
            await asyncio.sleep(0.01)
        got = await asyncio.wait_for(asyncio.gather(*relays), 60)
        for events in got:
            assert _indices(events) == list(range(steps))
            assert [e.token_ids for e in events] == [[i] for i in range(steps)]
            assert events[-1].final
        # one read per event would be n * steps round trips
        assert counter.writes - before < n * steps / 2, counter.writes - before
        await asyncio.gather(sched.aclose(), gw.aclose())

    asyncio.run(main())


async def _collect(sub: RequestSubmitter, rid: str, last_index: int = -1,
                   delay: float = 0.0) -> list[OutputEvent]:
    out = []
    async for ev in sub.events(rid, last_index=last_index, block_ms=2000):
        out.append(ev)
        if delay:
            await asyncio.sleep(delay)
    return out


def test_two_relays_of_one_request_and_a_late_one_each_get_all(redis_url: str) -> None:
    async def main() -> None:
        sched, queue, gw, _, sub, model = await _setup(redis_url)
        rid, other = await _submit(sub, queue, model, 2)
        first = asyncio.ensure_future(_collect(sub, rid))
        blocker = asyncio.ensure_future(_collect(sub, other))   # keeps the reader blocked
        await asyncio.sleep(0.2)
        await queue.publish([(rid, OutputEvent(0, [5])), (rid, OutputEvent(1, [6]))])
        await asyncio.sleep(0.2)
        # a resume after event 0 while the first relay still runs, and while the reader
        # blocks on streams that do not include it
        resumed = asyncio.ensure_future(_collect(sub, rid, last_index=0))
        await asyncio.sleep(0.2)
        await queue.publish([(rid, OutputEvent(2, [7], finish_reason="stop", final=True))])
        a, b = await asyncio.wait_for(asyncio.gather(first, resumed), 30)
        assert _indices(a) == [0, 1, 2] and _indices(b) == [1, 2]
        assert [e.token_ids for e in b] == [[6], [7]]
        await queue.publish([(other, OutputEvent(0, [1], finish_reason="stop", final=True))])
        assert _indices(await asyncio.wait_for(blocker, 30)) == [0]
        await asyncio.gather(sched.aclose(), gw.aclose())

    asyncio.run(main())


def test_a_slow_relay_gets_more_events_than_the_reader_buffers(redis_url: str) -> None:
    async def main() -> None:
        sched, queue, gw, _, sub, model = await _setup(redis_url)
        (rid,) = await _submit(sub, queue, model, 1)
        total = 2 * MAX_BUFFERED + 17
        slow = asyncio.ensure_future(_collect(sub, rid, delay=0.0005))
        await asyncio.sleep(0.2)
        for start in range(0, total, 100):
            await queue.publish([(rid, OutputEvent(i, [i % 50], final=i == total - 1,
                                                   finish_reason="length"
                                                   if i == total - 1 else None))
                                 for i in range(start, min(start + 100, total))])
        events = await asyncio.wait_for(slow, 60)
        assert _indices(events) == list(range(total))
        assert [e.token_ids for e in events] == [[i % 50] for i in range(total)]
        await asyncio.gather(sched.aclose(), gw.aclose())

    asyncio.run(main())


def test_the_reader_idles_when_no_relay_waits(redis_url: str) -> None:
    async def main() -> None:
        sched, queue, gw, counter, sub, model = await _setup(redis_url)
        (rid,) = await _submit(sub, queue, model, 1)
        relay = asyncio.ensure_future(_collect(sub, rid))
        await asyncio.sleep(0.2)
        await queue.publish([(rid, OutputEvent(0, [1], finish_reason="stop", final=True))])
        assert _indices(await asyncio.wait_for(relay, 30)) == [0]
        await asyncio.sleep(0.2)
        writes = counter.writes
        await asyncio.sleep(2.5)   # past the reader's block time: it sends nothing more
        assert counter.writes == writes
        await asyncio.gather(sched.aclose(), gw.aclose())

    asyncio.run(main())
