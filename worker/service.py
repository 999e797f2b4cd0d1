"""The worker service (`tessera worker`): a gRPC server around the model runner.

It holds a model shard and the KV cache tensors, nothing else: every sequence it knows was
sent by its scheduler and is sent again in full after a Reset, so a restarted worker loses
no request. Steps run one at a time and in step-id order (the model is not re-entrant, and
the ranks of a group must enter their collectives in the same order): on CPU on the event
loop's thread (see `_run` for why), on CUDA in one worker thread.

In a group of TP x PP workers (`--tensor-parallel-size`, `--pipeline-parallel-size`,
`--rank`), the ranks meet at a torch.distributed TCP store: `--dist-init-addr`, or the
address rank 0 publishes in Redis. A collective that fails (a peer died) leaves the group
unusable, so the worker answers UNAVAILABLE and exits; its supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.convert import step_output_to_proto, step_plan_from_proto
from common.http_probe import start_probe
from common.model_config import ModelConfig
from common.proto.tessera.v1 import worker_pb2, worker_pb2_grpc
from worker.group import join_group
from worker.kv_cache import kv_cache_bytes_per_block
from worker.parallel import get_pp_stage, get_tp_group
from worker.runner import ModelRunner
from worker.telemetry import WorkerHealth, WorkerTelemetry
from worker.worker import StepMismatchError, Worker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerConfig:
    model: str
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    host: str = "127.0.0.1"
    port: int = 50061
    kv_cache_memory_bytes: int = 2 << 30      # the KV budget on CPU
    gpu_memory_utilization: float = 0.9       # the fraction of GPU memory this process may use
    seed: int = 0
    redis_url: str | None = None              # where to register (None: not registered)
    served_model_name: str | None = None
    worker_id: str | None = None
    heartbeat_ttl_s: float = 5.0
    metrics_port: int = 8002                  # /metrics /health /ready on ``host``; 0: none
    ready_timeout_s: float = 10.0             # not ready while a step runs longer than this
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    rank: int = 0                             # in the group: pp_stage * tp_size + tp_rank
    dist_init_addr: str | None = None         # host:port of rank 0's TCP store
    group: str = "0"                          # the worker group's name (Redis rendezvous)
    dist_timeout_s: float = 120.0
    enforce_eager: bool = False               # CUDA: no decode graphs
    kv_cache_dtype: str = "auto"              # KV storage: auto (the compute dtype) or a dtype

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        runner = ModelRunner(self.model_config, config.dtype, num_blocks=0,
                             block_size=config.block_size, device=config.device,
                             kv_cache_dtype=config.kv_cache_dtype)
        self.tp, self.pp = get_tp_group(), get_pp_stage()
        self.worker = Worker(runner, seed=config.seed,
                             is_driver=self.pp.is_last and self.tp.rank == 0)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")
        self._order = asyncio.Condition()
        self.warmed_up = False
        self.telemetry = WorkerTelemetry(config.model_name, config.ready_timeout_s)

    async def _run(self, fn, *args):
        # NOTE: model work runs on the event loop's own thread (the main thread), blocking the
        # loop for the length of a step. Measured on a 2-core CPU: the same 64-token step took
        # 12 ms on the main thread and 21 ms from a pool thread, because two OpenMP teams (the
        # main thread's, from loading the model, and the pool thread's) spin against each other.
        # On CUDA the step mostly waits on the device, so a thread would cost nothing there.
        if self.worker.runner.device.type == "cpu":
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def Info(self, request, context) -> worker_pb2.InfoResponse:
        cfg = self.model_config
        start, end = self.pp.layer_range(cfg.num_layers)
        return worker_pb2.InfoResponse(
            model=self.config.model, dtype=str(self.worker.runner.dtype).removeprefix("torch."),
            block_size=self.config.block_size, tp_rank=self.tp.rank, tp_size=self.tp.size,
            pp_rank=self.pp.rank, pp_size=self.pp.size, layer_start=start, layer_end=end,
            max_model_len=cfg.max_position_embeddings, vocab_size=cfg.vocab_size)

    def _warmup(self, max_tokens: int, max_seqs: int) -> tuple[int, int]:
        runner = self.worker.runner
        runner.profile_run(max(1, max_tokens), max(1, max_seqs))
        per_block = kv_cache_bytes_per_block(self.model_config, self.config.block_size,
                                             runner.kv_cache_dtype)
        if runner.device.type == "cuda":
            # What the activations of a worst-case step did not use, within our share.
            free, total = torch.cuda.mem_get_info(runner.device)
            used_by_others = total - free
            budget = int(total * self.config.gpu_memory_utilization) - used_by_others
        else:
            budget = self.config.kv_cache_memory_bytes
        num_blocks = max(budget // per_block, 0)
        runner.allocate_kv_cache(num_blocks)
        if runner.device.type == "cuda" and not self.config.enforce_eager and num_blocks:
            runner.capture_decode_graphs(max_seqs)
        self.worker.reset()
        return num_blocks, per_block

    async def _group_failed(self, context, e: Exception) -> None:
        """A collective failed: a peer is gone and this process group cannot be repaired in
        place. Answer, then exit so that the supervisor restarts the worker."""
        logger.error("worker group broken (%s): exiting", e)
        asyncio.get_running_loop().call_later(0.5, os._exit, 3)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker group broken: {e}")

    async def Warmup(self, request, context) -> worker_pb2.WarmupResponse:
        try:
            num_blocks, per_block = await self._run(
                self._warmup, request.max_num_batched_tokens or 2048, request.max_num_seqs or 256)
        except RuntimeError as e:
            if self.config.world_size == 1:
                raise
            await self._group_failed(context, e)
        if num_blocks == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                "no memory left for a single KV block")
        self.warmed_up = True
        self.telemetry.warmed_up(num_blocks)
        logger.info("warm: %d KV blocks of %d bytes", num_blocks, per_block)
        return worker_pb2.WarmupResponse(num_blocks=num_blocks, block_bytes=per_block)

    async def Execute(self, request, context) -> worker_pb2.StepOutput:
        if not self.warmed_up:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Warmup first")
        try:
            plan = step_plan_from_proto(request)
            out = await self._execute_in_order(plan, context)
        except StepMismatchError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            if self.config.world_size == 1:
                raise
            await self._group_failed(context, e)
        return step_output_to_proto(out)

    async def _execute_in_order(self, plan, context):
        """Run steps strictly in step-id order: a pipelining scheduler has several in flight,
        and every rank must run them (and their collectives) in the same order. A step whose
        predecessor never arrives runs after a while anyway and fails the worker's checks."""
        async with self._order:
            def its_turn() -> bool:
                return plan.step_id <= self.worker.last_step_id + 1

            if not its_turn():   # only pipelined steps ever wait; the others skip the timer
                try:
                    await asyncio.wait_for(self._order.wait_for(its_turn), timeout=5.0)
                except asyncio.TimeoutError:
                    pass
            try:
                with self.telemetry.step(plan, context):   # the order wait is not step time
                    return await self._run(self.worker.execute, plan)
            finally:
                self._order.notify_all()

    async def Reset(self, request, context) -> worker_pb2.ResetResponse:
        async with self._order:
            await self._run(self.worker.reset)
            self._order.notify_all()
        return worker_pb2.ResetResponse()


