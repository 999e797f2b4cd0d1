"""Time of one schedule() + update() with 256 running requests and a 2048-token budget, no model.

Target (DESIGN.md §2): well under 1 ms of Python per step.

    python benchmarks/scheduler_overhead.py [--requests 256] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

from common.sampling_params import SamplingParams
from common.step import SampledToken, StepOutput
from scheduler.request import Request
from scheduler.scheduler import Scheduler, SchedulerConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--budget", type=int, default=2048)
    args = ap.parse_args()
    s = Scheduler(SchedulerConfig(num_blocks=args.requests * 64, block_size=16,
                                  max_num_seqs=args.requests, max_num_batched_tokens=args.budget,
                                  max_model_len=4096))
    params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    for i in range(args.requests):
        s.add_request(Request(str(i), [i % 1000 + 1] * 200 + [i], params))
    out_token = SampledToken(5)

    def one_step() -> None:
        plan = s.schedule()
        s.update(plan, StepOutput(plan.step_id, sampled={
            x.seq_id: out_token for x in (*plan.new, *plan.running)
            if s.requests[x.seq_id].num_computed_tokens + x.num_scheduled_tokens
            == s.requests[x.seq_id].num_tokens}))

    while s.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in s.running):
        one_step()   # prefill everything first: the measurement is of steady decode
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        plan = s.schedule()
        t1 = time.perf_counter()
        out = StepOutput(plan.step_id, sampled={x.seq_id: out_token for x in plan.running})
        t2 = time.perf_counter()
        s.update(plan, out)
        t3 = time.perf_counter()
        times.append(((t1 - t) + (t3 - t2), len(plan.running)))
    times.sort()
    median = times[len(times) // 2][0]
    print(f"{times[0][1]} running requests, budget {args.budget}: schedule()+update() "
          f"median {median * 1e3:.3f} ms, min {times[0][0] * 1e3:.3f} ms, "
          f"p90 {times[int(len(times) * 0.9)][0] * 1e3:.3f} ms  (target < 1 ms)")


if __name__ == "__main__":
    main()
