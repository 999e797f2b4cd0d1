"""The Redis layer against a real redis-server: the gateway submits, a scheduler reads,
publishes and acks, the gateway relays; durability (claim, resume, idempotency, cancels)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from redis_server import counting_client

from common import redis_schema as schema
from common.redis_schema import OutputEvent, QueuedRequest, RedisLimits
from common.sampling_params import SamplingParams
from gateway.queue import RequestNotFound, RequestSubmitter
from scheduler.queue import GroupStats, RequestQueue

LIMITS = RedisLimits(finished_ttl_s=30.0)


def run(coro):
    return asyncio.run(coro)


def new_model() -> str:
    return f"m-{uuid.uuid4().hex[:8]}"


def make_request(model: str, rid: str | None = None, **kw) -> QueuedRequest:
    kw.setdefault("params", SamplingParams(max_tokens=4))
    return QueuedRequest(request_id=rid or uuid.uuid4().hex, model=model,
                         prompt_token_ids=[1, 2, 3], **kw)


async def collect(sub: RequestSubmitter, rid: str, last_index: int = -1) -> list[OutputEvent]:
    return [ev async for ev in sub.events(rid, last_index=last_index, block_ms=2000)]


async def setup(url: str, consumer: str = "s1"):
    client = aioredis.from_url(url)
    model = new_model()
    queue = RequestQueue(client, model, consumer, LIMITS)
    await queue.ensure_group()
    return client, model, queue, RequestSubmitter(client, LIMITS)


def test_queued_request_round_trips_and_revalidates() -> None:
    params = SamplingParams(n=2, temperature=0.5, stop=("x", "y"), stop_token_ids=(7,),
                            logit_bias={5: -1.0}, seed=3, logprobs=2)
    q = make_request("m", "r1", params=params, priority=-1, deadline=12.5, tenant="t",
                     idempotency_key="k", disconnect="continue", traceparent="00-ab-cd-01")
    assert QueuedRequest.from_fields(q.to_fields()) == q
    ev = OutputEvent(3, [9], seq_index=1, finish_reason="stop", final=True,
                     logprobs=[[9, -0.5, [[9, -0.5], [4, -1.5]]]])
    assert OutputEvent.from_fields(ev.to_fields()) == ev
    fields = q.to_fields()
    fields["data"] = fields["data"].replace('"temperature":0.5', '"temperature":-1')
    with pytest.raises(schema.MalformedEntry, match="temperature") as e:
        QueuedRequest.from_fields(fields)
    assert e.value.request_id == "r1"


def test_submit_read_publish_events_round_trip(redis_url: str) -> None:
    async def main() -> None:
        client, model, queue, sub = await setup(redis_url)
        q = make_request(model, params=SamplingParams(max_tokens=3, seed=1))
        assert await sub.submit(q) == q.request_id
        reader = asyncio.create_task(collect(sub, q.request_id))   # blocks, then streams
        (entry_id, got), = await queue.read_new(max_count=8)
        assert got == q
        record = await client.hgetall(schema.request_record(q.request_id))
        assert record[b"state"] == b"running" and record[b"owner"] == b"s1"
        await queue.publish([(q.request_id, OutputEvent(0, [11]))])
        await queue.publish([(q.request_id, OutputEvent(1, [12]))])
        await queue.publish([(q.request_id, OutputEvent(2, [13], finish_reason="length",
                                                        final=True))], acks=[entry_id])
        events = await asyncio.wait_for(reader, 5)
        assert [e.token_ids for e in events] == [[11], [12], [13]]
        assert events[-1].final and events[-1].finish_reason == "length"
        # Finished: acked and gone from the stream; record and output expire after the
        # resume window, not before.
        assert await queue.consumer_lag() == GroupStats(waiting=0, pending=0)
        assert await client.xlen(queue.stream) == 0
        assert await client.hget(schema.request_record(q.request_id), "state") == b"finished"
        for key in (schema.output_stream(q.request_id), schema.request_record(q.request_id)):
            assert 0 < await client.pttl(key) <= LIMITS.finished_ttl_ms
        await client.aclose()
    run(main())


def test_back_pressure_leaves_requests_in_redis(redis_url: str) -> None:
    async def main() -> None:
        client, model, queue, sub = await setup(redis_url)
        for _ in range(5):
            await sub.submit(make_request(model))
        assert await queue.read_new(max_count=0) == []
        taken = await queue.read_new(max_count=2)
        assert len(taken) == 2
        assert await queue.queue_depth() == 3
        assert await queue.consumer_lag() == GroupStats(waiting=3, pending=2)
        await queue.publish([], acks=[taken[0][0]])
        assert await queue.consumer_lag() == GroupStats(waiting=3, pending=1)
        assert len(await queue.read_new(max_count=10)) == 3
        assert await queue.consumer_lag() == GroupStats(waiting=0, pending=4)
        await client.aclose()
    run(main())


def test_unacked_request_is_claimed_by_a_peer_after_idle(redis_url: str) -> None:
    async def main() -> None:
        client, model, dead, sub = await setup(redis_url, consumer="dead")
        peer = RequestQueue(client, model, "peer", LIMITS)
        q = make_request(model)
        await sub.submit(q)
        (entry_id, _), = await dead.read_new(max_count=1)
        await dead.publish([(q.request_id, OutputEvent(0, [5])), ])
        await dead.publish([(q.request_id, OutputEvent(1, [6])), ])
        assert await peer.read_new(max_count=1) == []          # never delivered twice as new
        await asyncio.sleep(0.15)
        await dead.touch([entry_id])                            # alive: keeps its request
        assert await peer.claim_stale(min_idle_ms=100) == []
        await asyncio.sleep(0.15)                               # now it stops touching
        (claimed_id, got), = await peer.claim_stale(min_idle_ms=100)
        assert claimed_id == entry_id and got == q
        assert await client.hget(schema.request_record(q.request_id), "owner") == b"peer"
        emitted = await peer.read_emitted(q.request_id)
        assert [(e.index, e.token_ids) for e in emitted] == [(0, [5]), (1, [6])]
        # The peer continues the indices; a re-published old event is dropped by Redis.
        await peer.publish([(q.request_id, OutputEvent(1, [99])),
                            (q.request_id, OutputEvent(2, [7], finish_reason="stop",
                                                       final=True))], acks=[claimed_id])
        assert [e.token_ids for e in await collect(sub, q.request_id)] == [[5], [6], [7]]
        assert await peer.consumer_lag() == GroupStats(waiting=0, pending=0)
        # Died after its final event but before the ack: the claimer only acks it.
        q2 = make_request(model)
        await sub.submit(q2)
        await dead.read_new(max_count=1)
        await dead.publish([(q2.request_id, OutputEvent(0, [1], finish_reason="stop",
                                                        final=True))])
        await asyncio.sleep(0.15)
        assert await peer.claim_stale(min_idle_ms=100) == []
        assert await peer.consumer_lag() == GroupStats(waiting=0, pending=0)
        assert await client.hget(schema.request_record(q2.request_id), "state") == b"finished"
        await client.aclose()
    run(main())


def test_one_steps_events_go_out_in_one_round_trip(redis_url: str) -> None:
    async def main() -> None:
        client, counter = counting_client(redis_url)
        model = new_model()
        queue = RequestQueue(client, model, "s1", LIMITS)
        await queue.ensure_group()
        sub = RequestSubmitter(client, LIMITS)
        ids = [await sub.submit(make_request(model)) for _ in range(50)]
        entries = await queue.read_new(max_count=50)
        assert len(entries) == 50
        step0 = [(rid, OutputEvent(0, [i])) for i, rid in enumerate(ids)]
        step1 = [(rid, OutputEvent(1, [i + 100], finish_reason="stop", final=True))
                 for i, rid in enumerate(ids)]
        before = counter.writes
        await queue.publish(step0)
        assert counter.writes - before == 1
        before = counter.writes
        await queue.publish(step1, acks=[e for e, _ in entries])
        assert counter.writes - before == 1
        assert [e.token_ids for e in await collect(sub, ids[17])] == [[17], [117]]
        assert await queue.consumer_lag() == GroupStats(waiting=0, pending=0)
        await client.aclose()
    run(main())


def test_a_steady_step_is_one_round_trip(redis_url: str) -> None:
    """exchange(): the last step's events, acks and gauges out, cancels and new requests in,
    in one pipeline (admitting new requests costs its own round trips, only when some came)."""
    async def main() -> None:
        client, counter = counting_client(redis_url)
        model = new_model()
        queue = RequestQueue(client, model, "s1", LIMITS)
        await queue.ensure_group()
        sub = RequestSubmitter(client, LIMITS)
        ids = [await sub.submit(make_request(model)) for _ in range(3)]
        entries, cancels = await queue.exchange([], [], None, read_count=2)
        assert [q.request_id for _, q in entries] == ids[:2] and cancels == []
        assert await sub.cancel(ids[1])
        stats = ("tessera:test-stats:" + model, {"running": 1})
        before = counter.writes
        entries2, cancels = await queue.exchange(
            [(ids[0], OutputEvent(0, [5], finish_reason="stop", final=True))],
            [entries[0][0]], stats, read_count=0)
        assert counter.writes - before == 1
        assert entries2 == [] and cancels == [ids[1]]
        assert [e.token_ids for e in await collect(sub, ids[0])] == [[5]]
        assert await client.hget(stats[0], "running") == b"1"
        assert await queue.consumer_lag() == GroupStats(waiting=1, pending=1)
        entries3, _ = await queue.exchange([], [], None, read_count=5, block_ms=50)
        assert [q.request_id for _, q in entries3] == ids[2:]
        await client.aclose()
    run(main())


def test_resume_after_last_index_yields_only_later_events(redis_url: str) -> None:
    async def main() -> None:
        client, model, queue, sub = await setup(redis_url)
        q = make_request(model)
        await sub.submit(q)
        await queue.read_new(max_count=1)
        await queue.publish([(q.request_id, OutputEvent(i, [10 + i])) for i in range(3)])
        first = []
        async for ev in sub.events(q.request_id):      # a client that drops after event 1
            first.append(ev.index)
            if ev.index == 1:
                break
        await queue.publish([(q.request_id, OutputEvent(3, [13], finish_reason="stop",
                                                        final=True))])
        resumed = await collect(sub, q.request_id, last_index=1)
        assert first == [0, 1] and [e.index for e in resumed] == [2, 3]
        assert await collect(sub, q.request_id, last_index=3) == []   # over: ends at once
        with pytest.raises(RequestNotFound):
            await collect(sub, "no-such-request")
        await client.aclose()
    run(main())


def test_idempotency_key_enqueues_once_per_tenant(redis_url: str) -> None:
    async def main() -> None:
        client, model, queue, sub = await setup(redis_url)
        a = await sub.submit(make_request(model, tenant="t1", idempotency_key="k"))
        again = await sub.submit(make_request(model, tenant="t1", idempotency_key="k"))
        other = await sub.submit(make_request(model, tenant="t2", idempotency_key="k"))
        assert again == a and other != a
        assert await client.xlen(queue.stream) == 2
        await client.aclose()
    run(main())


def test_cancels_are_drained_once_by_every_scheduler_and_not_lost(redis_url: str) -> None:
    async def main() -> None:
        client, model, s1, sub = await setup(redis_url, consumer="s1")
        s2 = RequestQueue(client, model, "s2", LIMITS)
        await s2.ensure_group()
        r1, r2, r3 = [await sub.submit(make_request(model)) for _ in range(3)]
        taken = await s1.read_new(max_count=3)
        assert await sub.cancel(r1)
        assert await s1.drain_cancels() == [r1]
        assert await s1.drain_cancels() == []
        assert await sub.cancel(r2) and await sub.cancel(r3)   # while "a step runs"
        assert await s1.drain_cancels() == [r2, r3]
        assert await s2.drain_cancels() == [r1, r2, r3]        # every scheduler sees all
        assert not await sub.cancel("no-such-request")
        # The owner aborts r1: a final event, after which cancelling is a no-op.
        await s1.publish([(r1, OutputEvent(0, [], finish_reason="abort", final=True))],
                         acks=[taken[0][0]])
        assert not await sub.cancel(r1)
        await client.aclose()
    run(main())


def test_request_cancelled_while_queued_is_never_scheduled(redis_url: str) -> None:
    async def main() -> None:
        client, model, queue, sub = await setup(redis_url)
        doomed, kept = make_request(model), make_request(model)
        await sub.submit(doomed)
        await sub.submit(kept)
        assert await sub.cancel(doomed.request_id)
        assert [q for _, q in await queue.read_new(max_count=5)] == [kept]
        (ev,) = await collect(sub, doomed.request_id)
        assert ev.final and ev.finish_reason == "abort" and ev.error is None
        assert await queue.consumer_lag() == GroupStats(waiting=0, pending=1)
        await client.aclose()
    run(main())


def test_malformed_entries_are_acked_and_reported(redis_url: str) -> None:
    async def main() -> None:
        client, model, queue, sub = await setup(redis_url)
        await client.xadd(queue.stream, {"request_id": "bad-json", "data": "{"})
        await client.xadd(queue.stream, {"data": "no id at all"})
        bad_params = make_request(model, "bad-params").to_fields()
        bad_params["data"] = bad_params["data"].replace('"top_p":1.0', '"top_p":7')
        await client.xadd(queue.stream, bad_params)
        good = make_request(model)
        await sub.submit(good)
        assert [q for _, q in await queue.read_new(max_count=10)] == [good]
        for rid, needle in (("bad-json", "bad request entry"), ("bad-params", "top_p")):
            (ev,) = await collect(sub, rid)
            assert ev.final and ev.error is not None and needle in ev.error
        assert await queue.consumer_lag() == GroupStats(waiting=0, pending=1)
        assert await client.xlen(queue.stream) == 1
        await client.aclose()
    run(main())


def test_touch_keeps_only_owned_entries_and_handoff_requeues_for_recovery(redis_url) -> None:
    """A scheduler that stalled past the claim idle time learns from ``touch`` which entries a
    peer took (and does not take them back); ``handoff`` gives entries back to the stream,
    marked for recovery, for any scheduler to read as new."""
    async def main() -> None:
        client, model, slow, sub = await setup(redis_url, consumer="slow")
        peer = RequestQueue(client, model, "peer", LIMITS)
        kept, taken = make_request(model), make_request(model)
        await sub.submit(kept)
        await sub.submit(taken)
        (kept_id, _), (taken_id, _) = await slow.read_new(max_count=2)
        stream = schema.requests_stream(model)
        await client.xclaim(stream, schema.SCHEDULERS_GROUP, "peer", 0, [taken_id], justid=True)
        assert await slow.touch([kept_id, taken_id]) == [taken_id]
        (entry,) = await client.xpending_range(stream, schema.SCHEDULERS_GROUP, taken_id,
                                               taken_id, 1)
        assert entry["consumer"] == b"peer", "touch never takes an entry back"
        assert await slow.touch([]) == []

        assert await slow.handoff([kept_id, "0-1"], "worker") == 1   # a gone entry is skipped
        (new_id, got), = await peer.read_new(max_count=10)
        assert new_id != kept_id and got.request_id == kept.request_id
        assert got.recovered == "worker" and got.prompt_token_ids == kept.prompt_token_ids
        pending = await client.xpending_range(stream, schema.SCHEDULERS_GROUP, "-", "+", 10)
        assert {p["message_id"].decode() for p in pending} == {taken_id, new_id}
        await client.aclose()
    run(main())
