"""The scheduler service (`tessera scheduler`): claims a worker group by a lease in Redis,
sizes its KV pool from the workers' warm-up, and runs the engine loop (scheduler.loop) around
the engine core (scheduler.engine_core).

One scheduler drives a worker group; a standby started for the same group waits on the lease
and takes over when the holder stops renewing it. Redis going away is a pause: the client
retries with backoff (common/redis_client.py), and a lease that expired meanwhile is taken
again unless another scheduler holds it by then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

import redis.asyncio as aioredis

from common import redis_schema as schema
from common.config import SchedulerServiceConfig, resolve_max_model_len
from common.redis_client import connect
from common.model_config import ModelConfig
from common.tls import channel_credentials
from scheduler.engine_core import EngineCore
from scheduler.executor import GrpcExecutor
from scheduler.fence import Lease
from scheduler.loop import EngineLoop
from scheduler.observability import SchedulerObservability
from scheduler.queue import RequestQueue
from scheduler.scheduler import SchedulerConfig

logger = logging.getLogger(__name__)


async def serve(config: SchedulerServiceConfig) -> None:
    model_config = ModelConfig.from_dir(config.model)
    max_model_len = resolve_max_model_len(config.max_model_len,
                                          model_config.max_position_embeddings)
    consumer = f"{socket.gethostname()}-{os.getpid()}"
    client = connect(config.redis_url)
    obs = SchedulerObservability(config.model_name, config.group, max_model_len,
                                 config.ready_timeout_s, config.metrics_host, config.metrics_port)
    lease = Lease(client, schema.group_lease(config.model_name, config.group), consumer,
                  config.lease_ms)
    obs.readiness.standby = True
    if not await lease.try_acquire():
        # Started (a process supervisor waits for this line) and standing by.
        print(f"scheduler ready: standby, waiting for the lease of group {config.group} "
              f"(model {config.model_name})", flush=True)
        await lease.acquire()
        logger.warning("took the lease of group %s: taking over its requests", config.group)
    obs.readiness.standby = False   # active: ready once the warm-up's forward pass is done
    lost = asyncio.Event()
    # Renew from the start: warming the workers up can take longer than the lease lives.
    renew = asyncio.create_task(lease.renew_forever(lost))
    tls = config.internal_tls
    executor = GrpcExecutor(list(config.workers), step_timeout_s=config.step_timeout_s,
                            credentials=channel_credentials(tls) if tls else None,
                            epoch=lease.epoch)
    try:
        infos = await asyncio.to_thread(executor.info, 600.0)
        tp, pp = infos[0].tp_size, infos[0].pp_size
        if (tp, pp) != (config.tensor_parallel_size, config.pipeline_parallel_size):
            raise ValueError(f"the workers form a {tp}x{pp} (TP x PP) group, the flags say "
                             f"{config.tensor_parallel_size}x{config.pipeline_parallel_size}")
        num_blocks = await asyncio.to_thread(executor.warmup, config.max_num_batched_tokens,
                                             config.max_num_seqs)
        obs.readiness.mark_forward()   # the warm-up ran a worst-case forward pass
        # A step of a previous scheduler may still be in flight on the workers, and they hold
        # its sequences: start from a clean slate (the requests are recomputed from Redis).
        await asyncio.to_thread(executor.reset)
        core = EngineCore(SchedulerConfig.from_settings(config, num_blocks, max_model_len),
                          model_config.eos_token_ids, obs.observer())
        queue = RequestQueue(client, config.model_name, consumer,
                             max_deliveries=config.max_deliveries, lease=lease)
        obs.watch(core.scheduler, queue)
        await queue.ensure_group()
        loop = EngineLoop(core, executor, queue,
                          stats_key=schema.scheduler_stats(config.model_name, config.group),
                          pipeline_depth=pp, claim_idle_ms=config.claim_idle_ms,
                          request_timeout_s=config.request_timeout_s, group=config.group,
                          # Told of other groups: what it cannot start stays in Redis for them.
                          max_waiting_requests=(config.max_waiting_requests
                                                if config.data_parallel_size == 1 else 0))
        obs.start(client, queue, held=lambda: loop.held)
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
