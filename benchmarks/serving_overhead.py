"""Serving overhead: the full stack (`tessera serve`) against the in-process engine, in one run.

Targets: the stack keeps at least 90% of in-process throughput, and adds under 5 ms to median
TTFT at low load. Both sides run the same model, dtype, max_num_seqs, max_num_batched_tokens
and KV budget (2 GiB), and are fed the exact same prompt token-id lists.

1. Throughput, standard workload (`bench` model, 128 requests, prompts U[16, 512] seed 0, 128
   output tokens, ignore_eos): `LLM.generate` on all of them, against all of them sent at once
   to the stack's streaming /v1/completions. Output tok/s of each and the ratio.
2. Low-load TTFT: N sequential requests (distinct prompts of 64 tokens). Stack: request sent ->
   first streamed chunk carrying a choice (a token that decodes to no text yet still counts).
   In-process: wall time of `LLM.generate` with max_tokens=1 on the same prompt. The TTFT
   added is the median over rounds of each round's difference of medians.

With ``--tracing-cost`` the baseline is the stack itself: the same workload runs through a stack
with no OTEL_* exporter (tracing off: OpenTelemetry's no-op provider) and through one exporting
every span over OTLP/gRPC to a receiver in this process (which counts and drops them). Both
stacks run at once and the rounds alternate between them (the machine's load drifts); the
receiver shares the machine's cores, which a real collector would not.

Both sides run on the same allocator: `tessera serve` preloads tcmalloc into its CPU workers
(tessera.launcher), so the script runs itself again under it for the in-process engine; a
user's LD_PRELOAD (`LD_PRELOAD=`: glibc's malloc) applies to both sides instead.

The stack is started by this script (`python -m tessera.cli serve`) next to the in-process
engine, and always stopped with SIGTERM. `--rounds N` alternates the two sides N times, each
round on prompts of its own (the same for both sides), and reports the median of the per-round
ratios: the machine is shared and its load drifts. The HTTP client runs in this process, on
the same cores as the stack: that cost is part of what is measured. It is the lean raw-socket
client of benchmarks/sse_client.py (~0.3 CPU-s over 128 x 64 tokens); `--client httpx` runs
the httpx client used before (~1.5 CPU-s, as much as the gateway). Timings are reported,
never asserted.

CPU seconds over each round's batch are reported too, per side and, for the stack, per process
role (worker, scheduler: active and standby, gateway, redis-server, the `serve` supervisor;
benchmarks/proc_cpu.py reads them from /proc by each child's command line), and the client's:
unlike wall time they barely move with other programs' load, and on a 2-core machine every CPU
second outside the worker is taken from the model.

    python benchmarks/serving_overhead.py [--model DIR | --preset bench] [--num-requests 128]
        [--output-len 128] [--ttft-requests 20] [--ttft-output-len 16]
        [--rounds 3] [--client raw|httpx] [--tracing-cost [--repeats 3]]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, Python puts benchmarks/ first on sys.path, where benchmarks/kernels.py would
# shadow the `kernels` package: the repository root goes there instead.
if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import asyncio
import gc
import os
import random
import statistics
import tempfile
import time

import httpx

from common.config import (DeviceConfig, EngineConfig, SchedulingConfig, ServeConfig,
                           served_model_name)
from common.settings import add_arguments, from_args, pick, to_argv
from common.model_config import ModelConfig
from tessera import LLM, SamplingParams
from tessera.bench_serve import sse_chunks
from benchmarks.allocator import SERVED_ALLOCATOR, allocator_of, as_served
from benchmarks.proc_cpu import diff, role_pids, tree_cpu_by_role, tree_cpu_seconds
from benchmarks.sse_client import stream_completion
from tessera.procs import TESSERA, Proc, free_port

READY = "Ctrl-C stops everything."


def workload(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """The standard workload of offline_throughput.py: prompt lengths U[16, 512]."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(16, 512))] for _ in range(n)]


