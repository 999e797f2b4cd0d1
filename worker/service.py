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
import dataclasses
import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.config import SchedulingConfig, WorkerConfig
from common.convert import step_output_to_proto, step_plan_from_proto
from common.step import FENCED_DETAIL
from common.http_probe import start_probe
from common.model_config import ModelConfig
from common.proto.tessera.v1 import worker_pb2, worker_pb2_grpc
from common.tls import server_credentials
from worker.group import group_device, join_group
from worker.parallel import get_pp_stage, get_tp_group
from worker.runner import ModelRunner
from worker.telemetry import WorkerHealth, WorkerTelemetry
from worker.worker import StepMismatchError, Worker

logger = logging.getLogger(__name__)


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model)
        runner = ModelRunner(self.model_config, config.dtype, num_blocks=0,
                             block_size=config.block_size, device=config.device,
                             kv_cache_dtype=config.kv_cache_dtype)
        self.tp, self.pp = get_tp_group(), get_pp_stage()
        self.worker = Worker(runner, seed=config.seed,
                             is_driver=self.pp.is_last and self.tp.rank == 0,
                             model_dir=config.model)
        if self.worker.is_driver:   # the rank that samples: grammars are ready before a step
            self.grammars_ready = self.worker.grammars.prewarm()
        device = runner.device
        # A new thread's current CUDA device is GPU 0 (the runner also sets it per call).
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="step",
            initializer=torch.cuda.set_device if device.type == "cuda" else None,
            initargs=(device,) if device.type == "cuda" else ())
        self._order = asyncio.Condition()
        self.warmed_up = False
        self.epoch = 0   # the newest scheduler lease epoch seen (scheduler.fence)
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
        c = self.config
        # Every Warmup (schedulers send one after each restart) sizes the cache afresh.
        return self.worker.warmup(max_tokens, max_seqs, c.kv_cache_memory_bytes,
                                  c.gpu_memory_utilization, c.enforce_eager)

    async def _group_failed(self, context, e: Exception) -> None:
        """A collective failed: a peer is gone and this process group cannot be repaired in
        place. Answer, then exit so that the supervisor restarts the worker."""
        logger.error("worker group broken (%s): exiting", e)
        asyncio.get_running_loop().call_later(0.5, os._exit, 3)
        await context.abort(grpc.StatusCode.UNAVAILABLE, f"worker group broken: {e}")

    async def _fence(self, epoch: int, context) -> None:
        """Refuse a scheduler whose lease is older than the newest one seen: it was paused
        past its lease and its successor drives this group now (scheduler.fence)."""
        if epoch < self.epoch:
            logger.warning("refused a call of an older scheduler (lease epoch %d < %d)",
                           epoch, self.epoch)
            await context.abort(grpc.StatusCode.ABORTED, FENCED_DETAIL)
        self.epoch = epoch

    async def Warmup(self, request, context) -> worker_pb2.WarmupResponse:
        await self._fence(request.lease_epoch, context)
        defaults = SchedulingConfig   # a request without sizes: the settings' defaults
        try:
            num_blocks, per_block = await self._run(
                self._warmup, request.max_num_batched_tokens or defaults.max_num_batched_tokens,
                request.max_num_seqs or defaults.max_num_seqs)
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
        await self._fence(request.lease_epoch, context)
        if not self.warmed_up:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Warmup first")
        try:
            plan = step_plan_from_proto(request)
            out = await self._execute_in_order(plan, request.lease_epoch, context)
        except StepMismatchError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except RuntimeError as e:
            if self.config.world_size == 1:
                raise
            await self._group_failed(context, e)
        return step_output_to_proto(out)

    async def _execute_in_order(self, plan, epoch: int, context):
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
            await self._fence(epoch, context)   # a newer scheduler may have reset meanwhile
            try:
                with self.telemetry.step(plan, context):   # the order wait is not step time
                    return await self._run(self.worker.execute, plan)
            finally:
                self._order.notify_all()

    async def Reset(self, request, context) -> worker_pb2.ResetResponse:
        await self._fence(request.lease_epoch, context)
        async with self._order:
            await self._run(self.worker.reset)
            self._order.notify_all()
        return worker_pb2.ResetResponse()


async def heartbeat(config: WorkerConfig, address: str) -> None:
    """Register in the model's worker registry and keep a heartbeat key alive: the key
    vanishing (TTL) is how the rest of the system learns that this worker is gone."""
    from redis.exceptions import RedisError

    from common import redis_schema as schema
    from common.redis_client import connect

    worker_id = config.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    client = connect(config.redis_url)
    key = schema.worker_heartbeat(config.model_name, worker_id)
    ttl_ms = int(config.heartbeat_ttl_s * 1000)
    registry = schema.workers_registry(config.model_name)
    tp, pp = get_tp_group(), get_pp_stage()
    entry = json.dumps(
        {"address": address, "model": config.model, "device": config.device,
         "group": config.group, "rank": config.rank, "tp_rank": tp.rank, "tp_size": tp.size,
         "pp_rank": pp.rank, "pp_size": pp.size})
    try:
        while True:
            # The entry with every beat: a Redis that lost it (restarted) learns it again.
            try:
                async with client.pipeline(transaction=False) as pipe:
                    pipe.hset(registry, worker_id, entry)
                    pipe.set(key, address, px=ttl_ms)
                    await pipe.execute()
            except (RedisError, OSError) as e:   # past the client's retries: beat on
                logger.warning("heartbeat: Redis does not answer (%s)", e)
            await asyncio.sleep(config.heartbeat_ttl_s / 3)
    finally:
        try:   # the TTL removes the key anyway: do not hang a shutdown on a dead Redis
            await asyncio.wait_for(asyncio.gather(client.delete(key),
                                                  client.hdel(registry, worker_id)), 2.0)
        except (RedisError, OSError, asyncio.TimeoutError):
            pass
        await client.aclose()


async def serve(config: WorkerConfig, ready: asyncio.Event | None = None) -> None:
    """Run the worker service until cancelled."""
    config = dataclasses.replace(config, device=group_device(config))   # this rank's GPU
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
    tls = config.internal_tls
    bound = (server.add_secure_port(address, server_credentials(tls)) if tls
             else server.add_insecure_port(address))
    if bound == 0:
        raise OSError(f"cannot listen on {address}")
    await server.start()
    logger.info("worker serving %s on %s%s", config.model, address,
                " (mutual TLS)" if tls else "")
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
