"""Cost of the gRPC step contract's conversions, dataclass <-> protobuf, per engine step.

Measures step_plan_to_proto / step_plan_from_proto for a decode step of N running sequences
(the steady state: one delta each, a new block for every 16th), the same for a step where all
N are new (prompt of 200 tokens, full block table), and step_output_to/from_proto for N sampled
tokens with and without top-5 logprobs; plus serialised sizes. Target (DESIGN.md §2): well under
a millisecond each way for 256 running sequences.

    python benchmarks/step_proto_overhead.py [--seqs 256] [--iters 300]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from common.convert import (step_output_from_proto, step_output_to_proto, step_plan_from_proto,
                            step_plan_to_proto)
from common.sampling_params import SamplingParams
from common.step import NewSequence, RunningSequence, SampledToken, StepOutput, StepPlan


def _time(fn: Callable[[], object], iters: int) -> float:
    """Median of per-call microseconds over `iters` calls (medians shrug off a busy machine)."""
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def _report(name: str, to_proto: Callable, from_proto: Callable, obj: object, iters: int) -> None:
    msg = to_proto(obj)
    assert from_proto(msg) == obj, f"{name}: round trip changed the value"
    t_to = _time(lambda: to_proto(obj), iters)
    t_from = _time(lambda: from_proto(msg), iters)
    print(f"{name:<34} to_proto {t_to:8.1f} us   from_proto {t_from:8.1f} us   "
          f"{msg.ByteSize():7d} bytes")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--iters", type=int, default=300)
    args = ap.parse_args()
    n, iters = args.seqs, args.iters
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=256, seed=7, stop=("\n\n",))

    decode = StepPlan(1000, running=[
        RunningSequence(f"req-{i:08d}-0", 300 + i, 1, [5000 + i] if i % 16 == 0 else [])
        for i in range(n)], finished_ids=["req-x-0"])
    prefill = StepPlan(1, new=[
        NewSequence(f"req-{i:08d}-0", list(range(i, i + 200)), 200, 0, 200,
                    list(range(13 * i, 13 * i + 13)), params) for i in range(n)])
    plain = StepOutput(1000, sampled={f"req-{i:08d}-0": SampledToken(i) for i in range(n)})
    with_lp = StepOutput(1000, sampled={
        f"req-{i:08d}-0": SampledToken(i, -0.5, [(i, -0.5), (1, -1.5), (2, -2.5), (3, -3.5),
                                                 (4, -4.5)]) for i in range(n)})

    print(f"{n} sequences, median of {iters} calls")
    _report(f"StepPlan decode ({n} running)", step_plan_to_proto, step_plan_from_proto,
            decode, iters)
    _report(f"StepPlan prefill ({n} new)", step_plan_to_proto, step_plan_from_proto,
            prefill, iters)
    _report(f"StepOutput ({n} tokens)", step_output_to_proto, step_output_from_proto,
            plain, iters)
    _report(f"StepOutput ({n} tokens, top-5)", step_output_to_proto, step_output_from_proto,
            with_lp, iters)


if __name__ == "__main__":
    main()