def fixed_prompts(n: int, length: int, vocab: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


# ---------------------------------------------------------------------------- in-process

def engine_config(args, model_dir: str) -> EngineConfig:
    """The engine settings both sides run with (the flags common/config.py declares)."""
    return from_args(EngineConfig, args, model=model_dir)


def make_llm(args, model_dir: str, warm_prompts) -> LLM:
    # LLM warms its worker up as a served worker does (one worst-case step sizes the KV
    # cache); then the warm-up requests of both sides
    llm = LLM(config=engine_config(args, model_dir))
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in warm_prompts], warm, use_tqdm=False)
    return llm


def in_process(args, llm: LLM, prompts, ttft_prompts, cpu: dict[str, float] | None = None
               ) -> tuple[float, list[float]]:
    """Throughput batch then TTFT requests; with `cpu`, cpu["engine"] = this process's CPU
    seconds over the batch."""
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    t, cpu0 = time.perf_counter(), time.process_time()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    if cpu is not None:
        cpu["engine"] = time.process_time() - cpu0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    ttfts = []
    for p in ttft_prompts:
        t = time.perf_counter()
        llm.generate([{"prompt_token_ids": p}], one, use_tqdm=False)
        ttfts.append(time.perf_counter() - t)
    return tokens / elapsed, ttfts


# ---------------------------------------------------------------------------- the stack

def start_stack(args, model_dir: str, env: dict[str, str | None] | None = None
                ) -> tuple[Proc, str]:
    http_port, grpc_port = free_port(), free_port()
    serve = pick(ServeConfig, engine_config(args, model_dir), http_port=http_port,
                 grpc_port=grpc_port)
    argv = [*TESSERA, "serve", *to_argv(serve, ServeConfig)]   # the same settings as in process
    proc = Proc("tessera serve", argv, READY, env).start().wait_ready(args.start_timeout)
    return proc, f"http://127.0.0.1:{http_port}"


def stop_stack(proc: Proc) -> None:
    proc.stop(timeout=30)        # serve stops its children on SIGTERM; then its whole session


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> tuple[float, int]:
    """Returns (seconds to the first chunk with a choice, completion tokens from usage)."""
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
        async for chunk in sse_chunks(resp):
            if ttft is None and chunk.get("choices"):
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    if ttft is None:
        raise RuntimeError("no token received")
    return ttft, tokens


