"""Durability under faults (DESIGN.md §4), with real processes and a real redis-server.

- A gateway SIGKILLed mid-stream: every client resumes on a second gateway replica
  (HTTP ``GET /v1/streams/{id}`` with ``Last-Event-ID``; gRPC's resume cursor), and its text
  equals the fault-free run, event ids are contiguous, nothing is delivered twice, and every
  token a client got is in Redis.
- Poison requests: one whose processing raises in the scheduler (the TESSERA_TEST_POISON hook)
  or that carries numbers the workers' protocol cannot hold (sent around the gateway) is failed
  alone: concurrent streams finish as without it and the scheduler process lives.
- Dead-lettering: a request re-delivered past ``max_deliveries`` goes to the dead-letter stream
  with its reason, and its client gets an error event; a real scheduler that dies on a request
  (the hook's exit mode) leaves it pending with its delivery count for the next one.
- Worker and scheduler death under 32 concurrent streams (HTTP and gRPC, greedy and seeded):
  the worker SIGKILLed and restarted, then the active scheduler SIGKILLed (its standby takes
  over); with two worker groups, one group's worker killed for good (its requests finish on the
  other). Every stream ends with the fault-free text, its event ids contiguous, none twice.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import uuid

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from common import redis_schema as schema
from common.redis_schema import OutputEvent, QueuedRequest
from common.sampling_params import SamplingParams
from common.tokenizer import Tokenizer
from gateway.queue import RequestSubmitter
from scheduler.metrics import SchedulerMetrics
from scheduler.queue import RequestQueue
from scheduler.scheduler import Scheduler, SchedulerConfig
from tessera.client import TesseraClient, TesseraError

from fault_harness import (POISON, HttpStream, Services, Stack, grpc_stream, metric, reference,
                           streams_through)

# Long enough that the streams are still generating when the fault strikes (their clients
# pause after two events, the scheduler does not).
RECOVER_TOKENS = 160
RECOVERED = "tessera:requests_recovered_total"

@pytest.fixture(scope="module")
def stack(tiny_model, redis_url):
    s = Stack(str(tiny_model("llama")), redis_url)
    try:
        yield s
    finally:
        s.close()


def _post_result(base_url: str, key: str) -> dict:
    """A non-streamed completion, long enough to be running when its gateway dies."""
    with httpx.Client(timeout=120) as c:
        r = c.post(base_url + "/v1/completions", headers={"Idempotency-Key": key}, json={
            "prompt": "not streamed", "max_tokens": 1000, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        return r.json()


def test_gateway_killed_mid_stream_clients_resume_on_another_replica(stack: Stack) -> None:
    """32 concurrent streams (16 HTTP, completions and chat; 16 gRPC; a quarter of them
    seeded temperature-1.0 sampling, the rest greedy) and one non-streamed request."""
    n_http, n_grpc = 16, 16
    # long enough that no generation ends before every client has paused and the gateway is
    # killed: with 40 tokens, on a fast CPU, early streams finished into their socket buffers
    tokens = 300
    a_proc, a_http, a_grpc = stack.gateway()
    _, b_http, b_grpc = stack.gateway()
    ref_http, ref_grpc = reference(stack, b_http, b_grpc, n_http, n_grpc, max_tokens=tokens)
    assert all(len(t) > 0 for t in ref_http + ref_grpc)
    ref_post = _post_result(b_http, f"ref-{uuid.uuid4().hex}")
    key = f"k-{uuid.uuid4().hex}"
    cut: list[BaseException] = []

    def post_to_a() -> None:
        try:
            _post_result(a_http, key)
        except httpx.HTTPError as e:
            cut.append(e)

    post = threading.Thread(target=post_to_a)
    post.start()

    go = threading.Event()
    streams = [HttpStream(i, a_http, 3 + i % 4, go, max_tokens=tokens) for i in range(n_http)]
    grpc_ids = [f"g-{uuid.uuid4().hex}" for _ in range(n_grpc)]
    grpc_out: list[list] = [[] for _ in range(n_grpc)]
    grpc_paused = [threading.Event() for _ in range(n_grpc)]
    threads = [threading.Thread(target=s.run) for s in streams] + [
        threading.Thread(target=grpc_stream, args=(a_grpc, grpc_ids[i], i, 3 + i % 4, go,
                                                    grpc_out[i], grpc_paused[i], tokens))
        for i in range(n_grpc)]
    for t in threads:
        t.start()
    for e in [s.paused for s in streams] + grpc_paused:
        assert e.wait(120)
    assert not any(s.done for s in streams), "every client is mid-stream when the gateway dies"
    a_proc.send_signal(signal.SIGKILL)
    a_proc.wait(10)
    go.set()
    for t in threads + [post]:
        t.join(120)
    assert cut, "the non-streamed request was still running when its gateway died"
    # The non-streamed client retries with its Idempotency-Key on the other replica: it
    # attaches to the generation that ran on meanwhile, and gets the fault-free result.
    again = _post_result(b_http, key)
    assert again["choices"] == ref_post["choices"] and again["usage"] == ref_post["usage"]
    with httpx.Client(timeout=60) as c:
        fetched = c.get(f"{b_http}/v1/requests/{again['id']}").json()
    assert fetched["choices"] == ref_post["choices"]

    tok = Tokenizer.from_dir(stack.model_dir)
    with redis.Redis.from_url(stack.redis_url) as r:
        for s, expected in zip(streams, ref_http):
            assert not s.done and s.last_id is not None
            s.resume(b_http)
            assert s.done and s.text == expected, (s.i, s.text, expected)
            ids = [int(e.split(":")[1]) for e, _ in s.events if e is not None]
            assert ids == list(range(len(ids))), "event ids are contiguous, none twice"
            assert all(e is None or e.startswith(s.rid + ":") for e, _ in s.events)
            stored = [t for _, f in r.xrange(schema.output_stream(s.rid))
                      for t in OutputEvent.from_fields(f).token_ids]
            assert tok.decode(stored) == s.text, "every token the client got is in Redis"
        with TesseraClient(b_grpc, timeout=60) as b:
            for rid, out, expected in zip(grpc_ids, grpc_out, ref_grpc):
                assert out, "the gRPC client saw some chunks before the kill"
                out.extend(b.stream(None, request_id=rid, last_event_index=out[-1].index))
                assert [ch.index for ch in out] == list(range(len(out)))
                assert "".join(c.text for ch in out for c in ch.choices) == expected
                assert out[-1].choices[-1].finish_reason == "length"
                stored = [t for _, f in r.xrange(schema.output_stream(rid))
                          for t in OutputEvent.from_fields(f).token_ids]
                assert [t for ch in out for c in ch.choices for t in c.token_ids] == stored
    assert stack.scheduler.poll() is None


def test_a_request_that_raises_in_the_scheduler_fails_alone(stack: Stack) -> None:
    _, http, grpc_address = stack.gateway()
    # Long enough that the others still run when the poisoned request joins their step.
    ref_http, _ = reference(stack, http, grpc_address, 4, 0, max_tokens=300)
    go = threading.Event()
    streams = [HttpStream(i, http, 2, go, max_tokens=300) for i in range(4)]
    threads = [threading.Thread(target=s.run) for s in streams]
    for t in threads:
        t.start()
    for s in streams:
        assert s.paused.wait(120)
    # The others are running (they produced events); the poisoned one is planned into a step
    # with them, and raises when that step is sent.
    with TesseraClient(grpc_address, timeout=60) as client:
        with pytest.raises(TesseraError) as err:
            client.generate("poisoned", request_id=f"{POISON}{uuid.uuid4().hex}", max_tokens=8)
        assert "poisoned" in err.value.message
        go.set()
        for t in threads:
            t.join(120)
        for s, expected in zip(streams, ref_http):
            if not s.done:   # the client read slower than the stream: resume is the same text
                s.resume(http)
            assert s.done and s.text == expected
        assert stack.scheduler.poll() is None, "the scheduler survives"
        assert client.generate("still serving", max_tokens=3).choices[0].finish_reason == "length"


def _raw_submit(redis_url: str, model: str, params_override: dict) -> str:
    """Enqueue around the gateway (as an old gateway, a bug or another Redis client could),
    with sampling params the gateway would refuse."""
    rid = f"raw-{uuid.uuid4().hex}"
    fields = QueuedRequest(rid, model, [5, 6, 7], SamplingParams(max_tokens=4)).to_fields()
    body = json.loads(fields["data"])
    body["params"].update(params_override)
    fields["data"] = json.dumps(body)
    with redis.Redis.from_url(redis_url) as r:
        r.hset(schema.request_record(rid), mapping={"state": "queued", "model": model, "n": 1})
        r.xadd(schema.requests_stream(model), fields)
    return rid


@pytest.mark.parametrize("override", [{"seed": 2**63}, {"top_k": 2**31},
                                      {"logit_bias": {"5": float("nan")}}, {"n": 10**6}])
def test_bad_numbers_around_the_gateway_fail_alone(stack: Stack, override: dict) -> None:
    if not stack.gateways:
        stack.gateway()
    _, http, grpc_address = stack.gateways[-1]
    rid = _raw_submit(stack.redis_url, stack.name, override)

    async def events():
        client = aioredis.from_url(stack.redis_url)
        try:
            return [ev async for ev in RequestSubmitter(client).events(rid, block_ms=200)]
        finally:
            await client.aclose()

    got = asyncio.run(asyncio.wait_for(events(), 60))
    assert len(got) == 1 and got[0].error and got[0].final, got
    assert list(override)[0] in got[0].error
    assert stack.scheduler.poll() is None
    with TesseraClient(grpc_address, timeout=60) as client:
        assert client.generate("fine", max_tokens=3).choices[0].finish_reason == "length"


def test_a_request_redelivered_past_max_deliveries_is_dead_lettered(redis_url: str) -> None:
    """Three schedulers in turn take the request and die on it (they never ack); the fourth
    that claims it dead-letters it instead of running it."""
    model = f"dl-{uuid.uuid4().hex[:6]}"

    async def run() -> None:
        client = aioredis.from_url(redis_url)
        try:
            sub = RequestSubmitter(client)
            rid = await sub.submit(QueuedRequest(f"r-{uuid.uuid4().hex}", model, [1, 2, 3],
                                                 SamplingParams(max_tokens=4)))
            first = RequestQueue(client, model, "s0", max_deliveries=3)
            await first.ensure_group()
            assert [q.request_id for _, q in await first.read_new(10)] == [rid]   # delivery 1
            for k in (1, 2):   # deliveries 2 and 3: claimed and run again
                peer = RequestQueue(client, model, f"s{k}", max_deliveries=3)
                assert [q.request_id for _, q in await peer.claim_stale(0)] == [rid]
            last = RequestQueue(client, model, "s3", max_deliveries=3)
            assert await last.claim_stale(0) == []                               # delivery 4
            assert last.num_deadlettered == 1
            metrics = SchedulerMetrics(model, 2048)
            metrics.watch(Scheduler(SchedulerConfig(num_blocks=4)), last)
            assert f'tessera:deadlettered_total{{model_name="{model}"}} 1.0' in \
                metrics.render().decode()
            (_, letter), = await client.xrange(schema.deadletter_stream(model))
            assert letter[b"request_id"].decode() == rid and letter[b"deliveries"] == b"4"
            assert b"delivered 4 times" in letter[b"reason"]
            assert json.loads(letter[b"data"])["prompt"] == [1, 2, 3]
            evs = [ev async for ev in sub.events(rid, block_ms=200)]
            assert len(evs) == 1 and evs[0].final and "dead-lettered" in evs[0].error
            assert await client.hget(schema.request_record(rid), "state") == b"failed"
            assert await client.xpending(schema.requests_stream(model), schema.SCHEDULERS_GROUP) \
                == {"pending": 0, "min": None, "max": None, "consumers": []}
        finally:
            await client.aclose()

    asyncio.run(run())


def test_a_scheduler_that_dies_on_a_request_leaves_it_to_be_dead_lettered(
        tiny_model, redis_url: str) -> None:
    """The hook's exit mode: the scheduler process ends the moment it sends a step with the
    request (an uncatchable crash). The request stays pending with its delivery count, so the
    schedulers that claim it after count on; past max_deliveries it is dead-lettered."""
    s = Stack(str(tiny_model("llama")), redis_url, poison="exit:deadly-")
    try:
        async def run() -> None:
            client = aioredis.from_url(redis_url)
            try:
                sub = RequestSubmitter(client)
                rid = await sub.submit(QueuedRequest(f"deadly-{uuid.uuid4().hex}", s.name,
                                                     [1, 2, 3], SamplingParams(max_tokens=4)))
                assert await asyncio.to_thread(s.scheduler.wait, 60) == 70
                stream = schema.requests_stream(s.name)
                (entry,) = await client.xpending_range(stream, schema.SCHEDULERS_GROUP,
                                                       "-", "+", 10)
                assert entry["times_delivered"] == 1
                for k in (2, 3):   # the next two schedulers take it (and would die too)
                    peer = RequestQueue(client, s.name, f"next-{k}", max_deliveries=3)
                    assert [q.request_id for _, q in await peer.claim_stale(0)] == [rid]
                last = RequestQueue(client, s.name, "fourth", max_deliveries=3)
                assert await last.claim_stale(0) == [] and last.num_deadlettered == 1
                evs = [ev async for ev in sub.events(rid, block_ms=200)]
                assert len(evs) == 1 and "dead-lettered" in evs[0].error
            finally:
                await client.aclose()

        asyncio.run(asyncio.wait_for(run(), 120))
    finally:
        s.close()


def test_worker_killed_mid_stream_its_requests_are_recomputed(services: Services) -> None:
    """SIGKILL of the worker under 32 streams; a supervisor restarts it a second later. The
    scheduler keeps every request (no error to any client), re-warms and resets the group and
    recomputes each from prompt + emitted tokens: every stream ends as in the fault-free run."""
    active, port = services.active()

    def fault() -> None:
        services.kill_worker()
        time.sleep(1.0)
        services.restart_worker()

    before = metric(port, RECOVERED, reason="worker")
    streams_through(services, fault, max_tokens=RECOVER_TOKENS)
    assert metric(port, RECOVERED, reason="worker") > before, "requests were in flight"
    assert metric(port, "tessera:tokens_recomputed_total") > 0
    assert active.poll() is None and services.active()[0] is active


def test_active_scheduler_killed_mid_stream_a_standby_takes_over(services: Services) -> None:
    """SIGKILL of the scheduler holding the lease under 32 streams: the standby takes the
    lease, claims the dead one's requests, reads what they emitted and continues their event
    indices; every stream ends as in the fault-free run."""
    active, _ = services.active()

    def fault() -> None:
        active.send_signal(signal.SIGKILL)
        active.wait(10)

    streams_through(services, fault, max_tokens=RECOVER_TOKENS)
    successor, port = services.active()
    assert successor is not active
    assert metric(port, RECOVERED, reason="scheduler") > 0, "it took over requests in flight"
    services.add_scheduler(0)   # a supervisor starts a new standby


def test_dp2_a_dead_groups_requests_finish_on_the_other_group(tiny_model, redis_url) -> None:
    """Two worker groups share the request stream; group 0's worker dies and stays dead: its
    scheduler hands its requests back at once and group 1 finishes them from their tokens."""
    svc = Services(str(tiny_model("llama")), redis_url, groups=2, schedulers=1)
    try:
        (_, s0, _), (_, s1, port1) = svc.schedulers
        streams_through(svc, lambda: svc.kill_worker(0), max_tokens=RECOVER_TOKENS)
        assert metric(port1, RECOVERED, reason="worker") > 0, "group 1 took group 0's requests"
        assert s0.poll() is None and s1.poll() is None
    finally:
        svc.close()

