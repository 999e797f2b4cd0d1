"""The ``tessera`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its flags and binds
its handler with ``set_defaults(handler=...)``; adding a subcommand is adding one such pair
and one line in ``_build_parser``. Handlers import their heavy modules lazily so that
``tessera --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common import logging_setup


def _observe(args: argparse.Namespace, service: str) -> None:
    """Logging (--log-format, --log-prompts) and tracing (OTEL_* variables) of a service."""
    from common.telemetry import setup_tracing

    logging_setup.configure(args.log_format, args.log_prompts, service=service)
    setup_tracing(service)


def _add_make_model(subparsers: argparse._SubParsersAction) -> None:
    from tessera.make_model import ARCHS, DTYPES, PRESETS

    p = subparsers.add_parser(
        "make-model",
        help="write a random-weight HF checkpoint with a real tokenizer",
        description="Write a random-weight Hugging Face checkpoint (config, safetensors, tokenizer, "
        "chat template) for demos, tests and benchmarks. Weights are deterministic for a seed.",
    )
    p.add_argument("out_dir", metavar="DIR", help="output directory (created if missing)")
    p.add_argument("--arch", required=True, choices=ARCHS, help="model architecture")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS), help="model size (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="stored dtype (default: float32)")
    p.set_defaults(handler=_run_make_model)


def _run_make_model(args: argparse.Namespace) -> int:
    from tessera.make_model import make_model, num_parameters

    out = make_model(args.out_dir, args.arch, preset=args.preset, seed=args.seed, dtype=args.dtype)
    millions = num_parameters(args.arch, args.preset) / 1e6
    print(f"wrote {args.arch}/{args.preset} ({millions:.1f}M parameters, {args.dtype}, seed {args.seed}) to {out}")
    return 0


def _add_generate(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from prompts with the offline API",
        description="Load a local model directory and generate from one or more prompts, "
        "in process (no services).")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt; repeat the flag for several")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import time

    from tessera import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed)
    start = time.perf_counter()
    outputs = llm.generate(args.prompt, params)
    elapsed = time.perf_counter() - start
    for out in outputs:
        completion = out.outputs[0]
        print(f"prompt: {out.prompt!r}")
        print(f"output: {completion.text!r}")
        print(f"        ({len(completion.token_ids)} tokens, finish_reason={completion.finish_reason})")
    total = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"generated {total} tokens in {elapsed:.2f} s")
    return 0


def _add_worker(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "worker", help="run a worker service (model shard + KV cache, gRPC)",
        description="Serve one model shard over gRPC (tessera.v1.Worker): Info, Warmup, "
        "Execute, Reset. Its scheduler sends every step; the worker keeps no request state "
        "the scheduler cannot resend.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50061)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-gb", type=float, default=2.0,
                   help="KV cache budget on CPU, in GiB (default 2)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory this worker may use (default 0.9)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--redis-url", default=None,
                   help="register in this Redis with a heartbeat key (optional)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--worker-id", default=None, help="default: HOSTNAME-PID")
    _add_parallel_sizes(p)
    p.add_argument("--rank", default="0",
                   help="this worker's rank in its group, pp_stage * tp_size + tp_rank; "
                   "'hostname' takes the trailing ordinal of $HOSTNAME (StatefulSet pods)")
    p.add_argument("--dist-init-addr", default=None, metavar="HOST:PORT",
                   help="the group's torch.distributed TCP store, hosted by rank 0 (default: "
                   "rank 0 publishes one in Redis)")
    p.add_argument("--group", default="0", help="worker group name (default 0)")
    p.add_argument("--dist-timeout", type=float, default=120.0,
                   help="seconds a group waits to form, and a collective waits for a peer")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run decode steps eagerly instead of replaying CUDA graphs")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],  # worker/kv_cache.py
                   help="KV cache storage dtype; auto: the compute dtype (default). A half type "
                        "halves the bytes attention reads (computed in float32 on CPU)")
    p.add_argument("--metrics-port", type=int, default=8002,
                   help="HTTP /metrics /health /ready on --host (default 8002; 0: none)")
    p.add_argument("--ready-timeout", type=float, default=10.0,
                   help="not ready while a step runs longer than this, in seconds (default 10)")
    logging_setup.add_arguments(p)
    p.set_defaults(handler=_run_worker)


def _add_parallel_sizes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="workers per pipeline stage, splitting each layer (default 1)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="pipeline stages, each holding a range of layers (default 1)")


def _run_worker(args: argparse.Namespace) -> int:
    import asyncio

    from worker.group import rank_from_hostname
    from worker.service import WorkerConfig, serve

    _observe(args, "worker")
    rank = rank_from_hostname() if args.rank == "hostname" else int(args.rank)
    config = WorkerConfig(model=args.model, dtype=args.dtype, device=args.device,
                          block_size=args.block_size, host=args.host, port=args.port,
                          kv_cache_memory_bytes=int(args.kv_cache_memory_gb * (1 << 30)),
                          gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed,
                          redis_url=args.redis_url, served_model_name=args.served_model_name,
                          worker_id=args.worker_id, tensor_parallel_size=args.tensor_parallel_size,
                          pipeline_parallel_size=args.pipeline_parallel_size, rank=rank,
                          dist_init_addr=args.dist_init_addr, group=args.group,
                          dist_timeout_s=args.dist_timeout, enforce_eager=args.enforce_eager,
                          kv_cache_dtype=args.kv_cache_dtype,
                          metrics_port=args.metrics_port,
                          ready_timeout_s=args.ready_timeout)
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    return 0


def _add_scheduler(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "scheduler", help="run a scheduler service (continuous batching over a worker group)",
        description="Claim a worker group by a lease in Redis, size the KV pool from the "
        "workers' warm-up, and serve the model's request stream.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--workers", required=True,
                   help="comma-separated gRPC addresses of every worker of the group (any order)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in the API and in Redis keys (default: directory name)")
    p.add_argument("--group", default="0", help="worker group name (one active scheduler each)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--step-timeout", type=float, default=30.0, help="seconds per step")
    _add_parallel_sizes(p)
    p.add_argument("--ready-timeout", type=float, default=10.0,
                   help="ready while the worker group finished a forward pass within this many "
                   "seconds; idle, a one-token canary step keeps it honest (default 10)")
    p.add_argument("--metrics-host", default="0.0.0.0", help="bind address of --metrics-port")
    p.add_argument("--metrics-port", type=int, default=8001,
                   help="HTTP /metrics /health /ready (default 8001; 0: none)")
    logging_setup.add_arguments(p)
    p.set_defaults(handler=_run_scheduler)


def _run_scheduler(args: argparse.Namespace) -> int:
    import asyncio

    from scheduler.service import SchedulerServiceConfig, serve

    _observe(args, "scheduler")
    config = SchedulerServiceConfig(
        model=args.model, workers=tuple(a for a in args.workers.split(",") if a),
        redis_url=args.redis_url, served_model_name=args.served_model_name, group=args.group,
        block_size=args.block_size, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
        enable_prefix_caching=not args.no_prefix_caching, step_timeout_s=args.step_timeout,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        ready_timeout_s=args.ready_timeout, metrics_host=args.metrics_host,
        metrics_port=args.metrics_port)
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    return 0


def _add_gateway(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gateway", help="run a gateway (OpenAI-compatible HTTP + tessera.v1 gRPC)",
        description="Serve the public APIs of one model: validate, tokenize and enqueue "
        "requests in Redis, relay the scheduler's tokens as text. Stateless: run as many "
        "as you like.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--served-model-name", default=None,
                   help="model name in the APIs (default: the directory's name)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest request body / gRPC message accepted (default 4 MiB)")
    logging_setup.add_arguments(p)
    p.set_defaults(handler=_run_gateway)


def _run_gateway(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.service import GatewayConfig, run_until_signal

    _observe(args, "gateway")
    config = GatewayConfig(model=args.model, served_model_name=args.served_model_name,
                           redis_url=args.redis_url, host=args.host, http_port=args.http_port,
                           grpc_port=args.grpc_port, max_body_bytes=args.max_body_bytes)
    asyncio.run(run_until_signal(config))
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="start the whole stack on one machine (redis, worker, scheduler, gateway)",
        description="Start a private redis-server (unless --redis-url), a worker, a scheduler "
        "and a gateway as separate processes; print the endpoints; stop them all on Ctrl-C.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=50051)
    p.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-memory-gb", default="2", help="worker KV budget on CPU (GiB)")
    p.add_argument("--max-num-seqs", default="256")
    p.add_argument("--max-num-batched-tokens", default="2048")
    _add_parallel_sizes(p)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="worker groups, each with its own scheduler, sharing the request "
                   "stream (default 1)")
    logging_setup.add_arguments(p)
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from tessera.launcher import ServeConfig, serve

    return serve(ServeConfig(
        model=args.model, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        redis_url=args.redis_url, served_model_name=args.served_model_name, dtype=args.dtype,
        worker_args=["--kv-cache-memory-gb", args.kv_cache_memory_gb],
        scheduler_args=["--max-num-seqs", args.max_num_seqs,
                        "--max-num-batched-tokens", args.max_num_batched_tokens],
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        data_parallel_size=args.data_parallel_size,
        log_args=["--log-format", args.log_format, *(["--log-prompts"] if args.log_prompts else [])]))


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from tessera.bench_serve import add_arguments

    p = subparsers.add_parser("bench", help="benchmarks against a running server")
    sub = p.add_subparsers(dest="bench_command", metavar="KIND", required=True)
    serve_p = sub.add_parser(
        "serve", help="load-generate over the OpenAI streaming endpoint",
        description="Send random prompts to /v1/completions (streaming) and report request "
        "and token throughput, TTFT, TPOT, ITL and end-to-end latency (vLLM's definitions).")
    add_arguments(serve_p)
    serve_p.set_defaults(handler=_run_bench_serve)


def _run_bench_serve(args: argparse.Namespace) -> int:
    from tessera.bench_serve import main as bench_main

    return bench_main(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tessera", description="Tessera LLM inference server")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_make_model(subparsers)
    _add_generate(subparsers)
    _add_worker(subparsers)
    _add_scheduler(subparsers)
    _add_gateway(subparsers)
    _add_serve(subparsers)
    _add_bench(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tessera`` console script; returns the process exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as exc:
        # Expected user errors get one clear line, not a traceback.
        print(f"tessera {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