def body(name: str, prompt: list[int], max_tokens: int) -> dict:
    return {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


async def stack_runs(args, base_url: str, name: str, prompts, ttft_prompts, warm_prompts,
                     cpu: dict[str, float] | None = None, pid: int | None = None):
    """Warm-up, the throughput batch, the TTFT requests. With `cpu` and `pid`: the CPU seconds
    of the stack's processes (cpu["stack"]) and of this client (cpu["client"]) over the batch."""
    url = base_url + "/v1/completions"
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    limits = httpx.Limits(max_connections=len(prompts) + 1, max_keepalive_connections=len(prompts) + 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        def one(b: dict):   # the load generator (--client)
            return (stream_one(client, url, b) if args.client == "httpx"
                    else stream_completion(base_url, b, args.timeout))

        # the same warm-up as the in-process side
        await asyncio.gather(*(one(body(name, p, 4)) for p in warm_prompts))
        t, stack0, client0 = time.perf_counter(), tree_cpu_by_role(pid) if pid else {}, \
            time.process_time()
        res = await asyncio.gather(*(one(body(name, p, args.output_len)) for p in prompts))
        elapsed = time.perf_counter() - t
        if cpu is not None and pid:
            cpu["roles"] = diff(tree_cpu_by_role(pid), stack0)
            cpu["stack"] = cpu["roles"]["total"]
            cpu["client"] = time.process_time() - client0
        tokens = sum(n for _, n in res)
        ttfts = []
        for p in ttft_prompts:
            ttft, _ = await one(body(name, p, args.ttft_output_len))
            ttfts.append(ttft)
    return tokens / elapsed, tokens, ttfts


# ---------------------------------------------------------------------------- tracing cost

class SpanSink:
    """An OTLP/gRPC trace receiver that counts the spans it is sent and keeps none."""

    def __init__(self) -> None:
        import grpc
        from concurrent import futures
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        sink = self
        self.spans = 0

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):   # noqa: N802
                sink.spans += sum(len(ss.spans) for rs in request.resource_spans
                                  for ss in rs.scope_spans)
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()


def tracing_cost(args, model_dir: str, name: str, prompts, ttft_prompts, warm_prompts) -> None:
    """Both stacks run side by side (the idle one costs almost nothing) and the measurements
    alternate between them, so that a change in the machine's background load hits both."""
    plain = {k: None for k in os.environ if k.startswith("OTEL_")}   # unset in the stack
    sink = SpanSink()
    plain = {**plain, **(args.stack_env or {})}
    traced = {**plain, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.port}",
              "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    labels = ("no exporter", "OTLP exporter")
    stacks = {}
    results: dict[str, list] = {label: [] for label in labels}
    try:
        for label, env in zip(labels, (plain, traced)):
            print(f"starting the stack with {label} ...", flush=True)
            stacks[label] = start_stack(args, model_dir, env)
        for r in range(args.repeats):
            for label in (labels if r % 2 == 0 else labels[::-1]):
                print(f"round {r + 1}/{args.repeats}, {label}: {args.num_requests} requests at "
                      "once, then the TTFT requests ...", flush=True)
                proc, url = stacks[label]
                cpu = tree_cpu_seconds(proc.pid)
                tps, tokens, ttfts = asyncio.run(stack_runs(
                    args, url, name, prompts, ttft_prompts, warm_prompts))
                results[label].append((tps, tree_cpu_seconds(proc.pid) - cpu, ttfts))
    finally:
        for proc, _ in stacks.values():
            stop_stack(proc)
        sink.server.stop(grace=1)
    tps = {k: [x[0] for x in v] for k, v in results.items()}
    cpu = {k: [x[1] for x in v] for k, v in results.items()}
    ttft = {k: [statistics.median(x[2]) * 1e3 for x in v] for k, v in results.items()}
    print(f"\nmodel {name}, dtype {args.dtype}, {os.cpu_count()} CPUs; {args.num_requests} "
          f"requests, prompts U[16,512], {args.output_len} output tokens, all at once; "
          f"{args.repeats} alternating rounds, medians over rounds")
    print(f"{'metric':32s} {'no exporter':>12s} {'OTLP export':>12s} {'ratio':>8s}   per round")
    for metric, values, fmt in (("stack output tok/s", tps, "{:.1f}"),
                                ("stack CPU seconds per round", cpu, "{:.2f}"),
                                ("stack median TTFT (ms)", ttft, "{:.2f}")):
        off, on = statistics.median(values[labels[0]]), statistics.median(values[labels[1]])
        rounds = " ".join(f"{b / a:.3f}" for a, b in zip(values[labels[0]], values[labels[1]]))
        print(f"{metric:32s} {fmt.format(off):>12s} {fmt.format(on):>12s} {on / off:8.3f}   "
              f"{rounds}")
    print(f"spans received by the OTLP sink: {sink.spans}.  A round: the warm-up, the "
          "throughput batch and the TTFT requests; CPU: every process of the stack (the sink "
          "is not one).")


# ---------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: make one with --preset in a temp dir)")
    ap.add_argument("--preset", default="bench", help="make-model preset when --model is not given")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    add_arguments(ap, SchedulingConfig)   # --max-num-seqs, --max-num-batched-tokens, ...
    add_arguments(ap, DeviceConfig)       # --device, --dtype, ...
    ap.add_argument("--ttft-requests", type=int, default=20)
    ap.add_argument("--ttft-prompt-len", type=int, default=64)
    ap.add_argument("--ttft-output-len", type=int, default=16, help="max_tokens of stack TTFT requests")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds for the stack to start")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per HTTP request")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="the load generator: the lean raw-socket client of "
                         "benchmarks/sse_client.py, or httpx (the one it replaced)")
    ap.add_argument("--tracing-cost", action="store_true",
                    help="compare the stack without and with an OTLP span exporter instead")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds (--tracing-cost)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds of in-process and stack; the ratio is their median")
    args = ap.parse_args()
    # the in-process side under the allocator serve gives its workers (benchmarks.allocator);
    # then the stack starts without it in its environment: the launcher gives it to the
    # workers only, as shipped
    args.stack_env = ({k: None for k in (SERVED_ALLOCATOR, "LD_PRELOAD",
                                         "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")}
                      if as_served() else None)

    model_dir = args.model
    if model_dir is None:
        from tessera.make_model import make_model
        model_dir = str(make_model(tempfile.mkdtemp() + f"/{args.preset}", "llama", preset=args.preset))
    model_dir = os.path.abspath(model_dir)
    name = served_model_name(model_dir)
    vocab = ModelConfig.from_dir(model_dir).vocab_size
    warm_prompts = fixed_prompts(4, 32, vocab, seed=2)    # no prefix shared with the others

    if args.tracing_cost:
        prompts = workload(args.num_requests, vocab)
        ttft_prompts = fixed_prompts(args.ttft_requests, args.ttft_prompt_len, vocab)
        tracing_cost(args, model_dir, name, prompts, ttft_prompts, warm_prompts)
        return
    rounds = measure(args, model_dir, name, vocab, warm_prompts)
    expected = args.num_requests * args.output_len
    for r, (_, _, _, stack_tokens, _) in enumerate(rounds):
        if stack_tokens != expected:
            print(f"warning: round {r + 1}: the stack returned {stack_tokens} output tokens, "
                  f"expected {expected}")
    ratios = [stack / local for local, stack, _, _, _ in rounds]
    # CPU seconds per round's batch: barely moved by other programs' load, unlike wall time
    cpu_ratio = statistics.median(x[4]["engine"] / x[4]["stack"] for x in rounds)
    cpu_ratio_client = statistics.median(x[4]["engine"] / (x[4]["stack"] + x[4]["client"])
                                         for x in rounds)
    ratio = statistics.median(ratios)
    local_tps = statistics.median(x[0] for x in rounds)
    stack_tps = statistics.median(x[1] for x in rounds)
    local_ttfts = [t for x in rounds for t in x[2][0]]
    stack_ttfts = [t for x in rounds for t in x[2][1]]
    local_med = statistics.median(local_ttfts) * 1e3
    stack_med = statistics.median(stack_ttfts) * 1e3
    # Paired per round, as the throughput ratio: a burst of load in one round moves both
    # sides of that round, not the comparison.
    added_rounds = [(statistics.median(x[2][1]) - statistics.median(x[2][0])) * 1e3
                    for x in rounds]
    added = statistics.median(added_rounds)
    print(f"\nmodel {name} ({model_dir}), dtype {args.dtype}, max_num_seqs {args.max_num_seqs}, "
          f"max_num_batched_tokens {args.max_num_batched_tokens}, {os.cpu_count()} CPUs; "
          f"allocator: {allocator_of()} in process, {args.worker_allocator} in the stack's "
          f"workers; client: {args.client}")
    print(f"throughput: {args.num_requests} requests, prompts U[16,512], {args.output_len} output "
          f"tokens, all at once; TTFT: {args.ttft_requests} sequential requests, "
          f"{args.ttft_prompt_len}-token prompts")
    rows = [
        ("in-process output tok/s", f"{local_tps:.1f}", ""),
        ("stack output tok/s", f"{stack_tps:.1f}", ""),
        ("stack / in-process", f"{ratio * 100:.1f}%", ">= 90%"),   # median of the rounds' own
        ("in-process / stack CPU-s", f"{cpu_ratio * 100:.1f}%", ""),
        ("  the same, client counted", f"{cpu_ratio_client * 100:.1f}%", ""),
        ("in-process median TTFT (ms)", f"{local_med:.2f}", ""),
        ("stack median TTFT (ms)", f"{stack_med:.2f}", ""),
        ("TTFT added by the stack (ms)", f"{added:+.2f}", "< 5 ms"),   # median of rounds
    ]
    print(f"{'metric':30s} {'measured':>10s} {'target':>8s}  met")
    for label, value, target in rows:
        met = ""
        if target == ">= 90%":
            met = "yes" if ratio >= 0.9 else "no"
        elif target == "< 5 ms":
            met = "yes" if added < 5.0 else "no"
        print(f"{label:30s} {value:>10s} {target:>8s}  {met}")
    print_cpu_table(rounds)
    print(f"{len(rounds)} round(s), stack / in-process per round: "
          + " ".join(f"{x * 100:.1f}%" for x in ratios)
          + "; TTFT added per round: " + " ".join(f"{x:+.1f} ms" for x in added_rounds)
          + f"; load average now {' '.join(open('/proc/loadavg').read().split()[:3])}")


