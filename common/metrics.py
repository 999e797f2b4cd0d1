"""What every service's Prometheus metrics share: the ``tessera:`` prefix, vLLM's bucket
boundaries (so dashboards written for vLLM read ours the same way), a private registry.

Names and meanings follow vLLM's (``vllm:time_to_first_token_seconds`` is our
``tessera:time_to_first_token_seconds``), all labelled with ``model_name``. Each name has one
owner service, so summing a metric over every scraped pod never counts a request twice:

- gateway (what the client sees): time_to_first_token, inter_token_latency, e2e_request_latency,
  request_success_total{finished_reason};
- scheduler (the engine): requests running/waiting, KV-cache usage, prefix-cache queries/hits,
  prompt/generation token counters, preemptions, per-request queue/prefill/decode/inference
  times and token counts, step round trips, readiness, the Redis request stream's depth;
- worker: per-step timings, tokens and sequences per step;
- every process that `tessera serve` restarted: process_restarts_total{service}, its own count.

Every interval is measured on one process's monotonic clock (Redis's own clock for the time a
request waited in the stream), never by subtracting two machines' clocks.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, ProcessCollector, generate_latest

PREFIX = "tessera:"
LABELS = ("model_name",)

# vLLM's boundaries (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                           50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def name(metric: str) -> str:
    return PREFIX + metric


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's token-count buckets)."""
    out, exponent = [], 0
    while True:
        for m in (1, 2, 5):
            v = m * 10 ** exponent
            if v > max_value:
                return out
            out.append(v)
        exponent += 1


# Set by `tessera serve` in the environment of a child it restarted (tessera/launcher.py).
RESTARTS_ENV, SERVICE_ENV = "TESSERA_PROCESS_RESTARTS", "TESSERA_SERVICE_NAME"


def new_registry() -> CollectorRegistry:
    """A private registry (not prometheus_client's global one) with the process metrics, so
    that several services in one test process never collide; in a process its supervisor
    restarted, also ``tessera:process_restarts_total{service}`` (how many times it was)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    restarts = os.environ.get(RESTARTS_ENV)
    if restarts and restarts.isdigit():
        Counter(name("process_restarts"), "times the supervisor restarted this process",
                ["service"], registry=registry).labels(
                    os.environ.get(SERVICE_ENV, "")).inc(int(restarts))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
