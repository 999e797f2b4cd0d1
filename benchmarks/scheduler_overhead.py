"""Time of the engine core's schedule() + update() with 256 running requests and a 2048-token
budget, no model (update() makes the per-request events the service publishes).

Target (DESIGN.md §2): well under 1 ms of Python per step. Measured three ways in one run: the
core alone, plus the telemetry hooks (scheduler.telemetry: metrics only, the service's
default), plus tracing (an SDK tracer provider whose exporter drops the spans).

    python benchmarks/scheduler_overhead.py [--requests 256] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

from common.sampling_params import SamplingParams
from common.step import SampledToken, StepOutput
from scheduler.engine_core import EngineCore, EngineRequest
from scheduler.scheduler import SchedulerConfig


def measure(args, observer_kind: str) -> tuple[float, float, float, int]:
    obs = _observer(observer_kind)
    s = EngineCore(SchedulerConfig(num_blocks=args.requests * 64, block_size=16,
                                   max_num_seqs=args.requests, max_num_batched_tokens=args.budget,
                                   max_model_len=4096), observer=obs)
    if observer_kind != "none":
        obs.metrics.watch(s.scheduler)
    params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    for i in range(args.requests):
        s.add_request(EngineRequest(str(i), [i % 1000 + 1] * 200 + [i], params, model="m"))
    out_token = SampledToken(5)
    seqs = s.scheduler.requests

    def one_step() -> None:
        plan = s.schedule()
        started = obs.step_started(plan)
        out = StepOutput(plan.step_id, sampled={
            x.seq_id: out_token for x in (*plan.new, *plan.running)
            if seqs[x.seq_id].num_computed_tokens + x.num_scheduled_tokens
            == seqs[x.seq_id].num_tokens})
        s.update(plan, out)
        obs.step_finished(plan, out, started)

    while s.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens
                               for r in s.scheduler.running):
        one_step()   # prefill everything first: the measurement is of steady decode
    times, hooks = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        plan = s.schedule()
        t1 = time.perf_counter()
        started = obs.step_started(plan)
        t2 = time.perf_counter()
        out = StepOutput(plan.step_id, sampled={x.seq_id: out_token for x in plan.running})
        t3 = time.perf_counter()
        s.update(plan, out)
        t4 = time.perf_counter()
        obs.step_finished(plan, out, started)
        t5 = time.perf_counter()
        times.append(((t1 - t) + (t4 - t3), len(plan.running)))
        hooks.append((t2 - t1) + (t5 - t4))
    times.sort()
    hooks.sort()
    return (times[len(times) // 2][0], times[0][0], times[int(len(times) * 0.9)][0],
            times[0][1], hooks[len(hooks) // 2])


def _observer(kind: str):
    from scheduler.health import Readiness
    from scheduler.metrics import SchedulerMetrics
    from scheduler.telemetry import EngineObserver, NullObserver

    if kind == "none":
        return NullObserver()
    metrics = SchedulerMetrics("m", 4096)
    tracer = None
    if kind == "tracing":
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        class Drop(SpanExporter):
            def export(self, spans):
                return SpanExportResult.SUCCESS

        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(Drop()))
        tracer = provider.get_tracer("bench")
    return EngineObserver(metrics, Readiness(10.0), tracer=tracer)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--budget", type=int, default=2048)
    args = ap.parse_args()
    for kind, label in (("none", "core"), ("metrics", "telemetry hooks, metrics only"),
                        ("tracing", "telemetry hooks with tracing (spans dropped)")):
        median, low, p90, running, hook = measure(args, kind)
        print(f"{running} running requests, budget {args.budget}: schedule()+update() "
              f"median {median * 1e3:.3f} ms, min {low * 1e3:.3f} ms, p90 {p90 * 1e3:.3f} ms "
              f"(target < 1 ms)" + ("" if kind == "none" else
                                    f"; {label}: median {hook * 1e6:.0f} us more"))


if __name__ == "__main__":
    main()
