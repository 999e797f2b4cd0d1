"""The scheduler service (`tessera scheduler`): claims a worker group by a lease in Redis,
sizes its KV pool from the workers' warm-up, and runs the engine loop.

One scheduler drives a worker group; a standby started for the same group waits on the lease
and takes over when the holder stops renewing it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass

import redis.asyncio as aioredis

from common import redis_schema as schema
from common.model_config import ModelConfig
from scheduler.executor import GrpcExecutor
from scheduler.loop import EngineLoop
from scheduler.observability import SchedulerObservability
from scheduler.queue import RequestQueue
from scheduler.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerServiceConfig:
    model: str                          # local model directory (config, eos ids, context)
    workers: tuple[str, ...]            # worker gRPC addresses of the group
    redis_url: str = "redis://127.0.0.1:6379/0"
    served_model_name: str | None = None
    group: str = "0"
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    lease_ms: int = 5000
    step_timeout_s: float = 30.0
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    ready_timeout_s: float = 10.0       # ready: a forward pass finished within this
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8001            # /metrics /health /ready; 0: none
    max_deliveries: int = 3             # a request re-delivered more often is dead-lettered

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))


class Lease:
    """SET NX PX on the group's lease key, renewed while we hold it."""

    def __init__(self, client: aioredis.Redis, key: str, owner: str, ttl_ms: int) -> None:
        self.client, self.key, self.owner, self.ttl_ms = client, key, owner, ttl_ms

    async def acquire(self) -> None:
        while not await self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms):
            await asyncio.sleep(self.ttl_ms / 5000)

    async def renew_forever(self, lost: asyncio.Event) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            holder = await self.client.get(self.key)
            if holder is None or (holder.decode() if isinstance(holder, bytes) else holder) != self.owner:
                logger.error("lost the lease %s (now held by %r): stopping", self.key, holder)
                lost.set()
                return
            await self.client.pexpire(self.key, self.ttl_ms)

    async def release(self) -> None:
        holder = await self.client.get(self.key)
        if holder is not None and (holder.decode() if isinstance(holder, bytes) else holder) == self.owner:
            await self.client.delete(self.key)


async def serve(config: SchedulerServiceConfig) -> None:
    model_config = ModelConfig.from_dir(config.model)
    limit = model_config.max_position_embeddings
    max_model_len = min(config.max_model_len or limit, limit)
    consumer = f"{socket.gethostname()}-{os.getpid()}"
    client = aioredis.from_url(config.redis_url)
    obs = SchedulerObservability(config.model_name, config.group, max_model_len,
                                 config.ready_timeout_s, config.metrics_host, config.metrics_port)
    lease = Lease(client, schema.group_lease(config.model_name, config.group), consumer,
                  config.lease_ms)
    logger.info("waiting for the lease of group %s", config.group)
    obs.readiness.standby = True
    await lease.acquire()
    obs.readiness.standby = False   # active: ready once the warm-up's forward pass is done
    lost = asyncio.Event()
    # Renew from the start: warming the workers up can take longer than the lease lives.
    renew = asyncio.create_task(lease.renew_forever(lost))
    executor = GrpcExecutor(list(config.workers), step_timeout_s=config.step_timeout_s)
    try:
        infos = await asyncio.to_thread(executor.info, 600.0)
        tp, pp = infos[0].tp_size, infos[0].pp_size
        if (tp, pp) != (config.tensor_parallel_size, config.pipeline_parallel_size):
            raise ValueError(f"the workers form a {tp}x{pp} (TP x PP) group, the flags say "
                             f"{config.tensor_parallel_size}x{config.pipeline_parallel_size}")
        num_blocks = await asyncio.to_thread(executor.warmup, config.max_num_batched_tokens,
                                             config.max_num_seqs)
        obs.readiness.mark_forward()   # the warm-up ran a worst-case forward pass
        scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, block_size=config.block_size, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens, max_model_len=max_model_len,
            enable_prefix_caching=config.enable_prefix_caching))
        queue = RequestQueue(client, config.model_name, consumer,
                             max_deliveries=config.max_deliveries)
        await queue.ensure_group()
        loop = EngineLoop(scheduler, executor, queue, model_config.eos_token_ids,
                          stats_key=schema.scheduler_stats(config.model_name, config.group),
                          pipeline_depth=pp, observer=obs.observer(scheduler, queue))
        obs.start(client, queue)
        print(f"scheduler ready: model {config.model_name}, group {config.group}, "
              f"{num_blocks} KV blocks, {tp}x{pp} (TP x PP) workers {','.join(config.workers)}",
              flush=True)
        loop.stopped = lost
        await loop.run()
    finally:
        renew.cancel()
        await obs.close()
        executor.close()
        await lease.release()
        await client.aclose()
