"""Gateway process entry: the HTTP (uvicorn) and gRPC (grpc.aio) faces in one event loop.

Stateless: every replica serves any request (its state is in Redis), so a deployment scales
gateways by count alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pathlib
import signal

import redis.asyncio as aioredis
import uvicorn

from common.config import GatewayConfig
from common.redis_client import connect
from gateway.auth import Tenants
from gateway.state import GatewayState
from gateway.grpc_api import create_server
from gateway.openai_api import create_app, create_ops_app

logger = logging.getLogger(__name__)


async def serve(config: GatewayConfig) -> None:
    """Serve until cancelled; prints "gateway ready http://HOST:PORT grpc HOST:PORT" once
    both faces listen. ``run_until_signal`` wraps it for a process of its own."""
    redis = connect(config.redis_url, max_connections=config.max_redis_connections)
    # $TESSERA_API_KEY is read here, when the process starts serving (not at import).
    tenants = Tenants.from_settings(config.api_key or os.environ.get("TESSERA_API_KEY") or None,
                                    config.tenants_file)
    state = GatewayState.load(config.model, config.model_name, redis,
                              max_body_bytes=config.max_body_bytes,
                              max_model_len=config.max_model_len,
                              resume_ttl_s=config.resume_ttl_s, tenants=tenants,
                              shared_prefix_cache=config.shared_prefix_cache,
                              max_queued_requests=config.max_queued_requests)
    if tenants.path:   # SIGHUP re-reads the tenants file (main thread only)
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, tenants.reload)
    tls = None
    if config.ssl_certfile and config.ssl_keyfile:
        tls = (pathlib.Path(config.ssl_certfile).read_bytes(),
               pathlib.Path(config.ssl_keyfile).read_bytes())
    grpc_server, grpc_port = await create_server(state, f"{config.host}:{config.grpc_port}",
                                                 tls=tls)
    http = _uvicorn(create_app(state), config.host, config.http_port, config.ssl_certfile,
                    config.ssl_keyfile)
    # uvicorn would take over SIGINT/SIGTERM and re-raise them after its own shutdown, which
    # skips ours (gRPC, Redis); the caller owns signals and cancels serve() instead.
    http.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    ops = None
    if config.metrics_port is not None:   # plain HTTP: probes and scrapers, no prompt data
        ops = _uvicorn(create_ops_app(state), config.host, config.metrics_port, None, None)
        ops.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    await grpc_server.start()
    http_task = asyncio.create_task(http.serve())
    ops_task = asyncio.create_task(ops.serve()) if ops is not None else None
    try:
        while not http.started:
            if http_task.done():   # failed to bind: surface uvicorn's error
                await http_task
                raise OSError(f"the HTTP server did not start on {config.host}:{config.http_port}")
            await asyncio.sleep(0.02)
        http_port = http.servers[0].sockets[0].getsockname()[1]
        scheme = "https" if tls else "http"
        print(f"gateway ready {scheme}://{config.host}:{http_port} grpc {config.host}:{grpc_port}",
              flush=True)
        logger.info("serving model %s", config.model_name)
        prepared = asyncio.create_task(_prepare_grammars(state))
        await http_task
        prepared.cancel()
    finally:
        http.should_exit = True
        if ops is not None:
            ops.should_exit = True
        await asyncio.shield(_stop(http_task, grpc_server, redis, ops_task))


async def _prepare_grammars(state: GatewayState) -> None:
    """Import xgrammar and build the tokenizer's tables once the gateway is up, on a thread:
    lazily, the first structured request waited ~2.5 s for them while the import held the
    GIL under every stream the gateway relayed."""
    try:
        await asyncio.to_thread(state.grammars.prepare)
    except Exception as e:   # noqa: BLE001 - a structured request then gets the error (a 4xx)
        logger.warning("structured output is not available: %s", e)


def _uvicorn(app: object, host: str, port: int, certfile: str | None,
             keyfile: str | None) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                         access_log=False, lifespan="off",
                                         ssl_certfile=certfile, ssl_keyfile=keyfile,
                                         log_config=None))   # our handlers (--log-format)


async def _stop(http_task: asyncio.Task, grpc_server: object, redis: aioredis.Redis,
                ops_task: asyncio.Task | None = None) -> None:
    for task in (http_task, ops_task):
        if task is None:
            continue
        try:
            await asyncio.wait_for(task, 5)
        except (asyncio.TimeoutError, asyncio.CancelledError, Exception):   # noqa: BLE001
            pass
    await grpc_server.stop(grace=2)   # type: ignore[attr-defined]
    await redis.aclose()


async def run_until_signal(config: GatewayConfig) -> None:
    """``serve`` until SIGINT or SIGTERM, then shut down in order (main thread only)."""
    task = asyncio.ensure_future(serve(config))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