async def heartbeat(config: WorkerConfig, address: str) -> None:
    """Register in the model's worker registry and keep a heartbeat key alive: the key
    vanishing (TTL) is how the rest of the system learns that this worker is gone."""
    import redis.asyncio as aioredis

    from common import redis_schema as schema

    worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    client = aioredis.from_url(config.redis_url)
    key = schema.worker_heartbeat(config.model_name, worker_id)
    ttl_ms = int(config.heartbeat_ttl_s * 1000)
    try:
        tp, pp = get_tp_group(), get_pp_stage()
        await client.hset(schema.workers_registry(config.model_name), worker_id, json.dumps(
            {"address": address, "model": config.model, "device": config.device,
             "group": config.group, "rank": config.rank, "tp_rank": tp.rank, "tp_size": tp.size,
             "pp_rank": pp.rank, "pp_size": pp.size}))
        while True:
            await client.set(key, address, px=ttl_ms)
            await asyncio.sleep(config.heartbeat_ttl_s / 3)
    finally:
        await client.delete(key)
        await client.hdel(schema.workers_registry(config.model_name), worker_id)
        await client.aclose()


async def serve(config: WorkerConfig, ready: asyncio.Event | None = None) -> None:
    """Run the worker service until cancelled."""
    if config.world_size > 1:
        await join_group(config)
    servicer = WorkerServicer(config)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    health_servicer = WorkerHealth(servicer.telemetry, worker_pb2.DESCRIPTOR.services_by_name[
        "Worker"].full_name)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    probe = start_probe(config.host, config.metrics_port, servicer.telemetry.render,
                        servicer.telemetry.status)
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    logger.info("worker serving %s on %s", config.model, address)
    shard = (f" (group {config.group}, rank {config.rank}: tp {servicer.tp.rank}/{servicer.tp.size}"
             f", pp {servicer.pp.rank}/{servicer.pp.size})" if config.world_size > 1 else "")
    print(f"worker ready on {address}{shard}", flush=True)
    if ready is not None:
        ready.set()
    beat = asyncio.create_task(heartbeat(config, address)) if config.redis_url else None
    try:
        await server.wait_for_termination()
    finally:
        if beat is not None:
            beat.cancel()
        if probe is not None:
            probe.stop()
        await server.stop(grace=1)
