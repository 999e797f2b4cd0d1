"""Fencing (DESIGN.md §4, scheduler/fence.py): a scheduler paused past its lease never writes
again: Redis refuses its publishes, the workers refuse its calls, and it stops on waking."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis
import redis.asyncio as aioredis

from common import redis_schema as schema
from common.redis_schema import OutputEvent
from common.step import StepPlan
from scheduler.executor import GrpcExecutor
from scheduler.fence import Fenced, Lease, holder_pid
from scheduler.queue import RequestQueue
from tessera.procs import free_port

from fault_harness import Services, start, stop, streams_through

LEASE_MS = 5000   # the scheduler's lease (SchedulerServiceConfig.lease_ms)
STEP_TIMEOUT_S = 30.0   # the scheduler's default --step-timeout


def test_publishes_of_a_scheduler_that_lost_its_lease_write_nothing(redis_url: str) -> None:
    async def main() -> None:
        client = aioredis.from_url(redis_url)
        key = f"tessera:test-lease:{time.time_ns()}"
        old, new = Lease(client, key, "old", 60_000), Lease(client, key, "new", 60_000)
        assert await old.try_acquire() and not await new.try_acquire()
        await client.delete(key)                      # old paused past its lease ...
        assert await new.try_acquire()                # ... and its standby took it
        assert new.epoch > old.epoch > 0
        model = f"fence-{time.time_ns()}"
        old_q = RequestQueue(client, model, "old", lease=old)
        new_q = RequestQueue(client, model, "new", lease=new)
        await old_q.ensure_group()
        with pytest.raises(Fenced):
            await old_q.publish([("r1", OutputEvent(0, [7]))], stats=("tessera:test-g", {"a": 1}))
        with pytest.raises(Fenced):
            await old_q.exchange([("r1", OutputEvent(0, [7]))], [], None, read_count=0)
        assert await client.exists(schema.output_stream("r1"), "tessera:test-g") == 0
        await new_q.publish([("r1", OutputEvent(0, [8]))])
        await new_q.publish([("r1", OutputEvent(0, [9]))])   # the same index again: skipped
        events = await new_q.read_emitted("r1")
        assert [e.token_ids for e in events] == [[8]]
        # A lease that expired with nobody taking it is re-taken with the same epoch.
        epoch = new.epoch
        await client.delete(key)
        assert await new.try_acquire() and new.epoch == epoch
        await client.delete(schema.output_stream("r1"))
        await client.aclose()
    asyncio.run(main())


def test_workers_refuse_an_older_lease_epoch(tiny_model) -> None:
    port = free_port()
    worker = start(["worker", "--model", str(tiny_model("llama")), "--port", str(port),
                    "--kv-cache-memory-gb", "0.02", "--metrics-port", "0"], "worker ready")
    old = GrpcExecutor([f"127.0.0.1:{port}"], epoch=10)
    new = GrpcExecutor([f"127.0.0.1:{port}"], epoch=11)
    try:
        old.info(60)
        assert old.warmup(64, 4) > 0
        old.reset()
        new.info(60)
        new.reset()   # the successor resets the group with its newer epoch
        with pytest.raises(Fenced):
            old.execute(StepPlan(step_id=1))
        with pytest.raises(Fenced):
            old.reset()
        new.execute(StepPlan(step_id=1))   # the successor is served
    finally:
        old.close()
        new.close()
        stop(worker)


def test_a_scheduler_paused_past_its_lease_stops_on_waking(services: Services) -> None:
    """SIGSTOP of the active scheduler under 32 streams until its standby took the lease and
    its requests, then SIGCONT: the woken one writes nothing more and exits (its supervisor
    would restart it as a standby); every stream ends as in the fault-free run, no event
    twice."""
    paused, _ = services.active()
    lease_key = schema.group_lease(services.name, "0")

    def fault() -> None:
        paused.send_signal(signal.SIGSTOP)
        with redis.Redis.from_url(services.redis_url) as r:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                holder = r.get(lease_key)
                if holder and holder_pid(holder) != paused.pid:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the standby did not take the lease")
        time.sleep(2.0)   # the successor claims the paused one's requests and steps
        paused.send_signal(signal.SIGCONT)

    try:
        streams_through(services, fault, max_tokens=160)
        # It stops by itself on waking: at its next lease renewal or publish, or, when it was
        # paused with a step in flight, once that step's wait ends (the step timeout, 30 s by
        # default: the process exits after its last worker call returns).
        deadline = time.monotonic() + LEASE_MS / 1000 * 3 + STEP_TIMEOUT_S
        while paused.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if paused.poll() is None:
            paused.send_signal(signal.SIGCONT)
    assert paused.poll() is not None, "the fenced scheduler stopped"
    successor, _ = services.active()
    assert successor is not paused and successor.poll() is None
    services.add_scheduler(0)