def print_cpu_table(rounds) -> None:
    """CPU seconds over each round's batch: the in-process engine, and the stack per role."""
    roles = [r for r in ("worker", "scheduler", "gateway", "redis-server", "serve", "other")
             if any(r in x[4]["roles"] for x in rounds)]
    print("\nCPU seconds over the throughput batch, per round (stack per process role):")
    cols = ["in-process", *roles, "stack", "client"]
    print(f"{'round':8s}" + "".join(f"{c:>13s}" for c in cols))
    for r, x in enumerate(rounds):
        cpu = x[4]
        vals = [cpu["engine"], *(cpu["roles"].get(k, 0.0) for k in roles), cpu["stack"],
                cpu["client"]]
        print(f"{r + 1:<8d}" + "".join(f"{v:13.2f}" for v in vals))


def measure(args, model_dir: str, name: str, vocab: int, warm_prompts):
    """Alternating rounds of the in-process engine and the stack, both kept up between them
    (the idle one costs next to nothing), so a drift in the machine's load hits both sides.
    Each round has prompts of its own (round 1: the standard workload, seed 0), the same for
    both sides: no round finds a prefix an earlier one cached.
    Per round: (in-process tok/s, stack tok/s, (in-process TTFTs, stack TTFTs), stack tokens,
    CPU seconds of the batch: {"engine", "stack", "client"})."""
    print("in-process engine: starting ...", flush=True)
    llm = make_llm(args, model_dir, warm_prompts)
    print("starting the stack ...", flush=True)
    proc, base_url = start_stack(args, model_dir, args.stack_env)
    args.worker_allocator = ",".join(sorted({allocator_of(p) for p in role_pids(proc.pid, "worker")}))
    rounds = []
    try:
        for r in range(args.rounds):
            prompts = workload(args.num_requests, vocab, seed=r)
            ttft_prompts = fixed_prompts(args.ttft_requests, args.ttft_prompt_len, vocab,
                                         seed=1 + 1000 * r)
            got, cpu = {}, {}
            for side in (("in-process", "stack") if r % 2 == 0 else ("stack", "in-process")):
                print(f"round {r + 1}/{args.rounds}, {side}: {args.num_requests} requests x "
                      f"{args.output_len} tokens at once, then the TTFT requests ...", flush=True)
                if side == "in-process":
                    got[side] = in_process(args, llm, prompts, ttft_prompts, cpu)
                else:
                    got[side] = asyncio.run(stack_runs(
                        args, base_url, name, prompts, ttft_prompts, warm_prompts, cpu, proc.pid))
            (ltps, lttft), (stps, stokens, sttft) = got["in-process"], got["stack"]
            print(f"round {r + 1}: in-process {ltps:.1f} tok/s, stack {stps:.1f} tok/s "
                  f"({stps / ltps * 100:.1f}%); CPU s over the batch: in-process "
                  f"{cpu['engine']:.1f}, stack {cpu['stack']:.1f} ("
                  + ", ".join(f"{k} {v:.1f}" for k, v in cpu["roles"].items() if k != "total")
                  + f") + client {cpu['client']:.1f}; "
                  f"load {' '.join(open('/proc/loadavg').read().split()[:3])}", flush=True)
            rounds.append((ltps, stps, (lttft, sttft), stokens, cpu))
    finally:
        stop_stack(proc)
        del llm
        gc.collect()
    return rounds


if __name__ == "__main__":
    main()
