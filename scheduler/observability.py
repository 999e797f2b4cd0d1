"""The scheduler service's observability in one object: Prometheus metrics, readiness, the
``/metrics`` ``/health`` ``/ready`` server, and the background tasks that publish readiness to
Redis and poll the request stream's depth (scheduler.metrics, scheduler.health,
scheduler.telemetry hold the parts).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio as aioredis

from common.http_probe import start_probe
from scheduler.health import Readiness, publish_readiness
from scheduler.metrics import SchedulerMetrics
from scheduler.queue import RequestQueue
from scheduler.scheduler import Scheduler
from scheduler.telemetry import EngineObserver

logger = logging.getLogger(__name__)


class SchedulerObservability:
    def __init__(self, model_name: str, group: str, max_model_len: int,
                 ready_timeout_s: float = 10.0, metrics_host: str = "0.0.0.0",
                 metrics_port: int = 8001) -> None:
        self.model_name, self.group = model_name, group
        self.metrics = SchedulerMetrics(model_name, max_model_len)
        self.readiness = Readiness(ready_timeout_s)
        self.metrics.ready.set_function(lambda: float(self.readiness.remaining_s() > 0))
        # Liveness answers from the start; readiness waits for the warm-up's forward pass.
        self.probe = start_probe(metrics_host, metrics_port, self.metrics.render,
                                 self.readiness.status)
        self._tasks: list[asyncio.Task] = []

    def observer(self) -> EngineObserver:
        """The engine core's and loop's hooks."""
        return EngineObserver(self.metrics, self.readiness)

    def watch(self, scheduler: Scheduler, queue: RequestQueue | None = None) -> None:
        """Export the scheduler's own counts (and the queue's dead letters) at scrape time."""
        self.metrics.watch(scheduler, queue)

    def start(self, client: aioredis.Redis, queue: RequestQueue,
              queue_poll_s: float = 1.0, held: Callable[[], int] = lambda: 0) -> None:
        """``held``: requests this scheduler read past its window (EngineLoop.held), which
        the queue depth counts with the stream's lag."""
        self._tasks = [
            asyncio.create_task(publish_readiness(client, self.model_name, self.group,
                                                  self.readiness)),
            asyncio.create_task(self._poll_queue(queue, queue_poll_s, held)),
        ]

    async def _poll_queue(self, queue: RequestQueue, period_s: float,
                          held: Callable[[], int]) -> None:
        """The request stream's depth, for autoscaling (one XINFO GROUPS + XLEN a period)."""
        while True:
            try:
                stats = await queue.consumer_lag()
                self.metrics.queue_depth.set(stats.waiting + held())
                self.metrics.queue_pending.set(stats.pending)
            except (aioredis.RedisError, OSError) as e:
                logger.warning("cannot read the request stream's depth: %s", e)
            await asyncio.sleep(period_s)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.probe is not None:
            self.probe.stop()
