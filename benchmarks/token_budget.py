"""Which token budget (`max_num_batched_tokens`) gives the most throughput on this machine.

Runs the offline bench workload (benchmarks/offline_throughput.py's, smaller by default) once
per budget per round, rounds interleaved, and prints each budget's best tok/s as a ratio to
the current default's in the same run. Bigger budgets make each step's matmuls larger
(closer to the GEMM peak) but a step longer; the engine's CPU default comes from this.

    python benchmarks/token_budget.py [--budgets 512 1024 2048 4096] [--num-requests 32]
"""

from __future__ import annotations

import sys
from pathlib import Path

if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import time

from benchmarks.engine_meter import model_or_bench
from benchmarks.workload import workload
from common.config import EngineConfig
from common.model_config import ModelConfig
from tessera import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="model directory (default: make the bench model)")
    ap.add_argument("--budgets", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    model_dir = model_or_bench(args.model)
    prompts = workload(args.num_requests, ModelConfig.from_dir(model_dir).vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    default = EngineConfig(model=model_dir).max_num_batched_tokens   # the engine's default here
    budgets = sorted(set(args.budgets) | {default})
    # no prefix caching: a second round would find its prompts cached and skip their prefill
    engines = {b: LLM(model_dir, max_num_seqs=256, max_num_batched_tokens=b,
                      kv_cache_memory_gb=0.5, enable_prefix_caching=False) for b in budgets}
    best = dict.fromkeys(budgets, 0.0)
    for _ in range(args.rounds):
        for b, llm in engines.items():
            t = time.perf_counter()
            llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            best[b] = max(best[b], len(prompts) * args.output_len / (time.perf_counter() - t))
    print(f"{args.num_requests} requests, prompts U[16,512], {args.output_len} output tokens; "
          f"best of {args.rounds} interleaved rounds")
    print(f"{'budget':>7s} {'tok/s':>7s} {'vs default':>10s}")
    for b in budgets:
        mark = "  (default)" if b == default else ""
        print(f"{b:7d} {best[b]:7.1f} {best[b] / best[default]:9.2f}x{mark}")


if __name__ == "__main__":
    main()
