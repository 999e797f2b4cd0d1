"""The ``tessera`` command line.

Each subcommand is one ``_add_<name>(subparsers)`` function that declares its flags and binds
its handler with ``set_defaults(handler=...)``; adding a subcommand is adding one such pair
and one line in ``_build_parser``. A service's flags are generated from its config class
(common/config.py) and parsed back into it (``settings.from_args``): a setting is declared
there, once, never here. Handlers import their heavy modules lazily so that
``tessera --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from common import logging_setup, settings
from common.config import (EngineConfig, GatewayConfig, LogConfig, SchedulerServiceConfig,
                           ServeConfig, WorkerConfig)


def _observe(config: LogConfig, service: str) -> None:
    """Logging (--log-format, --log-prompts) and tracing (OTEL_* variables) of a service."""
    from common.telemetry import setup_tracing

    logging_setup.configure(config.log_format, config.log_prompts, service=service)
    setup_tracing(service)


def _add_make_model(subparsers: argparse._SubParsersAction) -> None:
    from common.config import DTYPES
    from tessera.make_model import ARCHS, PRESETS

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
    p.add_argument("--prompt", action="append", required=True,
                   help="a prompt; repeat the flag for several")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    settings.add_arguments(p, EngineConfig, skip=("seed",))   # --seed is the request's here
    p.add_argument("--chat", action="store_true",
                   help="send each prompt as a user message through the model's chat template")
    p.set_defaults(handler=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    import time

    from tessera import LLM, SamplingParams

    llm = LLM(config=settings.from_args(EngineConfig, args, seed=0))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                            seed=args.seed)
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
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
    settings.add_arguments(p, WorkerConfig)
    p.set_defaults(handler=_run_worker)


def _run_worker(args: argparse.Namespace) -> int:
    import asyncio

    from worker.service import serve

    config = settings.from_args(WorkerConfig, args)
    _observe(config, "worker")
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
    settings.add_arguments(p, SchedulerServiceConfig)
    p.set_defaults(handler=_run_scheduler)


def _run_scheduler(args: argparse.Namespace) -> int:
    import asyncio

    from scheduler.service import serve

    config = settings.from_args(SchedulerServiceConfig, args)
    _observe(config, "scheduler")
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    return 0


def _add_hash_key(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "hash-key", help="print the SHA-256 digest of an API key, for a --tenants file",
        description="Reads the key from the argument, or from standard input with '-' (keeps "
        "it out of the shell's history).")
    p.add_argument("key", help="the API key, or - to read one line from standard input")

    def run(args: argparse.Namespace) -> int:
        from gateway.auth import hash_key

        key = sys.stdin.readline().strip() if args.key == "-" else args.key
        if not key:
            print("hash-key: empty key", file=sys.stderr)
            return 2
        print(hash_key(key))
        return 0

    p.set_defaults(handler=run)


def _add_gateway(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "gateway", help="run a gateway (OpenAI-compatible HTTP + tessera.v1 gRPC)",
        description="Serve the public APIs of one model: validate, tokenize and enqueue "
        "requests in Redis, relay the scheduler's tokens as text. Stateless: run as many "
        "as you like.")
    settings.add_arguments(p, GatewayConfig)
    p.set_defaults(handler=_run_gateway)


def _run_gateway(args: argparse.Namespace) -> int:
    import asyncio

    from gateway.service import run_until_signal

    config = settings.from_args(GatewayConfig, args)
    _observe(config, "gateway")
    asyncio.run(run_until_signal(config))
    return 0


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="start the whole stack on one machine (redis, worker, scheduler, gateway)",
        description="Start a private redis-server (unless --redis-url), the workers, a "
        "scheduler per worker group and a gateway as separate processes, each given the "
        "settings below that it takes; print the endpoints; restart a process that dies; "
        "stop them all on Ctrl-C.")
    settings.add_arguments(p, ServeConfig)
    p.set_defaults(handler=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from tessera.launcher import serve

    return serve(settings.from_args(ServeConfig, args))


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


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    from tessera.convert_gguf import add_arguments

    p = subparsers.add_parser(
        "convert", help="write a GGUF file as a Hugging Face model directory",
        description="Dequantize a GGUF file into a Hugging Face directory (config, safetensors, "
        "tokenizer.json, tokenizer_config.json with the chat template). Every --model flag also "
        "takes the .gguf file itself.")
    add_arguments(p)
    p.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from tessera.convert_gguf import main as convert_main

    return convert_main(args)


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
    _add_hash_key(subparsers)
    _add_convert(subparsers)
    return parser


def _foreign_kernels_package() -> str | None:
    """Where ``import kernels`` would load another project's package from, if it would.

    Hugging Face's ``kernels`` distribution (which transformers >= 5.25 requires) installs a
    top-level package with our kernels/'s name; the worker would then fail on its first import.
    """
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parents[1] / "kernels" / "__init__.py"
    if spec is None or spec.origin is None or Path(spec.origin).resolve() == ours:
        return None
    return spec.origin


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tessera`` console script; returns the process exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    foreign = _foreign_kernels_package()
    if foreign is not None:
        print(f"tessera {args.command}: error: `import kernels` loads {foreign}, not tessera's "
              "kernels/ (`pip uninstall kernels`: Hugging Face's package has the same name)",
              file=sys.stderr)
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, OSError) as exc:
        # Expected user errors get one clear line, not a traceback.
        print(f"tessera {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
