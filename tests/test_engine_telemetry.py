"""The engine loop's telemetry hooks, in process: the real loop, a real redis-server and a real
model (the offline engine's local executor), spans captured by the OpenTelemetry SDK's
in-memory exporter. A KV pool too small for the batch forces preemptions, which the spans must
show as events and the metrics must count; an idle loop keeps readiness with its canary."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from common.model_config import ModelConfig
from common.redis_schema import OutputEvent, QueuedRequest, output_stream
from common.sampling_params import SamplingParams
from gateway.queue import RequestSubmitter
from scheduler.health import Readiness
from scheduler.loop import EngineLoop
from scheduler.metrics import SchedulerMetrics
from scheduler.queue import RequestQueue
from scheduler.engine_core import EngineCore, EngineRequest
from scheduler.scheduler import SchedulerConfig
from scheduler.telemetry import EngineObserver
from tessera.engine import LocalExecutor
from worker.runner import ModelRunner
from worker.worker import Worker

NUM_BLOCKS, BLOCK = 8, 16
PARAMS = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)


def _samples(metrics: SchedulerMetrics) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(metrics.render().decode())
            for s in f.samples if s.name.startswith("tessera:")}


@pytest.fixture
def engine(tiny_model, redis_url):
    model_dir = tiny_model("llama")
    config = ModelConfig.from_dir(model_dir)
    worker = Worker(ModelRunner(config, "float32", NUM_BLOCKS, BLOCK, "cpu"))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return LocalExecutor(worker), exporter, provider.get_tracer("test"), redis_url


def test_preemptions_are_span_events_and_metrics_and_idle_keeps_ready(engine):
    executor, exporter, tracer, redis_url = engine
    model = f"tel-{uuid.uuid4().hex[:6]}"
    metrics = SchedulerMetrics(model, 512)
    readiness = Readiness(ready_timeout_s=0.6)   # a canary every 0.2 s when idle
    observer = EngineObserver(metrics, readiness, tracer=tracer)
    core = EngineCore(SchedulerConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK,
                                      max_num_batched_tokens=64, max_model_len=512),
                      observer=observer)
    scheduler = core.scheduler
    parent_trace, parent_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    prompts = [list(range(5 + i, 25 + i)) for i in range(3)]   # 20 tokens + 30 out: 4 blocks each

    async def main():
        client = aioredis.from_url(redis_url)
        queue = RequestQueue(client, model, "c0")
        await queue.ensure_group()
        metrics.watch(scheduler)
        loop = EngineLoop(core, executor, queue)
        task = asyncio.create_task(loop.run())
        sub = RequestSubmitter(client)
        ids = [await sub.submit(QueuedRequest(
            f"r{i}-{uuid.uuid4().hex[:6]}", model, p, PARAMS,
            traceparent=f"00-{parent_trace}-{parent_span}-01")) for i, p in enumerate(prompts)]
        outputs = [[t for ev in [e async for e in sub.events(r, block_ms=200)] for t in ev.token_ids]
                   for r in ids]
        busy = _samples(metrics)
        last = readiness.last_forward
        await asyncio.sleep(1.0)   # idle: canaries run
        idle = _samples(metrics)
        loop.stopped.set()
        await asyncio.wait_for(task, 5)
        await client.aclose()
        return ids, outputs, busy, idle, last

    ids, outputs, busy, idle, last = asyncio.run(main())
    assert [len(o) for o in outputs] == [30, 30, 30]
    assert scheduler.num_preemptions > 0 and scheduler.kv.num_blocks_in_use == 0

    spans = exporter.get_finished_spans()
    requests = [s for s in spans if s.name == "engine request"]
    assert sorted(s.attributes["gen_ai.response.id"] for s in requests) == sorted(ids)
    for s in requests:   # children of the context the QueuedRequest carried
        assert f"{s.context.trace_id:032x}" == parent_trace
        assert f"{s.parent.span_id:016x}" == parent_span
        assert s.attributes["gen_ai.usage.output_tokens"] == 30
        assert s.attributes["gen_ai.usage.input_tokens"] == 20
    assert sum(s.attributes["tessera.request.preemptions"] for s in requests) == \
        scheduler.num_preemptions
    events = [e.name for s in spans if s.name in ("prefill", "decode") for e in s.events]
    assert events.count("preempted") == scheduler.num_preemptions
    assert events.count("resumed") == scheduler.num_preemptions

    assert busy["tessera:num_preemptions_total"] == scheduler.num_preemptions
    assert busy["tessera:request_decode_time_seconds_count"] == 3
    assert busy["tessera:generation_tokens_total"] == 90
    assert busy["tessera:prompt_tokens_total"] == 60
    # idle: canaries keep the last forward pass fresh, and count as no engine work
    assert readiness.last_forward > last and readiness.status()[0]
    assert idle["tessera:generation_tokens_total"] == 90
    assert idle["tessera:step_duration_seconds_count"] == busy["tessera:step_duration_seconds_count"]
    assert idle["tessera:num_requests_running"] == 0 and idle["tessera:kv_cache_usage_perc"] == 0


def test_a_claimed_request_resumes_identically_and_its_trace_says_recovered(engine):
    """Scheduler A runs a seeded temperature-1.0 request and a greedy one and dies (its loop
    stops mid-generation, nothing acked); B claims them once idle, recomputes prompt + emitted
    tokens and continues the indices: the tokens equal an uninterrupted run, the request spans
    carry a `recovered` event, and the recovery metrics count them."""
    executor, exporter, tracer, redis_url = engine
    model = f"rec-{uuid.uuid4().hex[:6]}"
    params = [SamplingParams(temperature=1.0, seed=7, max_tokens=40, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)]
    prompts = [list(range(3, 15)), list(range(40, 49))]
    config = SchedulerConfig(num_blocks=NUM_BLOCKS * 4, block_size=BLOCK,
                             max_num_batched_tokens=64, max_model_len=512)

    def loop_of(client, consumer, claim_idle_ms=0, observer=None):
        core = EngineCore(config, observer=observer)
        return EngineLoop(core, executor, RequestQueue(client, model, consumer),
                          claim_idle_ms=claim_idle_ms)

    async def run(die_after: int | None):
        executor.reset()   # each scheduler starts with a Reset of its workers
        client = aioredis.from_url(redis_url)
        sub = RequestSubmitter(client)
        first = loop_of(client, f"a-{uuid.uuid4().hex[:4]}")
        await first.queue.ensure_group()
        task = asyncio.create_task(first.run())
        ids = [await sub.submit(QueuedRequest(f"r-{uuid.uuid4().hex[:8]}", model, p, sp))
               for p, sp in zip(prompts, params)]
        metrics = SchedulerMetrics(model, 512)
        if die_after is not None:
            while min([len(await client.xrange(output_stream(r))) for r in ids]) < die_after:
                await asyncio.sleep(0.005)
            first.stopped.set()
            await asyncio.wait_for(task, 10)
            lasts = [OutputEvent.from_fields((await client.xrange(output_stream(r)))[-1][1])
                     for r in ids]
            assert not all(e.final for e in lasts), "the scheduler died mid-generation"
            executor.reset()   # as a new scheduler does before its first step
            second = loop_of(client, "b", claim_idle_ms=300,
                             observer=EngineObserver(metrics, Readiness(), tracer=tracer))
            task = asyncio.create_task(second.run())
        events = [[e async for e in sub.events(r, block_ms=200)] for r in ids]
        (second if die_after is not None else first).stopped.set()
        await asyncio.wait_for(task, 10)
        await client.aclose()
        return events, metrics

    reference, _ = asyncio.run(run(None))
    events, metrics = asyncio.run(run(die_after=5))
    for ref, got in zip(reference, events):
        assert [e.index for e in got] == list(range(len(got))), "contiguous, none twice"
        assert [t for e in got for t in e.token_ids] == [t for e in ref for t in e.token_ids]
    samples = {(s.name, s.labels.get("reason")): s.value for f in text_string_to_metric_families(
        metrics.render().decode()) for s in f.samples}
    recovered = samples[("tessera:requests_recovered_total", "scheduler")]
    assert recovered >= 1
    assert samples[("tessera:tokens_recomputed_total", None)] >= 5 + len(prompts[1])
    spans = [s for s in exporter.get_finished_spans() if s.name == "engine request"]
    marked = [s for s in spans if any(e.name == "recovered" for e in s.events)]
    assert len(marked) == recovered
    assert all(e.attributes["tessera.recovery.reason"] == "scheduler"
               for s in marked for e in s.events if e.name == "recovered")


def test_the_idle_canary_is_not_a_running_request_in_the_gauges() -> None:
    # A scrape that lands while a canary's one-token step runs still reads an idle service:
    # no request running, no KV block in use; a user's request next to it counts.
    core = EngineCore(SchedulerConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK,
                                      max_num_batched_tokens=64, max_model_len=512))
    metrics = SchedulerMetrics(f"tel-{uuid.uuid4().hex[:6]}", 512)
    metrics.watch(core.scheduler)
    canary = Readiness(ready_timeout_s=0.6).canary()
    core.scheduler.add_request(canary)
    core.schedule()
    assert core.scheduler.num_running == 1 and core.kv.num_blocks_in_use == 1
    idle = _samples(metrics)
    assert idle["tessera:num_requests_running"] == 0 and idle["tessera:kv_cache_usage_perc"] == 0
    core.add_request(EngineRequest("user", list(range(5, 25)), PARAMS))
    core.schedule()
    busy = _samples(metrics)
    assert busy["tessera:num_requests_running"] == 1
    assert busy["tessera:kv_cache_usage_perc"] == 2 / NUM_BLOCKS   # its 20 tokens: 2 blocks
